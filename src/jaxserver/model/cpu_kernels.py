"""Hand-written CPU kernels, compiled on first use and called from jitted code through XLA's FFI.

XLA:CPU has no fused attention: it gathers each row's cache slice into a padded bucket and writes out the
query-times-key products before reducing them (docs/architecture.md, Kernels), and writes new cache entries
by a scatter. `paged_attention` writes each query's new key and value into its page in place and reads
only the positions it attends through its page table, for decode tokens and prompt pieces alike. And XLA's bf16-weight dot
reads the weights well below the memory's bandwidth when only a few rows multiply them, as in a decode step
with few streams: `bf16_gemm`, over weights packed for it once (`pack_bf16_weight`), streams them at close
to the memory's bandwidth for few rows and is faster at many rows too, with AVX512-BF16's dot products, and
gives every row the same result at any batch size (figures: docs/performance.md, "bf16 matmul kernel").
`quant_gemm` multiplies by weights kept as 4-bit or 8-bit codes (model/quant.py) with AVX2's integer
products, reading a 4-bit weight's 0.625 bytes per value where a bf16 copy reads 2, also the same for a
row at any batch size.

The C++ sources ship in `kernels/`; they are compiled with the system's C++ compiler against the FFI headers
jaxlib ships (`jax.ffi.include_dir()`) into one library in `~/.cache/jaxserver/kernels` (or
`$JAXSERVER_KERNEL_DIR`), once per sources, compiler flags and CPU. Where that fails (no compiler, another
backend), `available()` says so, the reason is logged once, and the model runs XLA's operations instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

KERNELS_DIR = Path(__file__).parent / "kernels"
SOURCES = (
    KERNELS_DIR / "paged_attention.cc",
    KERNELS_DIR / "bf16_gemm.cc",
    KERNELS_DIR / "quant_gemm.cc",
)
# The objects the library links, each a source and its macros, compiled side by side: the attention kernel
# once per cache dtype (its instantiations take most of the build).
BUILD_UNITS = (
    *((SOURCES[0], f"-DJAXSERVER_PAGED_CACHE={dtype}") for dtype in (1, 2, 3)),
    (SOURCES[1], ""),
    (SOURCES[2], ""),
)
# Included by the sources, so part of the build's key.
HEADERS = (KERNELS_DIR / "cpu_common.h", KERNELS_DIR / "attention_common.h")
GEMM_TARGET_NAME = "jaxserver_bf16_gemm"
# The quantized matmul's target by bits per code
QUANT_GEMM_TARGETS = {4: "jaxserver_quant_gemm_q4", 8: "jaxserver_quant_gemm_q8"}
QUANT_GEMM_TILE = 16  # kTile in quant_gemm.cc: columns per tile of a tiled weight
# The paged attention kernel's target for each page array dtype (bf16 entries are kept as uint16 bits).
PAGED_TARGETS = {
    jnp.dtype(jnp.float32): "jaxserver_paged_attention",
    jnp.dtype(jnp.float16): "jaxserver_paged_attention_f16",
    jnp.dtype(jnp.uint16): "jaxserver_paged_attention_bf16",
}
# kTileColumns in bf16_gemm.cc: the packed weights' tile width
GEMM_TILE_COLUMNS = 64
# kKeyBlock in attention_common.h: keys come in blocks of this many positions (a page holds one block)
KEY_BLOCK = 16
# -march=native: the library is built on the machine that runs it (the cache key includes the CPU).
# -ffast-math lets the compiler vectorise the softmax's exp and reassociate the sums. It is given to the
# compile steps only: on a link command GCC adds crtfastmath.o, whose constructor turns on flush-to-zero
# for the thread that loads the library, so every numpy or torch computation on it after loading the
# kernels lost subnormal floats (a `hypothesis` run in the test process caught it).
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-std=c++17", "-fPIC")
# The kernel's limits (kMaxGroup, kMaxHeadDim, kLanes in the source): group sizes it is instantiated
# for, and head_dim in whole 16-float vectors; other heads are refused.
MAX_GROUP = 16
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16


def takes_heads(group: int, head_dim: int) -> bool:
    """Whether the kernel handles `group` query heads per kv head of `head_dim` each."""
    return 1 <= group <= MAX_GROUP and head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _library_path(compiler: str) -> Path:
    root = Path(os.environ.get("JAXSERVER_KERNEL_DIR", Path.home() / ".cache" / "jaxserver" / "kernels"))
    key = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in (*SOURCES, *HEADERS)),
        compiler.encode(),
        " ".join(COMPILE_FLAGS).encode(),
        repr(BUILD_UNITS).encode(),
        jax.ffi.include_dir().encode(),
        _cpu_signature().encode(),
    ):
        key.update(part)
    return root / f"jaxserver-kernels-{key.hexdigest()[:16]}.so"


def build_library(compiler: str, output: Path, flags: tuple[str, ...] = COMPILE_FLAGS) -> None:
    """Compile the kernels' build units with `flags`, all at once, and link them into the shared library
    `output`; raises RuntimeError with the compiler's message if a step fails."""
    with tempfile.TemporaryDirectory() as scratch:
        objects = [Path(scratch) / f"unit{i}-{source.stem}.o" for i, (source, _) in enumerate(BUILD_UNITS)]
        compiles = [
            [
                compiler,
                *flags,
                *filter(None, [macro]),
                "-I",
                jax.ffi.include_dir(),
                "-c",
                str(source),
                "-o",
                str(obj),
            ]
            for (source, macro), obj in zip(BUILD_UNITS, objects, strict=True)
        ]
        running = [
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for command in compiles
        ]
        errors = [process.communicate()[1] for process in running]
        for process, stderr in zip(running, errors, strict=True):
            if process.returncode != 0:
                raise RuntimeError(f"building the kernels failed:\n{stderr[-2000:]}")
        link = [compiler, "-shared", *map(str, objects), "-o", str(output)]  # no fast-math here
        result = subprocess.run(link, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"linking the kernels failed:\n{result.stderr[-2000:]}")


