"""The CPU kernels against float64 numpy references: decode attention (and against the model's XLA
attention) on random queries and float32, float16 or bf16 caches: rows in scattered slots, left-padded starts, ranges
from one position to the whole cache, idle rows, tolerance 1e-5 absolute on outputs of magnitude ~1; the bf16
matmul on bf16-rounded rows, tolerance 1e-5 relative; and the library's build for CPUs without AVX512-BF16."""

import ctypes
import platform
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.model import cpu_kernels, llama

ATOL = 1e-5


def test_kernel_is_built_here():
    """CI has a C++ compiler, so the engine's fast path must not silently fall back."""
    assert cpu_kernels.available()


def test_heads_beyond_the_kernels_limits_are_refused_not_miscomputed():
    """The Python limits match the C++ ones: the kernel itself rejects a group one past the limit."""
    assert cpu_kernels.takes_heads(cpu_kernels.MAX_GROUP, cpu_kernels.MAX_HEAD_DIM)
    assert not cpu_kernels.takes_heads(cpu_kernels.MAX_GROUP + 1, 64)
    assert not cpu_kernels.takes_heads(1, cpu_kernels.MAX_HEAD_DIM + cpu_kernels.HEAD_DIM_MULTIPLE)
    assert not cpu_kernels.takes_heads(1, 8)  # not whole vectors
    ids = np.zeros((1,), np.int32)
    for group, head_dim in ((cpu_kernels.MAX_GROUP + 1, 16), (1, 8)):
        q = np.zeros((1, 1, group, head_dim), np.float32)
        new = np.zeros((1, 1, head_dim), np.float32)
        keys = np.zeros((1, 1, 1, head_dim, cpu_kernels.KEY_BLOCK), np.float32)
        values = np.zeros((1, 1, 4, head_dim), np.float32)
        with pytest.raises(jax.errors.JaxRuntimeError, match="at most 16 query heads"):
            jax.block_until_ready(cpu_kernels.decode_attention(q, new, new, keys, values, ids, ids, ids))


def in_key_blocks(keys: np.ndarray) -> np.ndarray:
    """Keys [slots, kv_heads, head_dim, length] as the cache holds them (llama.KVCache), zero-padded to
    whole blocks."""
    *lead, head_dim, length = keys.shape
    blocks = llama.key_blocks(length)
    padded = np.zeros((*lead, head_dim, blocks * cpu_kernels.KEY_BLOCK), keys.dtype)
    padded[..., :length] = keys
    return padded.reshape(*lead, head_dim, blocks, cpu_kernels.KEY_BLOCK).swapaxes(-3, -2)


def reference(q, k_cache, v_cache, slot_ids, starts, ends) -> np.ndarray:
    """Softmax attention per (row, kv head) over positions starts..ends, in float64; idle rows: zeros."""
    batch, head_dim = q.shape[0], q.shape[-1]
    out = np.zeros(q.shape)
    for b in range(batch):
        if ends[b] >= k_cache.shape[-1]:
            continue
        keys = k_cache[slot_ids[b], :, :, starts[b] : ends[b] + 1].astype(np.float64)  # [K, D, n]
        values = v_cache[slot_ids[b], :, starts[b] : ends[b] + 1].astype(np.float64)  # [K, n, D]
        scores = np.einsum("kgd,kdn->kgn", q[b], keys) / np.sqrt(head_dim)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[b] = np.einsum("kgn,knd->kgd", probs, values)
    return out


