"""Quantized weights (model/quant.py): GGUF's blocks read without rounding, quantization at load within
its step, and the XLA path against the dense product."""

import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from jaxserver import JAXServer
from jaxserver.engine.request import GenerationRequest, SamplingOptions
from jaxserver.model import llama, quant, serving_layout
from jaxserver.model.checkpoint import save_checkpoint
from jaxserver.model.loader import load_model
from jaxserver.parallel.mesh import make_mesh, shard_params
from tests import tiny
from tests.test_engine import next_token_logits, prompts, run, start_engine
from tests.test_model import full_logits

RNG = np.random.default_rng(0)
GREEDY = SamplingOptions(greedy=True)


@pytest.mark.parametrize("kind", quant.GGUF_FORMATS, ids=lambda k: k.name)
def test_gguf_blocks_dequantize_bit_for_bit_as_gguf_does(kind):
    rows = RNG.standard_normal((48, 96)).astype(np.float32) * 3  # 48 outputs of 96 inputs
    blocks = gguf.quants.quantize(rows, kind)
    weight = quant.from_gguf(blocks, kind, 96)
    reference = gguf.quants.dequantize(blocks, kind).T  # [in, out]
    assert weight.shape == (96, 48) and weight.bits == (8 if kind == GGMLQuantizationType.Q8_0 else 4)
    np.testing.assert_array_equal(quant.dequantize(weight), reference)
    on_device = quant.QuantizedWeight(
        jnp.asarray(weight.codes),
        jnp.asarray(weight.scales),
        None if weight.mins is None else jnp.asarray(weight.mins),
        weight.bits,
        weight.group,
    )
    np.testing.assert_array_equal(np.asarray(quant.dequantize(on_device)), reference)


@pytest.mark.parametrize(("bits", "group"), [(8, 32), (8, 128), (4, 32), (4, 64)])
def test_quantizing_errs_by_at_most_half_a_step(bits, group):
    dense = RNG.standard_normal((2, 128, 40)).astype(np.float32)  # stacked: 2 layers
    weight = quant.quantize(dense, bits, group)
    assert weight.shape == dense.shape and weight.codes.dtype == (np.int8 if bits == 8 else np.uint8)
    step = np.repeat(weight.scales.astype(np.float32), group, axis=-2)
    error = np.abs(quant.dequantize(weight) - dense)
    # half a step, and a little for the float16 rounding of the scale and the min the codes were fit to
    assert np.all(error <= step * 0.51 + 1e-6)
    assert weight.nbytes < dense.nbytes * (0.33 if bits == 8 else 0.2)


