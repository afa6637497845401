"""How much bfloat16 weights and a 16-bit (bfloat16 or float16) KV cache change the default model's predictions.

Teacher-forced next-token distributions over a text (by default this repository's README), one token per
decode step through the unpaged forward pass (whose cache stores and widens entries as the pages do),
for each weights / cache combination against float32 weights over a float32 cache: how often the most
likely token agrees with the reference's, the mean KL divergence from the reference's distribution, and
the mean negative log-likelihood of the text's own next tokens.

    python benchmarks/kv_cache_quality.py [--text FILE] [--tokens 512]

The recorded figures were measured over an earlier README; docs/performance.md ("KV cache dtype") gives
the command that re-runs them on that text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model import cpu_kernels, llama, serving_layout
from jaxserver.model.loader import load_model

SETTINGS = [
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("bfloat16", "bfloat16"),
    ("bfloat16", "float16"),
    ("float32", "bfloat16"),
    ("float32", "float16"),
]


def log_probs(
    cfg, params, tokens: list[int], weights: str, cache_dtype: str
) -> tuple[np.ndarray, float, float]:
    """Log-probabilities [len(tokens), vocab] of the token after each position, fed one at a time, and the
    largest magnitude among the cached keys and among the values (what a 16-bit cache must hold)."""
    cast = llama.cast_params(params, jnp.dtype(weights))
    head, layers = llama.head_params(cast), llama.layer_params(cast, cfg)
    if weights == "bfloat16" and cpu_kernels.bf16_gemm_available():
        head, layers = serving_layout.pack_matmul_weights(head, layers)
    return teacher_forced(cfg, head, layers, tokens, cache_dtype)


def teacher_forced(cfg, head, layers, tokens: list[int], cache_dtype: str) -> tuple[np.ndarray, float, float]:
    """`log_probs` over weights already laid out for `llama.forward` (`head_params`, `layer_params`)."""
    cache = llama.init_cache(cfg, 1, len(tokens), jnp.dtype(cache_dtype))
    zero = jnp.zeros((1,), jnp.int32)

    @jax.jit
    def step(cache, token, position):
        logits, cache = llama.forward(
            head,
            layers,
            cfg,
            token.reshape(1, 1),
            cache,
            position.reshape(1),
            logit_index=zero,
        )
        return cache, jax.nn.log_softmax(logits[0])

    rows = []
    for position, token in enumerate(tokens):
        cache, row = step(cache, jnp.int32(token), jnp.int32(position))
        rows.append(np.asarray(row, np.float64))
    largest = [max(float(jnp.abs(llama.from_cache(a)).max()) for a in arrays) for arrays in cache]
    return np.stack(rows), *largest


def text_arguments(description: str) -> argparse.Namespace:
    """The command line of a teacher-forced comparison: --text FILE (README.md) and --tokens (512)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", type=Path, default=Path(__file__).parents[1] / "README.md")
    parser.add_argument("--tokens", type=int, default=512)
    return parser.parse_args()


def main() -> None:
    args = text_arguments(__doc__)
    cfg, params, tokenizer = load_model(None)
    params = jax.tree.map(jnp.asarray, params)
    tokens = tokenizer.encode(args.text.read_text())[: args.tokens]
    following = np.asarray(tokens[1:])
    results = {setting: log_probs(cfg, params, tokens, *setting) for setting in SETTINGS}
    reference, largest_key, largest_value = results[SETTINGS[0]]
    print(f"{len(tokens)} tokens of {args.text.name}; reference: float32 weights, float32 cache")
    print(f"largest cached |key| {largest_key:.1f}, |value| {largest_value:.1f} (float16 holds up to 65504)")
    print(f"{'weights':>9} {'cache':>9} {'top-1 agrees':>13} {'KL (nats)':>10} {'NLL':>7}")
    for (weights, cache_dtype), (rows, _, _) in results.items():
        print(f"{weights:>9} {cache_dtype:>9} {compare(rows, reference, following)}")


def compare(rows: np.ndarray, reference: np.ndarray, following: np.ndarray) -> str:
    """Top-1 agreement with the reference, mean KL divergence from it, and the NLL of the text's tokens."""
    agree = np.mean(rows.argmax(-1) == reference.argmax(-1))
    kl = np.mean(np.sum(np.exp(reference) * (reference - rows), axis=-1))
    nll = -np.mean(rows[np.arange(len(following)), following])
    return f"{agree:>13.3f} {kl:>10.5f} {nll:>7.3f}"


if __name__ == "__main__":
    main()
