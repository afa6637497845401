"""Load a Hugging Face model folder: config.json, safetensors (single or sharded), tokenizer files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from jaxserver.errors import ModelLoadError
from jaxserver.model import quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Our per-layer parameter names -> Hugging Face names under `model.layers.{i}.`; `True` marks linear
# weights, which Hugging Face stores [out, in] and we store [in, out].
HF_LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
BIAS_NAMES = ("bq", "bk", "bv")


def params_from_hf_names(
    cfg: ModelConfig,
    get: Callable[[str], np.ndarray],
    dtype: np.dtype,
    progress: Callable[[], None] = lambda: None,
) -> Params:
    """Assemble our parameter pytree from tensors addressed by their Hugging Face names. `get` may give a
    matmul weight (or the embedding) already quantized, [in, out] (a table [hidden, vocab]): it is kept."""

    def ours(tensor: Any, linear: bool) -> Any:
        if quant.is_quantized(tensor):
            return tensor
        tensor = np.asarray(tensor, dtype=dtype)
        return tensor.T.copy() if linear else tensor

    layers: dict[str, Any] = {}
    for name, (theirs, linear) in HF_LAYER_TENSORS.items():
        if name in BIAS_NAMES and not cfg.attention_bias:
            continue
        stacked = [ours(get(f"model.layers.{i}.{theirs}"), linear) for i in range(cfg.num_layers)]
        layers[name] = jax.tree.map(lambda *a: np.stack(a), *stacked)
        progress()
    params: Params = {
        "embed": ours(get("model.embed_tokens.weight"), False),
        "final_norm": ours(get("model.norm.weight"), False),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = ours(get("lm_head.weight"), True)
    return params


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{folder} has no model.safetensors or model.safetensors.index.json; "
            "jaxserver reads safetensors weights (not .bin or .pt)"
        )
    return files


def load_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                tensors[name] = f.get_tensor(name)
    return tensors


def load_hf_folder(folder: Path, dtype: np.dtype) -> tuple[ModelConfig, Params, Tokenizer]:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    cfg = ModelConfig.from_hf(json.loads(config_path.read_text()))
    tensors = load_safetensors(_safetensor_files(folder))

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"tensor {name!r} is missing from the safetensors files in {folder}")
        return tensors[name]

    params = params_from_hf_names(cfg, get, dtype)
    return cfg, params, load_hf_tokenizer(folder, cfg)


def load_hf_tokenizer(folder: Path, cfg: ModelConfig) -> Tokenizer:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise ModelLoadError(f"{folder} has no tokenizer.json or tokenizer_config.json")
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    template_file = folder / "chat_template.jinja"
    if not getattr(hf_tok, "chat_template", None) and template_file.exists():
        hf_tok.chat_template = template_file.read_text()
    return Tokenizer(hf_tok, extra_eos_ids=cfg.eos_token_ids)