def test_quantizing_refuses_a_group_that_does_not_fit():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize(np.zeros((96, 8), np.float32), 4, 48)
    with pytest.raises(ValueError, match="must divide"):
        quant.quantize(np.zeros((96, 8), np.float32), 4, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_xla_path_multiplies_as_the_dense_weight_does(bits):
    weight = quant.quantize(RNG.standard_normal((64, 24)).astype(np.float32), bits, 32)
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    dense = quant.dequantize(weight)
    np.testing.assert_allclose(
        np.asarray(quant.linear_xla(jnp.asarray(x), weight)), x @ dense, rtol=1e-5, atol=1e-5
    )


def test_outputs_are_taken_and_joined_without_rounding():
    a = quant.quantize(RNG.standard_normal((64, 16)).astype(np.float32), 4, 32)
    b = quant.quantize(RNG.standard_normal((64, 8)).astype(np.float32), 4, 32)
    joined = quant.concat_outputs([a, b])
    both = np.concatenate([quant.dequantize(a), quant.dequantize(b)], axis=-1)
    np.testing.assert_array_equal(quant.dequantize(joined), both)
    index = np.array([5, 0, 17, 23])
    np.testing.assert_array_equal(quant.dequantize(quant.take_outputs(joined, index)), both[:, index])


def quantized_params(params: dict, bits: int = 4) -> dict:
    """A model's parameters with every matmul weight quantized in groups of 32, on the device."""
    return jax.tree.map(jnp.asarray, quant.quantize_params(params, bits, 32))


def dequantized(params: dict) -> dict:
    return jax.tree.map(jnp.asarray, quant.dequantize_params(params))


@pytest.mark.parametrize("kind", ["llama", "llama3-tied"])
def test_a_model_with_quantized_weights_computes_as_its_dequantized_copy(kind, tmp_path):
    """Every product goes through the XLA path (`llama.linear`), the tied table serves embedding and head
    as one quantized copy; logits match the same weights dense, in float32."""
    cfg, params, _ = load_model(tiny.make_hf_model(tmp_path, kind))
    quantized = quantized_params(params)
    ids = [5, 17, 3, 250, 9, 44]
    np.testing.assert_allclose(
        next_token_logits((cfg, quantized, None), ids),
        next_token_logits((cfg, dequantized(quantized), None), ids),
        rtol=1e-4,
        atol=1e-4,
    )
    if kind == "llama3-tied":
        assert llama.head_params(quantized)["lm_head"] is quantized["embed"]  # no second copy
    rebuilt = serving_layout.stacked_params(
        llama.head_params(quantized), llama.layer_params(quantized, cfg), cfg
    )
    for name in ("wq", "wv", "w_up"):
        np.testing.assert_array_equal(
            quant.dequantize(rebuilt["layers"][name]), quant.dequantize(quantized["layers"][name])
        )


def test_the_engine_serves_quantized_weights_as_their_dequantized_copy(tiny_llama_dir):
    """The paged engine (ragged steps, multi-step decode calls) over quantized weights: the same greedy
    tokens as over the same weights dense, for a batch of prompts."""
    cfg, params, tokenizer = load_model(tiny_llama_dir)
    weights = quantized_params(params)
    answers = []
    for served in (weights, dequantized(weights)):
        engine = start_engine((cfg, served, tokenizer))
        try:
            requests = [
                GenerationRequest(ids, 12, GREEDY, ignore_eos=True) for ids in prompts(4, cfg.vocab_size)
            ]
            answers.append([run(engine, request)[0] for request in requests])
        finally:
            engine.shutdown(0)
    assert answers[0] == answers[1]


def test_a_checkpoint_keeps_codes_and_loads_them_dequantized_unless_asked(tiny_llama_dir, tmp_path):
    cfg, params, tokenizer = load_model(tiny_llama_dir)
    codes = quant.quantize_params(params, 4, 64)
    save_checkpoint(tmp_path, cfg, codes, tokenizer)
    _, kept, _ = load_model(tmp_path, keep_codes=True)
    assert jax.tree.structure(kept) == jax.tree.structure(codes)
    assert (kept["layers"]["wq"].bits, kept["layers"]["wq"].group) == (4, 64)
    for got, want in zip(jax.tree.leaves(kept), jax.tree.leaves(codes), strict=True):
        np.testing.assert_array_equal(got, want)
    _, dense, _ = load_model(tmp_path)
    for got, want in zip(
        jax.tree.leaves(dense), jax.tree.leaves(quant.dequantize_params(codes)), strict=True
    ):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("scheme", "bits", "group"), [("int8", 8, None), ("int4", 4, 32)])
def test_the_server_quantizes_float_weights_at_load(tiny_llama_dir, scheme, bits, group):
    """int8 per output channel (all of a weight's inputs in one group), int4 in groups of 32; served from
    the codes (through the kernel where it runs: one device) and answering."""
    config = tiny.test_config(max_new_tokens=4, mesh_axes_shape=(1, 1, 1), quantization=scheme)
    server = JAXServer.load(tiny_llama_dir, config=config)
    try:
        served = server.engine.runner.model_params()
        for name in quant.LAYER_MATMULS:
            weight = served["layers"][name]
            inputs = weight.shape[-2]
            assert quant.is_quantized(weight) and (weight.bits, weight.group) == (bits, group or inputs), name
        assert quant.is_quantized(served["lm_head"]) and not quant.is_quantized(served["embed"])  # untied
        status = server.status()["weights"]
        assert status["quantized_bits"] == [bits] and status["bytes"] > 0
        answer = server.forward_instruct_non_api("hello", greedy=True)
        assert answer["tokens_used"] > 0
    finally:
        server.shutdown(0)


def test_split_meshes_take_the_xla_path_and_agree_with_the_kernel(tiny_llama_dir):
    """Quantized weights placed on 8 devices (outputs split over the model axis) multiply by XLA's path;
    their logits agree with one device's, through the kernel where it runs."""
    cfg, params, _ = load_model(tiny_llama_dir)
    codes = quant.quantize_params(params, 4, 32)
    ids = np.asarray([[5, 17, 3, 250, 9, 44]])
    one = full_logits(cfg, jax.tree.map(jnp.asarray, codes), ids, matmul_kernel=True)
    placed = shard_params(codes, make_mesh(("dp", "fsdp", "mp"), (1, 1, 8)))
    assert len(placed["layers"]["w_up"].codes.sharding.device_set) == 8
    split = full_logits(cfg, placed, ids)
    np.testing.assert_allclose(split, one, rtol=1e-3, atol=1e-3)


def test_weights_a_group_does_not_divide_stay_float(tmp_path):
    """The tiny tied model's 64 hidden inputs take no group of 128: its table stays [vocab, hidden]."""
    _, params, _ = load_model(tiny.make_hf_model(tmp_path, "llama3-tied"))
    kept = quant.quantize_params(params, 4, 128)
    assert kept["embed"] is params["embed"] and kept["layers"]["wq"] is params["layers"]["wq"]
    assert quant.is_quantized(kept["layers"]["w_down"])  # 128 inputs
