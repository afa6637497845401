"""jaxserver's own checkpoint: params as safetensors (flattened pytree paths) plus a JSON model config and
the tokenizer files, all in one folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxserver.errors import ModelLoadError
from jaxserver.model import quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.tokenizer import Tokenizer

CONFIG_FILE = "jaxserver_model.json"
WEIGHTS_FILE = "jaxserver_params.safetensors"
_SEP = "/"
# The safetensors metadata key naming the quantized weights: {name: [bits, group]}, their codes, scales and
# mins stored under name/codes, name/scales and name/mins.
QUANTIZED_KEY = "jaxserver.quantized"


def flatten(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + _SEP)
        elif quant.is_quantized(value):
            parts = {"codes": value.codes, "scales": value.scales, "mins": value.mins}
            flat |= flatten({k: v for k, v in parts.items() if v is not None}, name + _SEP)
        else:
            # safetensors writes an array's buffer as it lies: a transposed view must be laid out first.
            flat[name] = np.ascontiguousarray(jax.device_get(value))
    return flat


def quantized_names(params: Params, prefix: str = "") -> dict[str, list[int]]:
    """The quantized weights' names in `flatten`'s terms, with their bits and group."""
    names: dict[str, list[int]] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            names |= quantized_names(value, f"{prefix}{key}{_SEP}")
        elif quant.is_quantized(value):
            names[f"{prefix}{key}"] = [value.bits, value.group]
    return names


def unflatten(flat: dict[str, np.ndarray], quantized: dict[str, list[int]] | None = None) -> Params:
    params: Params = {}
    for name, value in flat.items():
        *parents, leaf = name.split(_SEP)
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    for name, (bits, group) in (quantized or {}).items():
        *parents, leaf = name.split(_SEP)
        node = params
        for parent in parents:
            node = node[parent]
        parts = node[leaf]
        node[leaf] = quant.QuantizedWeight(parts["codes"], parts["scales"], parts.get("mins"), bits, group)
    return params


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).exists()


def save_checkpoint(path: Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer) -> None:
    path.mkdir(parents=True, exist_ok=True)
    metadata = {QUANTIZED_KEY: json.dumps(quantized_names(params))}
    save_file(flatten(params), str(path / WEIGHTS_FILE), metadata=metadata)
    (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))
    tokenizer.save(str(path))


def load_checkpoint(path: Path, dtype: np.dtype) -> tuple[ModelConfig, Params, Tokenizer]:
    from jaxserver.model.hf import load_hf_tokenizer

    cfg = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise ModelLoadError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    with safe_open(str(weights), framework="numpy") as f:
        quantized = json.loads((f.metadata() or {}).get(QUANTIZED_KEY, "{}"))
    params = jax.tree.map(
        lambda a: a if quant.is_quantized(a) else a.astype(dtype, copy=False),
        unflatten(load_file(str(weights)), quantized),
        is_leaf=quant.is_quantized,
    )
    return cfg, params, load_hf_tokenizer(path, cfg)
