"""The seed API: process() streaming, sampling settings, sharding over the mesh, overridable hooks."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import pytest

from jaxserver import JAXServer
from jaxserver.engine.request import SamplingOptions
from jaxserver.errors import BadRequestError
from jaxserver.model import cpu_kernels
from tests import tiny


def test_process_streams_growing_responses(tiny_server):
    steps = list(tiny_server.process("Hello there", greedy=True, max_new_tokens=20))
    assert len(steps) >= 3  # first token, then chunks of max_compile_tokens=8
    for (before, n_before), (after, n_after) in itertools.pairwise(steps):
        assert after.startswith(before) and n_after > n_before
    assert steps[-1][1] <= 20


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_server):
    def run(seed):
        return list(
            tiny_server.process("Hello", max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        )[-1]

    assert run(1) == run(1)
    assert len({run(s)[0] for s in range(4)}) > 1


def test_bad_sampling_values_raise_bad_request(tiny_server):
    with pytest.raises(BadRequestError):
        list(tiny_server.process("Hello", top_p=0.0))
    # What the engine's arrays cannot hold is refused when the request is made, not in the engine thread.
    with pytest.raises(BadRequestError, match="top_k"):
        SamplingOptions(top_k=2**31)
    with pytest.raises(BadRequestError, match="seed"):
        SamplingOptions(seed=2**63)
    with pytest.raises(BadRequestError, match="temperature"):
        SamplingOptions(temperature=1e39)


def test_eight_devices_give_the_same_tokens_as_one(tiny_llama_dir, tiny_server):
    """Params sharded over 8 devices (the cache replicated, so decoding attends through the CPU kernel),
    and params and cache split over data and model axes (attention by XLA's ops): both answer as one
    device does."""
    assert len(jax.devices()) == 8
    assert tiny_server.mesh.shape["fsdp"] == 8  # params really sharded over the 8 simulated devices
    # "auto" picks bf16 weights on one CPU device with AVX512-BF16, fp32 on several: pinned to compare meshes.
    assert tiny_server.weight_dtype == "float32"
    single = JAXServer.load(tiny_llama_dir, config=tiny.test_config(mesh_axes_shape=(1, 1, 1), dtype="fp32"))
    split = JAXServer.load(tiny_llama_dir, config=tiny.test_config(mesh_axes_shape=(2, 2, 2), dtype="fp32"))
    assert tiny_server.engine.runner.attention_kernel and not split.engine.runner.attention_kernel
    prompts = ["Hello", "The capital of France is", "def add(a, b):", "Numbers like 12345"]

    def answer(server: JAXServer, prompt: str) -> tuple[str, int]:
        return list(server.process(prompt, greedy=True, max_new_tokens=24))[-1]

    with ThreadPoolExecutor(len(prompts)) as pool:  # batched in the engine, on both meshes
        sharded = list(pool.map(lambda p: answer(tiny_server, p), prompts))
        assert list(pool.map(lambda p: answer(single, p), prompts)) == sharded
        assert list(pool.map(lambda p: answer(split, p), prompts)) == sharded
    single.shutdown()
    split.shutdown()


def test_auto_dtype_is_bf16_only_where_the_matmul_kernel_serves_it():
    """bf16 weights pay on a CPU only through the bf16 matmul kernel (AVX512-BF16, weights whole on one
    device); explicit choices are kept."""
    one_device = JAXServer(tiny.test_config(mesh_axes_shape=(1, 1, 1))).weight_dtype
    assert one_device == ("bfloat16" if cpu_kernels.bf16_gemm_available() else "float32")
    assert JAXServer(tiny.test_config(mesh_axes_shape=(1, 2, 1))).weight_dtype == "float32"
    assert JAXServer(tiny.test_config(dtype="bf16", mesh_axes_shape=(1, 2, 1))).weight_dtype == "bfloat16"


@pytest.mark.parametrize(("kv_cache_dtype", "storage"), [("bf16", jnp.uint16), ("fp16", jnp.float16)])
def test_16_bit_kv_caches_take_half_the_memory_and_answer(tiny_llama_dir, kv_cache_dtype, storage):
    """kv_cache_dtype="bf16" or "fp16": the cache holds bf16 bits as uint16, or float16, half of float32's
    bytes, and greedy answers come back whole. Their tokens may differ from a float32 cache's after a few
    (bf16's did for SmolLM2), so the values are checked to tolerance in test_cpu_kernels and test_model."""
    settings = {"mesh_axes_shape": (1, 1, 1), "dtype": "bf16"}
    half = JAXServer.load(tiny_llama_dir, config=tiny.test_config(kv_cache_dtype=kv_cache_dtype, **settings))
    full = JAXServer.load(tiny_llama_dir, config=tiny.test_config(kv_cache_dtype="fp32", **settings))
    try:
        assert half.engine.runner.cache.k[0].dtype == storage
        assert full.engine.runner.cache.k[0].dtype == jnp.float32
        assert half.engine.runner.cache_bytes * 2 == full.engine.runner.cache_bytes
        text, tokens = list(half.process("Hello", greedy=True, max_new_tokens=12))[-1]
        assert tokens == 12 and text
    finally:
        half.shutdown()
        full.shutdown()


def test_auto_kv_cache_is_float16_where_the_kernel_reads_it_and_float32_elsewhere(tiny_llama_dir, caplog):
    """The default cache: float16 on one device (the attention kernel reads it); float32 on a split mesh,
    where XLA's attention would read it, without a warning (nothing was asked for explicitly)."""
    one = JAXServer.load(tiny_llama_dir, config=tiny.test_config(mesh_axes_shape=(1, 1, 1)))
    split = JAXServer.load(tiny_llama_dir, config=tiny.test_config(mesh_axes_shape=(1, 1, 2)))
    try:
        assert one.engine.runner.cache.k[0].dtype == jnp.float16
        assert split.engine.runner.cache.k[0].dtype == jnp.float32
        assert [s.engine.stats()["kv_cache"]["dtype"] for s in (one, split)] == ["float16", "float32"]
        assert "kv_cache_dtype" not in caplog.text
    finally:
        one.shutdown()
        split.shutdown()


def test_mesh_larger_than_the_machine_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match="needs 16 devices"):
        JAXServer.load(tiny_llama_dir, config=tiny.test_config(mesh_axes_shape=(2, 8, 1)))


def test_configure_generate_functions_can_be_overridden(tiny_llama_dir):
    calls = []

    class Custom(JAXServer):
        def configure_generate_functions(self, model, tokenizer):
            calls.append(model.architecture)
            super().configure_generate_functions(model, tokenizer)

    server = Custom.load(tiny_llama_dir, config=tiny.test_config())
    assert calls == ["LlamaForCausalLM"] and server.ready


def test_prompt_builders_replaced_by_a_subclass_are_used_by_every_route(tiny_llama_dir):
    """The seed format's conversation goes through build_chat_prompt, the template's turns through
    build_messages_prompt, as the seed's subclasses expect."""

    class Custom(JAXServer):
        def build_chat_prompt(self, prompt, history=(), system=None):
            return "CHAT:" + super().build_chat_prompt(prompt, history, system)

        def build_messages_prompt(self, messages):
            return "MESSAGES:" + super().build_messages_prompt(messages)

    seed = Custom.load(tiny_llama_dir, config=tiny.test_config(prompt_format="seed"))
    assert seed.build_messages_prompt([{"role": "user", "content": "Hi"}]).startswith("MESSAGES:CHAT:")
    template = Custom.load(tiny_llama_dir, config=tiny.test_config(prompt_format="template"))
    assert template.build_chat_prompt("Hi").startswith("CHAT:MESSAGES:<|im_start|>")
    assert template.build_instruct_prompt("Hi").startswith("MESSAGES:<|im_start|>")
