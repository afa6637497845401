"""Weights kept as low-bit codes plus per-group scales (issue 23): the formats, GGUF's blocks read into
them without rounding, quantization at load, and the XLA path that multiplies by them.

A `QuantizedWeight` stands where a dense `[in, out]` matmul weight (or `[..., in, out]`, stacked) stands.
Codes run along the input axis in blocks of 32, the direction GGUF stores them in:

- q4: uint8 codes `[..., in/32, 16, out]`, byte j of a block holding input j (low nibble) and j + 16
  (high); float16 `scales` and `mins` `[..., in/group, out]`; a weight is `scale * code + min`.
- q8: int8 codes `[..., in/32, 32, out]`; float16 `scales`; a weight is `scale * code`.

scale * code is exact in float32 (11 bits times 4 or 8), so dequantizing here gives the same float32
weights as `gguf.quants.dequantize`, bit for bit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

BLOCK = 32  # inputs per block of codes
GGUF_FORMATS = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    codes: Any
    scales: Any
    mins: Any  # q4's per-group offsets; None for q8
    bits: int = field(metadata={"static": True})
    group: int = field(metadata={"static": True})  # inputs sharing one scale: a multiple of BLOCK

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense weight's shape, [..., in, out]."""
        *lead, blocks, _, out = self.codes.shape
        return (*lead, blocks * BLOCK, out)

    @property
    def nbytes(self) -> int:
        return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))


def is_quantized(value: Any) -> bool:
    return isinstance(value, QuantizedWeight)


def from_gguf(raw: np.ndarray, kind: GGMLQuantizationType, inputs: int) -> QuantizedWeight:
    """A GGUF tensor of `kind` (Q4_0, Q4_1 or Q8_0) with `inputs` per row, its raw blocks `raw` (uint8,
    one row of blocks per output), as a weight [inputs, outputs]: the codes moved, nothing rounded."""
    blocks = inputs // BLOCK
    head = 4 if kind == GGMLQuantizationType.Q4_1 else 2  # the bytes of float16 scale (and min) first
    data = np.ascontiguousarray(raw).reshape(-1, blocks, GGML_QUANT_SIZES[kind][1])
    scales = np.ascontiguousarray(data[..., :2]).view(np.float16)[..., 0].T  # [blocks, out]
    codes = np.ascontiguousarray(data[..., head:])
    if kind == GGMLQuantizationType.Q8_0:
        return QuantizedWeight(codes.view(np.int8).transpose(1, 2, 0).copy(), scales.copy(), None, 8, BLOCK)
    if kind == GGMLQuantizationType.Q4_1:
        mins = np.ascontiguousarray(data[..., 2:4]).view(np.float16)[..., 0].T.copy()
    else:  # Q4_0 is scale * (code - 8): a min of -8 scale, exact in float16
        mins = (scales * np.float16(-8)).astype(np.float16)
    return QuantizedWeight(codes.transpose(1, 2, 0).copy(), scales.copy(), mins, 4, BLOCK)


def dequantize(weight: QuantizedWeight) -> Any:
    """The float32 weight [..., in, out] (a NumPy array for host codes, else a JAX one)."""
    xp = np if isinstance(weight.codes, np.ndarray) else jnp
    codes = weight.codes
    if weight.bits == 4:
        codes = xp.concatenate([codes & 15, codes >> 4], axis=-2)  # inputs 0-15, then 16-31 of each block
    *lead, blocks, _, out = codes.shape
    groups = blocks * BLOCK // weight.group
    values = codes.reshape(*lead, groups, weight.group, out).astype(xp.float32)
    scaled = values * weight.scales.astype(xp.float32)[..., None, :]
    if weight.mins is not None:
        scaled = scaled + weight.mins.astype(xp.float32)[..., None, :]
    return scaled.reshape(*lead, blocks * BLOCK, out)


