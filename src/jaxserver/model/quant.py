"""Weights kept as low-bit codes plus per-group scales (issue 23): the formats, GGUF's blocks read into
them without rounding, quantization at load, and the XLA path that multiplies by them.

A `QuantizedWeight` stands where a dense `[in, out]` matmul weight (or `[..., in, out]`, stacked) stands.
Codes run along the input axis in blocks of 32, the direction GGUF stores them in:

- q4: uint8 codes `[..., in/32, 16, out]`, byte j of a block holding input j (low nibble) and j + 16
  (high); float16 `scales` and `mins` `[..., in/group, out]`; a weight is `scale * code + min`.
- q8: int8 codes `[..., in/32, 32, out]`; float16 `scales`; a weight is `scale * code`.

scale * code is exact in float32 (11 bits times 4 or 8), so dequantizing here gives the same float32
weights as `gguf.quants.dequantize`, bit for bit.

For the CPU matmul kernel a weight is `tiled` once at load: its columns in tiles of `TILE`, each tile's
codes and scales one contiguous stream, laid out as the kernel reads them (`tiled`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from jaxserver.model import cpu_kernels

BLOCK = 32  # inputs per block of codes
TILE = cpu_kernels.QUANT_GEMM_TILE  # columns per tile of a tiled weight
GGUF_FORMATS = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    codes: Any
    scales: Any
    mins: Any  # q4's per-group offsets; None for q8
    bits: int = field(metadata={"static": True})
    group: int = field(metadata={"static": True})  # inputs sharing one scale: a multiple of BLOCK
    tiled: bool = field(default=False, metadata={"static": True})  # in the kernel's layout (`tiled`)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense weight's shape, [..., in, out]."""
        if self.tiled:
            tiles, blocks, _ = self.codes.shape
            return (blocks * BLOCK, tiles * TILE)
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


def tiled(weight: QuantizedWeight) -> QuantizedWeight:
    """A [in, out] weight (out a multiple of TILE) in the kernel's layout (kernels/quant_gemm.cc): codes
    [out/16, in/32, 256] (q4) or [out/16, in/32, 512] (q8), scales and mins [out/16, in/group, 16]."""
    if weight.tiled:
        return weight
    blocks, _, out = weight.codes.shape
    tiles = out // TILE
    if weight.bits == 4:
        # input 4q + 2s + p of column 16t + 8h + c: axes block, quad, set, pair, tile, half, column
        nibbles = _inputs(weight.codes).reshape(blocks, 8, 2, 2, tiles, 2, 8)
        order = nibbles.transpose(4, 0, 1, 5, 6, 3, 2)  # tile, block, quad, half, column, pair, set
        codes = (order[..., 0] | (order[..., 1] << 4)).reshape(tiles, blocks, -1)
    else:
        pairs = weight.codes.reshape(blocks, 16, 2, tiles, 2, 8)  # block, pair, element, tile, half, column
        codes = pairs.transpose(3, 0, 1, 4, 5, 2).reshape(tiles, blocks, -1)
    return QuantizedWeight(
        codes,
        *(_tiled_scales(s) for s in (weight.scales, weight.mins)),
        weight.bits,
        weight.group,
        tiled=True,
    )


def untiled(weight: QuantizedWeight) -> QuantizedWeight:
    """The inverse of `tiled`: the weight in the layout above."""
    if not weight.tiled:
        return weight
    index = jnp.arange(weight.shape[-1])
    return take_outputs(weight, index)


