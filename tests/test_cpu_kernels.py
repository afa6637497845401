"""The CPU kernels against float64 numpy references: paged attention on random queries and float32, float16
or bf16 pages (sequences with scattered pages, a prompt piece whose tokens attend to each other's new
entries, positions from the first to a page's last, padding tokens; tolerance 1e-5 absolute on outputs
of magnitude ~1); the bf16 matmul on bf16-rounded rows, tolerance 1e-5 relative; and the library's build
for CPUs without AVX512-BF16."""

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
PAGE = cpu_kernels.KEY_BLOCK  # positions per page


def test_kernel_is_built_here():
    """CI has a C++ compiler, so the engine's fast path must not silently fall back."""
    assert cpu_kernels.available()


def pages_call(q, new, k_pages, v_pages, page_table, token_seqs, positions):
    """paged_attention on layer 0, one new key and value (`new`) for all tokens."""
    return cpu_kernels.paged_attention(q, new, new, k_pages, v_pages, 0, page_table, token_seqs, positions)


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
        keys = np.zeros((1, 1, 1, head_dim, PAGE), np.float32)
        values = np.zeros((1, 1, 1, PAGE, head_dim), np.float32)
        with pytest.raises(jax.errors.JaxRuntimeError, match="at most 16 query heads"):
            jax.block_until_ready(pages_call(q, new, keys, values, ids.reshape(1, 1), ids, ids))


def reference(q, keys, values, token_seqs, positions) -> np.ndarray:
    """Softmax attention per (token, kv head) over its sequence's positions 0..positions[n], in float64,
    from keys [seqs, kv_heads, hd, length] and values [seqs, kv_heads, length, hd]; padding: zeros."""
    out = np.zeros(q.shape)
    for n, (seq, position) in enumerate(zip(token_seqs, positions, strict=True)):
        if seq < 0:
            continue
        k = keys[seq, :, :, : position + 1].astype(np.float64)  # [K, D, n]
        v = values[seq, :, : position + 1].astype(np.float64)  # [K, n, D]
        scores = np.einsum("kgd,kdn->kgn", q[n], k) / np.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[n] = np.einsum("kgn,knd->kgd", probs / probs.sum(-1, keepdims=True), v)
    return out


@pytest.mark.parametrize(
    ("kv_heads", "group", "head_dim"),
    # SmolLM2's heads; then group sizes and head widths that take the kernel's other instantiations and
    # value-block widths (16 x 16 floats, 3 vectors of 48, 4 blocks of 256).
    [(3, 3, 64), (2, 4, 32), (1, 1, 128), (2, 16, 16), (1, 7, 48), (1, 2, 256)],
)
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
def test_paged_kernel_matches_reference(kv_heads, group, head_dim, cache_dtype):
    """Each token's new key and value land at its position in its sequence's page, converted as
    `llama.to_cache` converts them (bit for bit), and nowhere else; then each token attends over its
    sequence's entries so updated (read as float32). Sequence 2's five tokens are a prompt piece across a
    page boundary, each attending to the new entries before it; sequence 1 reads one position only."""
    rng = np.random.default_rng(head_dim + group)
    seqs, max_pages, pool = 3, 6, 20
    length = max_pages * PAGE
    storage = llama.cache_storage_dtype(cache_dtype)
    page_table = rng.permutation(pool)[: seqs * max_pages].reshape(seqs, max_pages).astype(np.int32)
    token_seqs = np.array([0, 1, 2, 2, 2, 2, 2, -1], np.int32)
    positions = np.array([length - 1, 0, 13, 14, 15, 16, 17, 3], np.int32)
    n = len(token_seqs)
    q = rng.standard_normal((n, kv_heads, group, head_dim)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((n, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    k_pages = np.asarray(
        llama.to_cache(jnp.asarray(rng.standard_normal((1, pool, kv_heads, head_dim, PAGE))), storage)
    )
    v_pages = np.asarray(
        llama.to_cache(jnp.asarray(rng.standard_normal((1, pool, kv_heads, PAGE, head_dim))), storage)
    )
    expected_k, expected_v = k_pages.copy(), v_pages.copy()
    for i in range(n - 1):
        page, lane = page_table[token_seqs[i], positions[i] // PAGE], positions[i] % PAGE
        expected_k[0, page, :, :, lane] = llama.to_cache(jnp.asarray(k_new[i]), storage)
        expected_v[0, page, :, lane] = llama.to_cache(jnp.asarray(v_new[i]), storage)
    args = (q, k_new, v_new, k_pages, v_pages, 0, page_table, token_seqs, positions)
    got, k_written, v_written = map(np.asarray, jax.jit(cpu_kernels.paged_attention)(*args))
    np.testing.assert_array_equal(k_written, expected_k)
    np.testing.assert_array_equal(v_written, expected_v)
    keys = np.asarray(llama.from_cache(jnp.asarray(expected_k[0][page_table])))  # [S, P, K, D, 16]
    keys = keys.transpose(0, 2, 3, 1, 4).reshape(seqs, kv_heads, head_dim, length)
    values = np.asarray(llama.from_cache(jnp.asarray(expected_v[0][page_table])))  # [S, P, K, 16, D]
    values = values.transpose(0, 2, 1, 3, 4).reshape(seqs, kv_heads, length, head_dim)
    np.testing.assert_allclose(got, reference(q, keys, values, token_seqs, positions), atol=ATOL)
    assert not got[-1].any()


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
    keys = jnp.zeros((1, 1, 1, 16, PAGE), storage)
    values = jnp.zeros((1, 1, 1, PAGE, 16), storage)
    zeros = np.zeros((1,), np.int32)
    _, k_written, _ = pages_call(q, new, keys, values, zeros.reshape(1, 1), zeros, zeros)
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
    the attention kernel would be lost with it; there the bf16 matmul says it is unavailable, the
    quantized one that it runs."""
    flags = (*(f for f in cpu_kernels.COMPILE_FLAGS if f != "-march=native"), "-march=x86-64-v3")
    library = tmp_path / "avx2.so"
    cpu_kernels.build_library("g++", library, flags)
    loaded = ctypes.cdll.LoadLibrary(str(library))
    assert loaded.JaxserverHasBf16Gemm() == 0 and loaded.JaxserverHasQuantGemm() == 1
    assert loaded.JaxserverPagedAttention and loaded.JaxserverPagedAttentionBf16


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
