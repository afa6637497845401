"""Load a GGUF file (llama.cpp's format): hyperparameters, weights (Q4_0, Q4_1 and Q8_0 matmul weights
kept as their codes where asked, everything else dequantized), tokenizer, chat template."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxserver.errors import ModelLoadError
from jaxserver.model import quant
from jaxserver.model.config import ModelConfig
from jaxserver.model.hf import params_from_hf_names
from jaxserver.model.llama import Params
from jaxserver.model.tokenizer import Tokenizer, byte_level_bpe_from_gguf

log = logging.getLogger(__name__)

# GGUF `general.architecture` -> the Hugging Face architecture it corresponds to.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name.startswith("blk."):
        _, index, rest = gguf_name.split(".", 2)
        if rest in _LAYER_TENSORS:
            return f"model.layers.{index}.{_LAYER_TENSORS[rest]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's Q/K rows from the (first half, second half)
    rotary layout to interleaved pairs. Works for weights [out, in] and biases [out]."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


class GGUFFile:
    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as exc:  # the reader raises several types for a file that is not GGUF
            raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
        self.fields: dict[str, Any] = {}
        for name, field in self.reader.fields.items():
            if name.startswith("tokenizer.ggml.") and name.rsplit(".", 1)[1] in (
                "tokens",
                "merges",
                "token_type",
            ):
                continue  # large arrays, read on demand
            self.fields[name] = field.contents()

    def array_field(self, name: str) -> list[Any]:
        field = self.reader.fields.get(name)
        return [] if field is None else field.contents()

    def model_config(self) -> ModelConfig:
        arch = self.fields.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r} in {self.path}; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

        def meta(key: str, default: Any = None) -> Any:
            value = self.fields.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelLoadError(f"{self.path} lacks the metadata key {arch}.{key}")
            return value

        heads = meta("attention.head_count")
        hidden = meta("embedding_length")
        tensor_names = {t.name for t in self.reader.tensors}
        rope_scaling = None
        if self.fields.get(f"{arch}.rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
        if "rope_freqs.weight" in tensor_names:
            factors = next(t for t in self.reader.tensors if t.name == "rope_freqs.weight")
            rope_scaling = {
                "rope_type": "freq_factors",
                "factors": [float(x) for x in np.asarray(factors.data)],
            }
        eos = [self.fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return ModelConfig(
            vocab_size=self.fields.get(f"{arch}.vocab_size")
            or len(self.array_field("tokenizer.ggml.tokens")),
            hidden_size=hidden,
            intermediate_size=meta("feed_forward_length"),
            num_layers=meta("block_count"),
            num_heads=heads,
            num_kv_heads=meta("attention.head_count_kv", heads),
            head_dim=meta("attention.key_length", hidden // heads),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            max_position_embeddings=meta("context_length", 2048),
            architecture=GGUF_ARCHITECTURES[arch],
            bos_token_id=self.fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
        )

    def params(self, cfg: ModelConfig, dtype: np.dtype, keep_codes: bool = False) -> Params:
        """The weights, dequantized to `dtype`; with `keep_codes`, matmul weights and the embedding in a
        format `quant.from_gguf` reads stay as their codes (`quant.QuantizedWeight`, [in, out])."""
        from gguf.quants import dequantize

        started = time.perf_counter()
        by_hf_name = {hf_name(t.name): t for t in self.reader.tensors if hf_name(t.name)}
        permute = self.fields["general.architecture"] == "llama"

        def get(name: str) -> Any:
            tensor = by_hf_name.get(name)
            if tensor is None:
                raise ModelLoadError(f"tensor for {name!r} is missing from {self.path}")
            if keep_codes and tensor.tensor_type in quant.GGUF_FORMATS and _is_matmul(name):
                return self._codes(tensor, name, cfg, permute)
            try:
                weight = dequantize(tensor.data, tensor.tensor_type)
            except NotImplementedError as exc:
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                    "package cannot dequantize"
                ) from exc
            if permute and ".q_proj." in name:
                weight = unpermute_rope_rows(weight, cfg.num_heads)
            elif permute and ".k_proj." in name:
                weight = unpermute_rope_rows(weight, cfg.num_kv_heads)
            return weight

        groups = 12 if cfg.attention_bias else 9
        kept = "codes kept" if keep_codes else "dequantizing"
        # A bar only on a terminal (disable=None): in a log file it is noise.
        with tqdm(total=groups, desc=kept, unit="tensor group", leave=False, disable=None) as bar:
            params = params_from_hf_names(cfg, get, dtype, progress=lambda: bar.update(1))
        log.info(
            "read %d tensors (%s) in %.1f s", len(self.reader.tensors), kept, time.perf_counter() - started
        )
        return params

    @staticmethod
    def _codes(tensor: Any, name: str, cfg: ModelConfig, permute: bool) -> quant.QuantizedWeight:
        weight = quant.from_gguf(np.asarray(tensor.data), tensor.tensor_type, int(tensor.shape[0]))
        heads = {".q_proj.": cfg.num_heads, ".k_proj.": cfg.num_kv_heads}
        for part, count in heads.items():
            if permute and part in name:  # the same reorder of outputs as unpermute_rope_rows, as a gather
                order = unpermute_rope_rows(np.arange(weight.shape[-1]), count)
                weight = quant.take_outputs(weight, order)
        return weight

    def tokenizer(self, cfg: ModelConfig) -> Tokenizer:
        kind = self.fields.get("tokenizer.ggml.model")
        template = self.fields.get("tokenizer.chat_template")
        if kind == "gpt2":
            hf_tok = byte_level_bpe_from_gguf(
                tokens=self.array_field("tokenizer.ggml.tokens"),
                token_types=self.array_field("tokenizer.ggml.token_type"),
                merges=self.array_field("tokenizer.ggml.merges"),
                pre=self.fields.get("tokenizer.ggml.pre", "default"),
                special_ids={
                    n: self.fields.get(f"tokenizer.ggml.{n}_token_id") for n in ("bos", "eos", "unk", "pad")
                },
                chat_template=template,
            )
        else:
            # SentencePiece-style vocabularies: transformers' own GGUF conversion (needs no torch for this).
            from transformers import AutoTokenizer

            hf_tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            if template and not getattr(hf_tok, "chat_template", None):
                hf_tok.chat_template = template
        return Tokenizer(hf_tok, extra_eos_ids=cfg.eos_token_ids)


def _is_matmul(hf_tensor: str) -> bool:
    return hf_tensor.endswith("proj.weight") or hf_tensor in ("lm_head.weight", "model.embed_tokens.weight")


def load_gguf(path: Path, dtype: np.dtype, keep_codes: bool = False) -> tuple[ModelConfig, Params, Tokenizer]:
    gguf_file = GGUFFile(path)
    cfg = gguf_file.model_config()
    return cfg, gguf_file.params(cfg, dtype, keep_codes), gguf_file.tokenizer(cfg)