def _inputs(codes: Any) -> Any:
    """q4 codes [..., blocks, 16, out] as one code per input, [..., blocks, 32, out] (a uint8 each)."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    return xp.concatenate([codes & 15, codes >> 4], axis=-2)


def _tiled_scales(scales: Any) -> Any:
    if scales is None:
        return None
    groups, out = scales.shape
    return scales.reshape(groups, out // TILE, TILE).transpose(1, 0, 2)


def dequantize(weight: QuantizedWeight) -> Any:
    """The float32 weight [..., in, out] (a NumPy array for host codes, else a JAX one)."""
    weight = untiled(weight)
    xp = np if isinstance(weight.codes, np.ndarray) else jnp
    codes = _inputs(weight.codes) if weight.bits == 4 else weight.codes
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


def linear(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """x [..., in] @ the weight in float32: through the CPU kernel for a tiled weight, else `linear_xla`."""
    if not weight.tiled:
        return linear_xla(x, weight)
    rows = x.reshape(-1, x.shape[-1])
    product = cpu_kernels.quant_gemm(rows, weight.codes, weight.scales, weight.mins)
    return product.reshape(*x.shape[:-1], -1)


def linear_xla(x: jax.Array, weight: QuantizedWeight) -> jax.Array:
    """x [..., in] @ the weight, in float32: dequantized inside the jitted step, then XLA's dot (for
    backends and meshes the kernel does not serve)."""
    return jnp.matmul(x.astype(jnp.float32), dequantize(weight), preferred_element_type=jnp.float32)


def take_outputs(weight: QuantizedWeight, index: Any) -> QuantizedWeight:
    """The weight of the outputs `index` (their columns), in the layout above: a gather of codes and
    scales, nothing rounded. From a tiled weight only integer indices are taken."""
    if not weight.tiled:
        return jax.tree.map(lambda leaf: leaf[..., index], weight)
    index = jnp.asarray(index)
    tile, half, column = index // TILE, index % TILE // 8, index % 8
    tiles, blocks, _ = weight.codes.shape
    if weight.bits == 4:
        # each index's bytes: [n, blocks, quad, pair], the low nibble set 0 and the high one set 1
        picked = weight.codes.reshape(tiles, blocks, 8, 2, 8, 2)[tile, :, :, half, column, :]
        nibbles = jnp.stack([picked & 15, picked >> 4], axis=-2)  # [n, b, quad, set, pair]: input 4q + 2s + p
        inputs = nibbles.reshape(*index.shape, blocks, 2, 16)  # inputs 0-15 and 16-31 of each block
        codes = jnp.moveaxis(inputs[..., 0, :] | (inputs[..., 1, :] << 4), 0, -1)
    else:
        picked = weight.codes.reshape(tiles, blocks, 16, 2, 8, 2)[
            tile, :, :, half, column, :
        ]  # [n, b, pair, e]
        codes = jnp.moveaxis(picked.reshape(*index.shape, blocks, BLOCK), 0, -1)
    scales = [None if s is None else s[tile, :, index % TILE].T for s in (weight.scales, weight.mins)]
    return QuantizedWeight(codes, *scales, weight.bits, weight.group)


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


# The stacked layers' matmul weights, [layers, in, out]: what quantizing a model's parameters quantizes,
# with the head (a tied embedding's table kept once, as the head's weight [hidden, vocab]).
LAYER_MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def quantize_params(params: dict[str, Any], bits: int, group: int | None) -> dict[str, Any]:
    """A model's host parameters with every float matmul weight quantized to `bits` in groups of `group`
    inputs (None: one group per output, per-channel), the head and a tied embedding included. Weights
    already quantized stay as they are, and so do those whose inputs the group does not divide."""

    def quantized(w: Any) -> Any:
        inputs = w.shape[-2]
        size = inputs if group is None else group
        if is_quantized(w) or inputs % size or size % BLOCK:  # codes already, or no whole groups: as it is
            return w
        return quantize(np.asarray(w, np.float32), bits, size)

    layers = {
        name: quantized(w) if name in LAYER_MATMULS else w for name, w in params.get("layers", {}).items()
    }
    head = {name: w for name, w in params.items() if name != "layers"}
    if "lm_head" in head:
        head["lm_head"] = quantized(head["lm_head"])
    elif "embed" in head:  # a tied table, quantized as the head's weight [hidden, vocab] where it fits
        table = quantized(np.asarray(head["embed"]).T)
        head["embed"] = table if is_quantized(table) else head["embed"]
    return head | ({"layers": layers} if "layers" in params else {})


def dequantize_params(params: dict[str, Any]) -> dict[str, Any]:
    """A model's parameters with every quantized weight dequantized to float32 (a quantized table back to
    [vocab, hidden]), the rest as it was."""
    dense = jax.tree.map(lambda w: dequantize(w) if is_quantized(w) else w, params, is_leaf=is_quantized)
    if is_quantized(params.get("embed")):
        table = dense["embed"].T
        dense["embed"] = np.ascontiguousarray(table) if isinstance(table, np.ndarray) else table
    return dense


def weights_summary(params: dict[str, Any]) -> dict[str, Any]:
    """What /status reports of the weights: their resident bytes and the bits of the codes among them."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    return {
        "bytes": sum(int(leaf.nbytes) for leaf in leaves),
        "quantized_bits": sorted({leaf.bits for leaf in leaves if is_quantized(leaf)}),
    }
