"""The JAX decoder against Hugging Face transformers (PyTorch, CPU) on the same tiny random weights,
and the KV-cached decode path against recomputing the whole sequence.

Tolerance: float32 logits agree to 1e-4 absolute (their magnitude here is ~1-10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.engine.engine import Engine
from jaxserver.engine.request import GenerationRequest, SamplingOptions
from jaxserver.engine.runner import Runner
from jaxserver.model import cpu_kernels, llama, paged, serving_layout
from jaxserver.model.loader import load_model
from tests import tiny

ATOL = 1e-4


def reference_logits(folder, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def full_logits(cfg, params, ids: np.ndarray, matmul_kernel: bool = False) -> np.ndarray:
    """Logits at every position, computed from scratch in one pass (with `matmul_kernel`, the bf16
    weights packed for the matmul kernel)."""
    batch, seq = ids.shape
    cache = llama.init_cache(cfg, batch, seq, jnp.float32)
    zeros = jnp.zeros((batch,), jnp.int32)
    head, layers = llama.head_params(params), llama.layer_params(params, cfg)
    if matmul_kernel:
        head, layers = serving_layout.pack_matmul_weights(head, layers)
    logits, _ = llama.forward(head, layers, cfg, jnp.asarray(ids), cache, zeros)
    return np.asarray(logits)


@pytest.mark.parametrize("kind", ["llama", "llama3-tied", "qwen2"])
def test_logits_match_transformers(tmp_path, kind):
    folder = tiny.make_hf_model(tmp_path, kind)
    cfg, params, _ = load_model(folder)
    # 100 positions: past llama3's original context (64) so the scaled frequencies matter.
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 100))
    expected = reference_logits(folder, ids)
    got = full_logits(cfg, jax.tree.map(jnp.asarray, params), ids)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-4)


def test_config_reads_family_traits(tmp_path):
    cfg, params, _ = load_model(tiny.make_hf_model(tmp_path, "qwen2"))
    assert cfg.attention_bias and cfg.architecture == "Qwen2ForCausalLM" and cfg.rope_theta == 1e6
    assert "bq" in params["layers"] and "lm_head" in params


@pytest.mark.parametrize("kind", ["llama", "llama3-tied", "qwen2"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_params_rebuild_what_serving_weights_split(tmp_path, kind, dtype):
    """The serving weights (concatenated projections, bf16 products packed for the matmul kernel, the
    embedding as bits) give back the stacked parameters exactly: JAXServer.params reads them so."""
    cfg, params, _ = load_model(tiny.make_hf_model(tmp_path, kind))
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    head, layers = serving_layout.pack_matmul_weights(
        llama.head_params(params), llama.layer_params(params, cfg)
    )
    head = llama.embedding_as_bits(head)
    if dtype == jnp.bfloat16:
        assert head["embed"].dtype == jnp.uint16
        assert any(cpu_kernels.is_packed(w) for w in layers[0].values())
    rebuilt = serving_layout.stacked_params(head, layers, cfg)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    cfg, params, tokenizer = load_model(tiny_llama_dir)
    return cfg, jax.tree.map(jnp.asarray, params), tokenizer


def test_cached_decode_equals_recompute(tiny_model):
    """Feeding tokens one by one through the cache gives the logits of a full recomputation."""
    cfg, params, _ = tiny_model
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 24))
    expected = full_logits(cfg, params, ids)[0]
    cache = llama.init_cache(cfg, 1, 32, jnp.float32)
    zero = jnp.zeros((1,), jnp.int32)
    head, layers = llama.head_params(params), llama.layer_params(params, cfg)
    for pos in range(ids.shape[1]):
        logits, cache = llama.forward(
            head,
            layers,
            cfg,
            jnp.asarray(ids[:, pos : pos + 1]),
            cache,
            jnp.full((1,), pos),
            logit_index=zero,
        )
        np.testing.assert_allclose(np.asarray(logits)[0], expected[pos], atol=ATOL, rtol=1e-4)


def greedy_by_recompute(cfg, params, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(full_logits(cfg, params, np.asarray([ids]))[0, -1])))
    return ids[len(prompt) :]


def engine_greedy(cfg, params, tokenizer, prompt: list[int], n: int, budget: int, attention) -> list[int]:
    runner = Runner(
        cfg,
        params,
        pages=16,
        max_num_seqs=3,
        max_length=64,
        cache_dtype=jnp.float32,
        max_num_batched_tokens=budget,
        max_decode_steps=5,
        eos_ids=(-1,),
        compile_lazily=True,
        attention=attention,
    )
    engine = Engine(runner, tokenizer, max_waiting=4, prefix_caching=False)
    engine.start()
    request = GenerationRequest(prompt, n, SamplingOptions(greedy=True), ignore_eos=True)
    tokens = [t for chunk in engine.submit(request) for t in chunk.token_ids]
    engine.shutdown()
    return tokens


@pytest.mark.parametrize(
    ("budget", "attention"),
    [(32, None), (16, None), (32, paged.attention_reference)],
    ids=["one-piece", "16-token-pieces", "xla-attention"],
)
def test_engine_greedy_equals_recompute(tiny_model, budget, attention):
    """A prompt computed in one step (or in 16-token pieces), then decoded in calls of 5 steps (through
    the CPU attention kernel or XLA's operations), equals step-by-step argmax over the full sequence."""
    cfg, params, tokenizer = tiny_model
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, cfg.vocab_size, 23)]
    expected = greedy_by_recompute(cfg, params, prompt, 12)
    assert engine_greedy(cfg, params, tokenizer, prompt, 12, budget, attention) == expected


