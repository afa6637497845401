"""From a config and a placed model to a started `Engine`: the weight and KV cache dtypes this machine
serves best, the pool's size, the runner, and its compilation before ready."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import jax
import jax.numpy as jnp

from jaxserver.config import JAXServerConfig
from jaxserver.engine.engine import Engine
from jaxserver.engine.executor import Executor
from jaxserver.engine.runner import Runner
from jaxserver.model import cpu_kernels, paged, quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params, cast_params
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.parallel.group import ExecutorSetup, StepChannel
from jaxserver.parallel.mesh import paged_cache_sharding

log = logging.getLogger(__name__)

# The config's 16-bit kv_cache_dtype names -> cache entry dtypes.
KV_CACHE_DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}


def weight_dtype(config: JAXServerConfig) -> str:
    """The weights' dtype: the config's, with "auto" resolved for this machine. On a CPU, bf16 pays only
    through jaxserver's matmul kernel, which needs each weight whole on one device: "auto" picks it only
    for a one-device mesh."""
    name = config.jax_dtype_name
    if name != "auto":
        return name
    if jax.default_backend() != "cpu":
        return "bfloat16"
    return "bfloat16" if _devices(config) == 1 and cpu_kernels.bf16_gemm_available() else "float32"


# The config's quantization names that quantize float weights at load -> bits per code.
QUANTIZATION_BITS = {"int8": 8, "int4": 4}


def serves_codes(config: JAXServerConfig) -> bool:
    """Whether quantized weights are served as their codes: for int8 and int4 always, for "auto" where the
    quantized matmul kernel runs (XLA's path dequantizes every weight in every step, slower than float
    weights)."""
    if config.quantization != "auto":
        return config.quantization != "none"
    return jax.default_backend() == "cpu" and _devices(config) == 1 and cpu_kernels.quant_gemm_available()


def serving_params(config: JAXServerConfig, params: Params, dtype: str) -> Params:
    """Host params as `config` serves them: quantized weights dequantized unless `serves_codes`, float
    matmul weights quantized under int8 and int4, the rest cast to `dtype` (`weight_dtype`)."""
    if not serves_codes(config):
        params = quant.dequantize_params(params)
    bits = QUANTIZATION_BITS.get(config.quantization)
    if bits is not None:
        params = quant.quantize_params(params, bits, None if bits == 8 else config.quantization_group)
    return cast_params(params, jnp.dtype(dtype))


def _devices(config: JAXServerConfig) -> int:
    return math.prod(jax.device_count() if size == -1 else size for size in config.mesh_axes_shape)


def host_dtype(config: JAXServerConfig) -> str:
    """The dtype a model file is read in: float32 for "auto" weights, which may still become bf16 once the
    kernels are known to build (`weight_dtype`), else the weights' own."""
    return "float32" if config.jax_dtype_name == "auto" else weight_dtype(config)


def kv_cache_dtype(config: JAXServerConfig, model: ModelConfig, sharding: jax.sharding.Sharding) -> jnp.dtype:
    """The KV cache's entry dtype: the config's, with "auto" resolved. A 16-bit cache only where the paged
    attention kernel reads it: XLA's attention over one is several times slower (docs/performance.md)."""
    wanted = config.kv_cache_dtype
    if wanted == "fp32":
        return jnp.dtype(jnp.float32)
    dtype = jnp.dtype(KV_CACHE_DTYPES["fp16" if wanted == "auto" else wanted])
    if paged.kernel_fits(model, dtype, sharding):
        return dtype
    if wanted != "auto":
        log.warning(
            "kv_cache_dtype %s needs the paged attention kernel (one device's whole cache, supported "
            "heads, a C++ compiler); the KV cache stays float32",
            wanted,
        )
    return jnp.dtype(jnp.float32)


def kv_cache_pages(config: JAXServerConfig, model: ModelConfig, dtype: jnp.dtype) -> int:
    """Pages of the pool: `kv_cache_tokens`, or by default 1/32 of the machine's memory, at most what
    max_num_seqs requests of max_length tokens could hold, at least one such request."""
    tokens = config.kv_cache_tokens
    if tokens is None:
        per_token = 2 * model.num_layers * model.num_kv_heads * model.head_dim * jnp.dtype(dtype).itemsize
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        tokens = min(memory // 32 // per_token, config.max_num_seqs * config.max_length)
        tokens = max(tokens, config.max_length)
    return -(-tokens // paged.PAGE_TOKENS)


def start_engine(
    config: JAXServerConfig,
    model: ModelConfig,
    params: Params,
    tokenizer: Tokenizer,
    mesh: jax.sharding.Mesh,
    channel: StepChannel | None = None,
) -> Engine:
    """Build the runner over `params` (already placed on `mesh`), compile every shape it runs when the
    config warms up, and start the engine that batches every request. With a `channel` (process 0 of a
    group), the other processes get the runner's settings first and every device call after."""
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    sharding = paged_cache_sharding(model, mesh)
    cache_dtype = kv_cache_dtype(config, model, sharding)
    setup = ExecutorSetup(
        model=model,
        weight_dtype=weight_dtype(config),
        mesh_shape=tuple(mesh.devices.shape),
        attention_kernel=paged.kernel_fits(model, cache_dtype, sharding),
        executor={
            "pages": kv_cache_pages(config, model, cache_dtype),
            "max_num_seqs": config.max_num_seqs,
            "max_length": config.max_length,
            "cache_dtype": cache_dtype.name,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_decode_steps": config.max_compile_tokens,
            "eos_ids": tokenizer.eos_token_ids,
            "compile_lazily": not config.warm_up,
        },
    )
    if channel is not None:
        channel.send(("setup", (setup,)))
    runner = Runner(
        model,
        params,
        **setup.executor,
        cache_sharding=sharding,
        attention=setup.attention(),
        announce=None if channel is None else channel.send,
    )
    log.info(
        "KV cache: %.1f MiB, %d pages of %d tokens (%s), for up to %d requests",
        runner.cache_bytes / 2**20,
        runner.pages,
        paged.PAGE_TOKENS,
        cache_dtype.name,
        config.max_num_seqs,
    )
    if config.warm_up:
        started = time.perf_counter()
        runner.warm_up()
        log.info("warmed up in %.1f s", time.perf_counter() - started)
    engine = Engine(
        runner,
        tokenizer,
        max_waiting=config.max_waiting_requests,
        prefix_caching=config.enable_prefix_caching,
        stall_timeout_s=config.engine_stall_timeout_s,
    )
    engine.start()
    if config.warm_up:
        threading.Thread(
            target=compile_quietly, args=(runner,), name="jaxserver-compile", daemon=True
        ).start()
    return engine


def compile_quietly(runner: Runner | Executor) -> None:
    """Compile the programs warm-up left out while the server already serves (in small steps until
    then); a failure here costs only speed, so it is logged, not raised."""
    try:
        runner.compile_programs()
    except Exception:
        log.warning(
            "compiling the remaining programs failed; serving goes on with those ready", exc_info=True
        )
