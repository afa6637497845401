"""Device mesh from the seed's (dp, fsdp, mp) axes, and shardings for params and the KV cache.

Every array declares its logical axes once (below); one rule table maps logical axes to mesh axes. An
axis whose size does not divide by its mesh axis is replicated instead, so any model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserver.model import quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params

# Logical axes of each parameter (layer weights carry a leading "layers" axis).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads"),
    "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"),
    "wo": ("layers", "heads", "embed"),
    "bq": ("layers", "heads"),
    "bk": ("layers", "kv_heads"),
    "bv": ("layers", "kv_heads"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}
PAGED_CACHE_AXES = ("layers", "pages", "kv_heads", None, None)  # keys and values alike


def logical_rules(axis_names: Sequence[str]) -> dict[str, str]:
    """Logical axis -> mesh axis. The mesh axes are taken by position: data, fully-sharded data, model."""
    data, fsdp, model = axis_names
    return {"batch": data, "embed": fsdp, "vocab": model, "heads": model, "kv_heads": model, "mlp": model}


def make_mesh(
    axis_names: Sequence[str], axis_shape: Sequence[int], devices: Sequence[Any] | None = None
) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(axis_names) != 3:
        raise ValueError(f"the mesh needs three axes (data, fsdp, model), got {tuple(axis_names)}")
    shape = list(axis_shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh_axes_shape {tuple(axis_shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    needed = math.prod(shape)
    if needed > len(devices):
        raise ValueError(
            f"mesh_axes_shape {tuple(axis_shape)} needs {needed} devices, but {len(devices)} are available"
        )
    # A fixed shape smaller than the machine uses the first devices, as a tensor-parallel size would.
    return Mesh(np.asarray(devices[:needed]).reshape(shape), tuple(axis_names))


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
    rules = logical_rules(mesh.axis_names)
    parts = []
    for size, axis in zip(shape, axes, strict=True):
        mesh_axis = rules.get(axis) if axis else None
        fits = mesh_axis is not None and mesh.shape[mesh_axis] > 1 and size % mesh.shape[mesh_axis] == 0
        parts.append(mesh_axis if fits else None)
    return PartitionSpec(*parts)


def param_shardings(params: Params, mesh: Mesh) -> Params:
    def shard(tree: Params) -> Params:
        out: Params = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = shard(value)
            elif quant.is_quantized(value):
                out[name] = quantized_shardings(
                    value, PARAM_AXES["lm_head" if name == "embed" else name], mesh
                )
            else:
                out[name] = NamedSharding(mesh, spec_for(value.shape, PARAM_AXES[name], mesh))
        return out

    return shard(params)


def quantized_shardings(weight: quant.QuantizedWeight, axes: Sequence[str | None], mesh: Mesh) -> Any:
    """A quantized weight's shardings (a table's axes are the head's: it is kept [hidden, vocab]): codes,
    scales and mins split along the outputs and the layers as the dense weight would be, whole along the
    inputs, whose blocks belong together."""
    *lead, _, outputs = axes

    def sharding(leaf: Any) -> NamedSharding:
        leaf_axes = (*lead, *[None] * (leaf.ndim - len(lead) - 1), outputs)
        return NamedSharding(mesh, spec_for(leaf.shape, leaf_axes, mesh))

    return jax.tree.map(sharding, weight)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """Params placed on the mesh. Each process puts only its own devices' shards, from its own copy: with
    several processes, `jax.device_put` would first compare every process's whole copy."""
    if jax.process_count() == 1:
        return jax.device_put(params, param_shardings(params, mesh))

    def place(value: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, params, param_shardings(params, mesh))


def paged_cache_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """The sharding of the paged KV cache's keys and values: kv heads over the model axis where they divide."""
    shape = (cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
    return NamedSharding(mesh, spec_for(shape, PAGED_CACHE_AXES, mesh))