def test_bfloat16_weights_track_float32(tiny_model):
    """bfloat16 weights (float32 activations and accumulation): logits within bf16 rounding of the
    float32 model's (5% of the largest logit: bf16 keeps 8 bits of mantissa, and the rounding compounds
    over the layers), for a batch of rows and for a lone row (which `linear` pads to two), and through
    the AVX512-BF16 kernel (`cpu_kernels.bf16_gemm`, where the CPU has it) for 1 and 8 decode rows and a
    48-token prompt. Over 256 prompt tokens the rounding drifts further from float32, and the kernel's
    logits stay near those of XLA's bf16 dot on the same weights: each product rounds its input to
    bf16, where the two dots' float32 summation orders can round a value the other way, and such flips
    compound over the layers (0.3-0.5% of the largest logit here, against 3-6% from float32; each
    product alone is checked to float32 rounding in test_cpu_kernels.py)."""
    cfg, params, _ = tiny_model
    half = llama.cast_params(params, jnp.bfloat16)
    kernel = cpu_kernels.bf16_gemm_available()
    cases = [((2, 24), False), ((1, 1), False), ((1, 1), kernel), ((8, 1), kernel), ((2, 24), kernel)]
    for shape, matmul_kernel in cases:
        ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=shape)
        exact, rounded = full_logits(cfg, params, ids), full_logits(cfg, half, ids, matmul_kernel)
        assert rounded.dtype == np.float32
        scale = np.abs(exact).max()
        assert 0 < np.abs(rounded - exact).max() < 0.05 * scale
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 128))
    by_xla, by_kernel = full_logits(cfg, half, ids), full_logits(cfg, half, ids, kernel)
    np.testing.assert_allclose(by_kernel, by_xla, atol=0.01 * np.abs(by_xla).max())


@pytest.mark.skipif(not cpu_kernels.bf16_gemm_available(), reason="no AVX512-BF16 here")
def test_packed_weights_lower_to_the_matmul_kernel(tiny_model):
    """Every matmul weight of the tiny model fits the kernel's tiles: packed, all of them (4 per layer and
    the head) lower to its custom call, at any number of rows; unpacked, none does."""
    cfg, params, _ = tiny_model
    half = llama.cast_params(params, jnp.bfloat16)
    head, layers = llama.head_params(half), llama.layer_params(half, cfg)
    packed_head, packed_layers = serving_layout.pack_matmul_weights(head, layers)
    assert all(
        cpu_kernels.is_packed(layer[name]) for layer in packed_layers for name in serving_layout.LAYER_MATMULS
    )
    for batch, seq in [(8, 1), (1, 128)]:
        packed = lowered_forward(cfg, packed_head, packed_layers, batch, seq)
        assert packed.count("jaxserver_bf16_gemm") >= 4 * cfg.num_layers + 1
        assert "jaxserver_bf16_gemm" not in lowered_forward(cfg, head, layers, batch, seq)


def lowered_forward(cfg, head, layers, batch: int, seq: int) -> str:
    """The compiler input of `forward` over a batch x seq prompt."""
    zeros = jnp.zeros((batch,), jnp.int32)

    def logits(head, layers, ids, cache):
        return llama.forward(head, layers, cfg, ids, cache, zeros)[0]

    ids, cache = jnp.zeros((batch, seq), jnp.int32), llama.init_cache(cfg, batch, seq, jnp.float32)
    return jax.jit(logits).lower(head, layers, ids, cache).as_text()


@pytest.mark.parametrize(("cache_dtype", "storage"), [(jnp.bfloat16, jnp.uint16), (jnp.float16, jnp.float16)])
def test_16_bit_cache_decode_step_tracks_float32(tiny_model, cache_dtype, storage):
    """A prompt prefilled into a bfloat16 (kept as 16-bit integers) or float16 KV cache and one decode
    step, with bf16 weights: last-position logits within bf16 rounding of the float32 model's computed
    from scratch."""
    cfg, params, _ = tiny_model
    half = llama.cast_params(params, jnp.bfloat16)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 24))
    exact = full_logits(cfg, params, ids)[:, -1]
    head, layers = llama.head_params(half), llama.layer_params(half, cfg)
    if cpu_kernels.bf16_gemm_available():
        head, layers = serving_layout.pack_matmul_weights(head, layers)
    cache = llama.init_cache(cfg, 2, 32, cache_dtype)
    assert cache.k[0].dtype == storage
    zeros = jnp.zeros((2,), jnp.int32)
    _, cache = llama.forward(head, layers, cfg, jnp.asarray(ids[:, :-1]), cache, zeros)
    logits, _ = llama.forward(
        head,
        layers,
        cfg,
        jnp.asarray(ids[:, -1:]),
        cache,
        jnp.full((2,), 23, jnp.int32),
        logit_index=zeros,
    )
    scale = np.abs(exact).max()
    assert 0 < np.abs(np.asarray(logits) - exact).max() < 0.05 * scale