@pytest.mark.parametrize(
    ("kv_heads", "group", "head_dim", "length"),
    # SmolLM2's heads; then group sizes and head widths that take the kernel's other instantiations and
    # value-block widths (16 x 16 floats, 3 vectors of 48, 4 blocks of 256); a cache shorter than a block.
    [(3, 3, 64, 200), (2, 4, 32, 70), (1, 1, 128, 130), (2, 16, 16, 150), (1, 7, 48, 140), (1, 2, 256, 40)],
)
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
def test_kernel_matches_reference_and_xla(kv_heads, group, head_dim, length, cache_dtype):
    """Each row's new key and value land at its end position, converted as `llama.to_cache` converts
    them (bit for bit), and nowhere else; then the reference attends over the caches so updated, reading
    their entries as float32 (a bf16 cache's values, widened exactly). Rows 5 and 6 share slot 3, the
    second attending to the first's new entry, as the tokens of a prompt piece do."""
    rng = np.random.default_rng(head_dim)
    slots, batch = 6, 7
    q = rng.standard_normal((batch, kv_heads, group, head_dim)).astype(np.float32)
    k_new = rng.standard_normal((batch, kv_heads, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((batch, kv_heads, head_dim)).astype(np.float32)
    storage = llama.cache_storage_dtype(cache_dtype)
    k_by_position = rng.standard_normal((slots, kv_heads, head_dim, length))
    k_stored = llama.to_cache(jnp.asarray(in_key_blocks(k_by_position)), storage)
    v_stored = llama.to_cache(jnp.asarray(rng.standard_normal((slots, kv_heads, length, head_dim))), storage)
    slot_ids = np.array([4, 0, 2, 5, 1, 3, 3], np.int32)
    # One position; a left-padded row; a partial last block; the whole cache; an idle row; two rows of
    # one slot.
    starts = np.array([0, 7, 3, 0, 0, 2, 2], np.int32)
    ends = np.array([0, length - 2, length // 2 + 1, length - 1, length, 10, 11], np.int32)
    expected_k = np.array(llama.to_cache(jnp.asarray(k_by_position), storage))
    expected_v = np.array(v_stored)
    for b in range(batch):
        if ends[b] < length:
            expected_k[slot_ids[b], :, :, ends[b]] = llama.to_cache(jnp.asarray(k_new[b]), storage)
            expected_v[slot_ids[b], :, ends[b]] = llama.to_cache(jnp.asarray(v_new[b]), storage)
    expected_k = in_key_blocks(expected_k)
    got, k_written, v_written = map(
        np.asarray,
        jax.jit(cpu_kernels.decode_attention)(q, k_new, v_new, k_stored, v_stored, slot_ids, starts, ends),
    )
    np.testing.assert_array_equal(k_written, expected_k)
    np.testing.assert_array_equal(v_written, expected_v)
    all_slots = jnp.arange(slots)
    k_cache = np.asarray(llama.from_cache(llama.keys_by_position(jnp.asarray(expected_k), all_slots, length)))
    v_cache = np.asarray(llama.from_cache(jnp.asarray(expected_v)))
    np.testing.assert_allclose(got, reference(q, k_cache, v_cache, slot_ids, starts, ends), atol=ATOL)
    assert not got[4].any()

    live = [0, 1, 2, 3, 5, 6]  # the XLA path has no notion of idle rows: compare the live ones
    positions = np.arange(length)
    mask = (positions >= starts[live, None]) & (positions <= ends[live, None])
    xla = llama.decode_attention(
        *map(jnp.asarray, (q[live], expected_k, expected_v, slot_ids[live])), length, jnp.asarray(mask)
    )
    np.testing.assert_allclose(got[live], np.asarray(xla).reshape(got[live].shape), atol=ATOL)


@pytest.mark.parametrize(
    "value",
    # NaN, infinities, ties to even for bf16 (8 bits) and float16 (11), overflow, subnormals of each
    [
        np.nan,
        np.inf,
        -np.inf,
        1 + 2.0**-8,
        1 + 3 * 2.0**-8,
        1 + 2.0**-11,
        1 + 3 * 2.0**-11,
        -3e38,
        7e4,
        1e-40,
        3e-6,
    ],
)
@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_16_bit_cache_entries_round_as_xla_converts(value, cache_dtype):
    """A new entry written by the kernel is XLA's conversion of it, bit for bit (NaN: a NaN)."""
    storage = llama.cache_storage_dtype(cache_dtype)
    q = np.zeros((1, 1, 1, 16), np.float32)
    new = np.full((1, 1, 16), value, np.float32)
    keys = jnp.zeros((1, 1, 1, 16, cpu_kernels.KEY_BLOCK), storage)
    values = jnp.zeros((1, 1, 4, 16), storage)
    _, k_written, _ = cpu_kernels.decode_attention(q, new, new, keys, values, *np.zeros((3, 1), np.int32))
    expected = np.asarray(llama.to_cache(jnp.asarray(new[0, 0]), storage))
    written = np.asarray(k_written)[0, 0, 0, :, 0]
    if np.isnan(value):
        assert np.isnan(np.asarray(llama.from_cache(jnp.asarray(written)))).all()
    else:
        np.testing.assert_array_equal(written, expected)


def clear_kernel_caches() -> None:
    cpu_kernels._load_library.cache_clear()
    cpu_kernels.bf16_gemm_available.cache_clear()


def test_without_a_compiler_the_kernel_is_unavailable_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("JAXSERVER_KERNEL_DIR", str(tmp_path / "kernels"))
    clear_kernel_caches()
    try:
        assert not cpu_kernels.available()
        assert "using XLA's operations instead" in caplog.text and "no-such-compiler" in caplog.text
    finally:
        monkeypatch.undo()
        clear_kernel_caches()
    assert cpu_kernels.available()


needs_bf16_gemm = pytest.mark.skipif(
    not cpu_kernels.bf16_gemm_available(), reason="this CPU has no AVX512-BF16 (XLA's dot runs instead)"
)


@needs_bf16_gemm
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 7, 9, 32, 100, 200])
@pytest.mark.parametrize(("inner", "outer"), [(576, 960), (38, 128), (2, 64), (64, 320)])
def test_bf16_gemm_matches_numpy_on_rounded_rows(rows, inner, outer):
    """Every row-block size (6 and what is left of it), row counts past one work item (96 rows), split in
    two items over few tiles (960 columns: 15 tiles), and that leave a partial conversion vector, K of a single pair, and tile counts that leave single tiles
    beside the few-rows regime's wide items (5 tiles: 4 + 1, 3 + 2 and 2 + 2 + 1). The reference rounds
    x to bf16 as the kernel does; the sums are float32 in a different order than float64's."""
    rng = np.random.default_rng(rows * inner + outer)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((inner, outer)), jnp.bfloat16)
    x_rounded = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    expected = x_rounded @ np.asarray(w.astype(jnp.float32), np.float64)
    got = np.asarray(jax.jit(cpu_kernels.bf16_gemm)(x, cpu_kernels.pack_bf16_weight(w)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(inner))


@needs_bf16_gemm
def test_bf16_gemm_rows_do_not_depend_on_the_batch():
    """A row's result is bit-identical alone, in a few-rows call and in a many-rows one."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((130, 576)).astype(np.float32)
    packed = cpu_kernels.pack_bf16_weight(jnp.asarray(rng.standard_normal((576, 960)), jnp.bfloat16))
    gemm = jax.jit(cpu_kernels.bf16_gemm)
    whole = np.asarray(gemm(x, packed))
    for rows in (slice(0, 1), slice(3, 5), slice(100, 130)):
        np.testing.assert_array_equal(np.asarray(gemm(x[rows], packed)), whole[rows])


def test_bf16_weights_pack_only_in_whole_tiles():
    assert not cpu_kernels.bf16_gemm_takes(16, 100) and not cpu_kernels.bf16_gemm_takes(15, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        cpu_kernels.pack_bf16_weight(jnp.zeros((16, 100), jnp.bfloat16))


@needs_bf16_gemm
def test_bf16_gemm_refuses_unpacked_weights():
    with pytest.raises(jax.errors.JaxRuntimeError, match="pack_bf16_weight"):
        jax.block_until_ready(
            cpu_kernels.bf16_gemm(np.zeros((9, 16), np.float32), jnp.zeros((8, 4, 64, 2), jnp.bfloat16))
        )


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("g++") is None, reason="builds for another x86-64 CPU"
)
def test_kernels_build_for_a_cpu_without_avx512_bf16(tmp_path):
    """The library must build where the bf16 matmul cannot run (an AVX2 machine: -march=x86-64-v3), or
    the attention kernel would be lost with it; there the matmul says it is unavailable."""
    flags = (*(f for f in cpu_kernels.COMPILE_FLAGS if f != "-march=native"), "-march=x86-64-v3")
    library = tmp_path / "avx2.so"
    cpu_kernels.build_library("g++", library, flags)
    loaded = ctypes.cdll.LoadLibrary(str(library))
    assert loaded.JaxserverHasBf16Gemm() == 0
    assert loaded.JaxserverDecodeAttention and loaded.JaxserverDecodeAttentionBf16


def test_loading_the_kernels_keeps_subnormal_floats():
    """The library is built with -ffast-math but must not switch the process to flush-to-zero when it is
    loaded (GCC's crtfastmath.o does that when -ffast-math reaches the link): numpy, torch or anything
    else in the same process would then compute differently. Checked in a fresh process, on the thread
    that loads the library."""
    script = (
        "import numpy as np\n"
        "from jaxserver.model import cpu_kernels\n"
        "assert cpu_kernels.available()\n"
        "print(float(np.array([1e-40], np.float32)[0] * np.float32(2)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(result.stdout.split()[-1]) == pytest.approx(2e-40, rel=1e-3)
