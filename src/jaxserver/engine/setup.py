"""From a config and a placed model to a started `Engine`: the weight and KV cache dtypes this machine
serves best, the runner, its compilation before ready, and the rarer shapes compiled beside serving."""

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
from jaxserver.engine.runner import Runner, kernel_fits, prompt_buckets
from jaxserver.model import cpu_kernels
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.tokenizer import Tokenizer
from jaxserver.parallel.mesh import cache_sharding

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
    devices = math.prod(jax.device_count() if size == -1 else size for size in config.mesh_axes_shape)
    return "bfloat16" if devices == 1 and cpu_kernels.bf16_gemm_available() else "float32"


def kv_cache_dtype(config: JAXServerConfig, model: ModelConfig, sharding: jax.sharding.Sharding) -> jnp.dtype:
    """The KV cache's entry dtype: the config's, with "auto" resolved. A 16-bit cache only where the decode
    attention kernel reads it: XLA's attention over one is several times slower (docs/performance.md)."""
    wanted = config.kv_cache_dtype
    if wanted == "fp32":
        return jnp.dtype(jnp.float32)
    dtype = jnp.dtype(KV_CACHE_DTYPES["fp16" if wanted == "auto" else wanted])
    if kernel_fits(model, dtype, sharding):
        return dtype
    if wanted != "auto":
        log.warning(
            "kv_cache_dtype %s needs the decode attention kernel (one device's whole cache, supported "
            "heads, a C++ compiler); the KV cache stays float32",
            wanted,
        )
    return jnp.dtype(jnp.float32)


def start_engine(
    config: JAXServerConfig, model: ModelConfig, params: Params, tokenizer: Tokenizer, mesh: jax.sharding.Mesh
) -> Engine:
    """Build the runner over `params` (already placed on `mesh`), compile the common shapes when the config
    warms up, and start the engine that batches every request."""
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    slots = config.max_batch_size
    sharding = cache_sharding((slots, model.num_kv_heads, config.max_length, model.head_dim), mesh)
    cache_dtype = kv_cache_dtype(config, model, sharding)
    runner = Runner(
        model,
        params,
        slots=slots,
        cache_len=config.max_length,
        steps_per_call=config.max_compile_tokens,
        eos_ids=tokenizer.eos_token_ids,
        cache_dtype=cache_dtype,
        cache_sharding=sharding,
    )
    log.info(
        "KV cache: %.1f MiB for %d slots x %d tokens (%s)",
        runner.cache_bytes / 2**20,
        slots,
        config.max_length,
        cache_dtype.name,
    )
    later_shapes = []
    if config.warm_up:
        started = time.perf_counter()
        later_shapes = runner.warm_up(prompt_buckets(min(config.prefill_chunk_tokens, config.max_length)))
        log.info("warmed up in %.1f s", time.perf_counter() - started)
    engine = Engine(
        runner,
        tokenizer,
        max_waiting=config.max_waiting_requests,
        prefill_chunk_tokens=config.prefill_chunk_tokens,
        prefill_budget_tokens=config.prefill_budget_tokens,
        left_pad=config.use_prefix_tokenizer,
        reuse_prefixes=config.enable_prefix_caching,
    )
    engine.start()
    if later_shapes:
        threading.Thread(
            target=_compile_ahead, args=(runner, later_shapes), name="jaxserver-compile-ahead", daemon=True
        ).start()
    return engine


def _compile_ahead(runner: Runner, shapes: list[tuple[int, int]]) -> None:
    """Compile the rarer decode shapes while the server already serves; a failure here costs only a
    compilation at first use, so it is logged, not raised."""
    try:
        runner.compile_ahead(shapes)
    except Exception:
        log.warning("compiling decode shapes ahead failed", exc_info=True)