def _build() -> Path:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    library = _library_path(compiler)
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed, so concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        partial = Path(scratch) / library.name
        build_library(compiler, partial)
        os.replace(partial, library)
    return library


_BUILD_LOCK = threading.Lock()


def _library() -> ctypes.CDLL | None:
    """The kernels' library, built and its targets registered; None where that fails (logged once)."""
    with _BUILD_LOCK:  # a second thread's first call waits for the first's build instead of repeating it
        return _load_library()


@functools.cache
def _load_library() -> ctypes.CDLL | None:
    if jax.default_backend() != "cpu":
        return None
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        for name, symbol in (
            (GEMM_TARGET_NAME, library.JaxserverBf16Gemm),
            (QUANT_GEMM_TARGETS[4], library.JaxserverQuantGemmQ4),
            (QUANT_GEMM_TARGETS[8], library.JaxserverQuantGemmQ8),
            (PAGED_TARGETS[jnp.dtype(jnp.float32)], library.JaxserverPagedAttention),
            (PAGED_TARGETS[jnp.dtype(jnp.float16)], library.JaxserverPagedAttentionF16),
            (PAGED_TARGETS[jnp.dtype(jnp.uint16)], library.JaxserverPagedAttentionBf16),
        ):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("CPU kernels unavailable, using XLA's operations instead: %s", error)
        return None
    return library


def available() -> bool:
    """Whether the kernels are built and registered (CPU backend only)."""
    return _library() is not None


@functools.cache
def bf16_gemm_available() -> bool:
    """Whether `bf16_gemm` runs here: the kernels are built and the CPU has AVX512-BF16."""
    library = _library()
    return library is not None and bool(library.JaxserverHasBf16Gemm())


def bf16_gemm_takes(inner: int, outer: int) -> bool:
    """Whether `bf16_gemm` takes w [inner, outer] (it works in pairs of rows and tiles of 64 columns)."""
    return inner % 2 == 0 and outer % GEMM_TILE_COLUMNS == 0


