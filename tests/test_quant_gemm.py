"""The quantized-weight matmul kernel (kernels/quant_gemm.cc) against NumPy, and the tiled layout it reads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.model import cpu_kernels, quant

needs_quant_gemm = pytest.mark.skipif(
    not cpu_kernels.quant_gemm_available(),
    reason="this CPU has no AVX2, FMA and F16C (XLA's dot runs instead)",
)
FORMATS = [(4, 32), (4, 64), (8, 32), (8, 128)]


def quantized(
    rng: np.random.Generator, inner: int, outer: int, bits: int, group: int
) -> quant.QuantizedWeight:
    w = rng.standard_normal((inner, outer)).astype(np.float32) * 0.05
    return jax.tree.map(jnp.asarray, quant.quantize(w, bits, group))


def error_bound(x: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """What the kernel may differ from x @ w by: each block of 32 inputs of a row is rounded to int16 codes
    of step max |x| / 32767 (half a step at most), and the float32 sums of the blocks round a little."""
    rows = x.shape[0]
    step = np.abs(x.reshape(rows, -1, quant.BLOCK)).max(axis=-1) / 32767
    per_input = np.repeat(step / 2, quant.BLOCK, axis=1)  # [rows, inner]
    return per_input @ np.abs(dense) + 1e-6 * (np.abs(x) @ np.abs(dense)) + 1e-30


SHAPES = [(32, 16), (256, 48), (96, 960), (128, 16 * 70)]


@needs_quant_gemm
@pytest.mark.parametrize(
    ("bits", "group", "inner", "outer"),
    [(*fmt, *shape) for fmt in FORMATS for shape in SHAPES if shape[0] % fmt[1] == 0],
)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 65])
def test_the_kernel_multiplies_as_numpy_does(bits, group, inner, outer, rows):
    """Every block of rows (1-4 and what is left), a second item of rows (past 64), one block of inputs,
    groups wider than a block, one tile of columns, and enough tiles for items of several."""
    rng = np.random.default_rng(rows * inner + outer + bits)
    weight = quantized(rng, inner, outer, bits, group)
    x = rng.standard_normal((rows, inner)).astype(np.float32)
    x[:, :32] *= 1000  # blocks of very different size: each takes its own scale
    dense = np.asarray(quant.dequantize(weight), np.float64)
    got = np.asarray(jax.jit(quant.linear)(x, quant.tiled(weight)), np.float64)
    expected = x.astype(np.float64) @ dense
    assert np.all(np.abs(got - expected) <= error_bound(x.astype(np.float64), dense))


@needs_quant_gemm
@pytest.mark.parametrize(("bits", "group"), FORMATS[::2])
def test_rows_do_not_depend_on_the_batch(bits, group):
    """A row's result is bit-identical alone, in a few-rows call and in a many-rows one."""
    rng = np.random.default_rng(bits)
    weight = quant.tiled(quantized(rng, 576, 960, bits, group))
    x = rng.standard_normal((130, 576)).astype(np.float32)
    gemm = jax.jit(quant.linear)
    whole = np.asarray(gemm(x, weight))
    for rows in (slice(0, 1), slice(7, 8), slice(3, 5), slice(1, 4), slice(60, 130)):
        np.testing.assert_array_equal(np.asarray(gemm(x[rows], weight)), whole[rows])


@needs_quant_gemm
def test_a_row_of_zeros_gives_zeros_and_leaves_its_neighbours_alone():
    rng = np.random.default_rng(3)
    weight = quant.tiled(quantized(rng, 64, 32, 4, 32))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[1] = 0
    x[2, 32:] = 0
    got = np.asarray(quant.linear(x, weight))
    np.testing.assert_array_equal(got[1], 0)
    np.testing.assert_array_equal(got[0], np.asarray(quant.linear(x[:1], weight))[0])


@needs_quant_gemm
def test_the_kernel_refuses_a_weight_not_tiled_for_it():
    with pytest.raises(jax.errors.JaxRuntimeError, match="quant.tiled"):
        codes = jnp.zeros((2, 3, 100), jnp.uint8)
        scales = jnp.zeros((2, 3, 16), jnp.float16)
        jax.block_until_ready(cpu_kernels.quant_gemm(np.zeros((1, 96), np.float32), codes, scales, scales))


@pytest.mark.parametrize("bits", [4, 8])
def test_tiling_moves_codes_without_changing_them(bits):
    """`tiled` and `untiled` invert each other, columns taken from a tiled weight (a tied embedding's rows)
    equal those of the weight, and both dequantize alike."""
    weight = quantized(np.random.default_rng(bits), 64, 96, bits, 32)
    tiled = quant.tiled(weight)
    assert tiled.shape == weight.shape == (64, 96) and tiled.nbytes == weight.nbytes
    for got, want in zip(jax.tree.leaves(quant.untiled(tiled)), jax.tree.leaves(weight), strict=True):
        np.testing.assert_array_equal(got, want)
    index = jnp.array([5, 0, 95, 17, 17, 40])
    taken, expected = quant.take_outputs(tiled, index), quant.take_outputs(weight, index)
    for got, want in zip(jax.tree.leaves(taken), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(quant.dequantize(tiled), quant.dequantize(weight))