def quantize(weight: np.ndarray, bits: int, group: int) -> QuantizedWeight:
    """A float weight [..., in, out] quantized per group of `group` inputs and per output: q8 symmetric
    (scale = max |w| / 127), q4 asymmetric (min and max of the group onto codes 0-15). Scales and mins
    are rounded to float16 first, and the codes chosen against those rounded values."""
    *lead, inputs, out = weight.shape
    if inputs % group or group % BLOCK:
        raise ValueError(f"a group of {group} inputs must divide the {inputs} inputs and be a multiple of 32")
    grouped = weight.astype(np.float32).reshape(*lead, inputs // group, group, out)
    if bits == 8:
        scales = (np.abs(grouped).max(axis=-2) / 127).astype(np.float16)
        step = np.where(scales == 0, 1, scales).astype(np.float32)[..., None, :]
        codes = np.clip(np.rint(grouped / step), -127, 127).astype(np.int8)
        return QuantizedWeight(_blocked(codes, lead, inputs, out), scales, None, 8, group)
    if bits != 4:
        raise ValueError(f"weights quantize to 4 or 8 bits, not {bits}")
    low, high = grouped.min(axis=-2), grouped.max(axis=-2)
    mins = low.astype(np.float16)
    scales = ((high - mins.astype(np.float32)) / 15).astype(np.float16)
    step = np.where(scales == 0, 1, scales).astype(np.float32)[..., None, :]
    codes = np.clip(np.rint((grouped - mins.astype(np.float32)[..., None, :]) / step), 0, 15).astype(np.uint8)
    blocked = _blocked(codes, lead, inputs, out)
    return QuantizedWeight(blocked[..., :16, :] | (blocked[..., 16:, :] << 4), scales, mins, 4, group)


def _blocked(codes: np.ndarray, lead: list[int], inputs: int, out: int) -> np.ndarray:
    return codes.reshape(*lead, inputs // BLOCK, BLOCK, out)


def linear_xla(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """x [..., in] @ the weight, in float32: dequantized inside the jitted step, then XLA's dot (for
    backends and meshes the kernel does not serve)."""
    return jnp.matmul(x.astype(jnp.float32), dequantize(weight), preferred_element_type=jnp.float32)


def take_outputs(weight: QuantizedWeight, index: Any) -> QuantizedWeight:
    """The weight of the outputs `index` (their columns): a gather of codes and scales, nothing rounded."""
    return jax.tree.map(lambda leaf: leaf[..., index], weight)


def concat_outputs(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights of the same format side by side along the output axis (Q, K and V into one product)."""
    xp = np if isinstance(weights[0].codes, np.ndarray) else jnp
    return jax.tree.map(lambda *leaves: xp.concatenate(leaves, axis=-1), *weights)


def split_outputs(weight: QuantizedWeight, at: tuple[int, ...]) -> list[QuantizedWeight]:
    """The inverse of `concat_outputs`: the weight cut along the output axis at the indices `at`."""
    edges = (0, *at, weight.shape[-1])
    return [take_outputs(weight, slice(start, end)) for start, end in itertools.pairwise(edges)]


def join_outputs(parts: list[Any]) -> Any:
    """Weights side by side along the output axis: quantized ones of one format stay codes; any other mix
    is joined dense, in float32."""
    if all(is_quantized(p) for p in parts) and len({(p.bits, p.group) for p in parts}) == 1:
        return concat_outputs(parts)
    dense = [dequantize(p) if is_quantized(p) else p for p in parts]
    if any(is_quantized(p) for p in parts):
        dense = [jnp.asarray(p, jnp.float32) for p in dense]
    return jnp.concatenate(dense, axis=-1)


def embedding_rows(table: QuantizedWeight, tokens: jax.Array) -> jax.Array:
    """Rows `tokens` of an embedding kept as its tied head's weight [hidden, vocab] (one copy serves both),
    dequantized: [*tokens.shape, hidden] float32."""
    columns = dequantize(take_outputs(table, tokens.reshape(-1)))  # [hidden, tokens]
    return columns.T.reshape(*tokens.shape, -1)