def pack_bf16_weight(w: jax.Array) -> jax.Array:
    """w [K, N] as `bf16_gemm` reads it: bfloat16 [N / 64, K / 2, 64, 2], tiles of 64 columns whose row
    pairs (k, k+1) are interleaved column by column (see kernels/bf16_gemm.cc)."""
    inner, outer = w.shape
    if not bf16_gemm_takes(inner, outer):
        raise ValueError(
            f"bf16_gemm takes K even and N a multiple of {GEMM_TILE_COLUMNS}, not [{inner}, {outer}]"
        )
    tiles = w.astype(jnp.bfloat16).reshape(inner // 2, 2, outer // GEMM_TILE_COLUMNS, GEMM_TILE_COLUMNS)
    return tiles.transpose(2, 0, 3, 1)


def unpack_bf16_weight(packed: jax.Array) -> jax.Array:
    """The bfloat16 [K, N] weight that `pack_bf16_weight` packed."""
    tiles, half_inner, tile_columns, _ = packed.shape
    return packed.transpose(1, 3, 0, 2).reshape(half_inner * 2, tiles * tile_columns)


def is_packed(w: jax.Array) -> bool:
    """Whether w is a weight packed by `pack_bf16_weight` (the only 4-dimensional weights)."""
    return w.ndim == 4


def paged_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    token_seqs: jax.Array,
    positions: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A flat batch of query tokens, each attending to its sequence's positions 0..positions[n] through the
    sequence's page table in the pages of `layer`, after every token's key and value is written at its
    position (kernels/paged_attention.cc has the layouts: q [N, kv_heads, group, hd]; k_new, v_new
    [N, kv_heads, hd]; k_pages [layers, pages, kv_heads, hd, KEY_BLOCK]; v_pages [layers, pages, kv_heads,
    KEY_BLOCK, hd]; page_table [seqs, max_pages]; token_seqs, positions [N]) -> (out [N, kv_heads, group,
    hd], k_pages, v_pages), the pages updated in place where the caller donates them. A padding token
    (sequence or position outside the arrays) writes nothing and gets zeros."""
    if not available():
        raise RuntimeError("the attention kernels are not available here (see the logged reason)")
    results = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
        jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype),
    )
    indices = (jnp.asarray(layer).reshape(1), page_table, token_seqs, positions)
    call = jax.ffi.ffi_call(
        PAGED_TARGETS[jnp.dtype(k_pages.dtype)], results, input_output_aliases={3: 1, 4: 2}
    )
    return call(
        q.astype(jnp.float32),
        k_new.astype(jnp.float32),
        v_new.astype(jnp.float32),
        k_pages,
        v_pages,
        *(index.astype(jnp.int32) for index in indices),
    )


def bf16_gemm(x: jax.Array, packed: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] float32, given w packed by `pack_bf16_weight`, with x rounded to
    bfloat16 first (as XLA's bf16 dot does), through AVX512-BF16 dot products; see
    `bf16_gemm_available`."""
    if not bf16_gemm_available():
        raise RuntimeError("the bf16 matmul kernel needs the CPU kernels and AVX512-BF16")
    outer = packed.shape[0] * packed.shape[2]
    return jax.ffi.ffi_call(GEMM_TARGET_NAME, jax.ShapeDtypeStruct((x.shape[0], outer), jnp.float32))(
        x.astype(jnp.float32), packed
    )


@functools.cache
def quant_gemm_available() -> bool:
    """Whether `quant_gemm` runs here: the kernels are built and the CPU has AVX2, FMA and F16C."""
    library = _library()
    return library is not None and bool(library.JaxserverHasQuantGemm())


def quant_gemm(x: jax.Array, codes: jax.Array, scales: jax.Array, mins: jax.Array | None) -> jax.Array:
    """x [M, K] @ a quantized weight [K, N] -> [M, N] float32, its codes, scales and mins (None for 8-bit
    codes) tiled as `quant.tiled` makes them (kernels/quant_gemm.cc); see `quant_gemm_available`."""
    if not quant_gemm_available():
        raise RuntimeError("the quantized matmul kernel needs the CPU kernels and AVX2, FMA and F16C")
    bits = 4 if mins is not None else 8
    outer = codes.shape[0] * QUANT_GEMM_TILE
    call = jax.ffi.ffi_call(QUANT_GEMM_TARGETS[bits], jax.ShapeDtypeStruct((x.shape[0], outer), jnp.float32))
    return call(x.astype(jnp.float32), codes, scales, scales if mins is None else mins)
