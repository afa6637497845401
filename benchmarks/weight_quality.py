"""How much serving the default model's weights as codes changes its predictions, by scheme.

The default GGUF holds Q4_1 matmul weights and a Q8_0 embedding (tied to the head). The reference is
those weights dequantized to float32; against it, teacher-forced over a text as in
`kv_cache_quality.py` (float32 cache): the bf16 copy the server made of them before issue 23, the codes
through the quantized matmul kernel (rows rounded to int16 per block of 32) and through the XLA path
(dequantized in the step), and the float32 weights quantized again at load as `--quantization int8`
(per output channel) and `int4` (groups of 32 and of 64) would.

    python benchmarks/weight_quality.py [--text FILE] [--tokens 512]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from kv_cache_quality import compare, log_probs, teacher_forced, text_arguments

from jaxserver.model import cpu_kernels, llama, quant, serving_layout
from jaxserver.model.loader import load_model


def served(cfg, params, tokens: list[int], kernel: bool) -> np.ndarray:
    """`params` with quantized weights, through the kernel (tiled for it) or the XLA path."""
    head, layers = llama.head_params(params), llama.layer_params(params, cfg)
    if kernel:
        head, layers = serving_layout.pack_matmul_weights(head, layers, bf16=False, quantized=True)
    return teacher_forced(cfg, head, layers, tokens, "float32")[0]


def main() -> None:
    args = text_arguments(__doc__)
    cfg, codes, tokenizer = load_model(None, keep_codes=True)
    dense = quant.dequantize_params(codes)
    tokens = tokenizer.encode(args.text.read_text())[: args.tokens]
    following = np.asarray(tokens[1:])
    on_device = jax.tree.map(jnp.asarray, dense)
    reference = log_probs(cfg, on_device, tokens, "float32", "float32")[0]
    kernel = cpu_kernels.quant_gemm_available()
    rows = {"bf16 copy": log_probs(cfg, on_device, tokens, "bfloat16", "float32")[0]}
    if kernel:
        rows["codes, kernel"] = served(cfg, jax.tree.map(jnp.asarray, codes), tokens, kernel=True)
    rows["codes, XLA"] = served(cfg, jax.tree.map(jnp.asarray, codes), tokens, kernel=False)
    for name, bits, group in (("int8 per channel", 8, None), ("int4 g32", 4, 32), ("int4 g64", 4, 64)):
        requantized = jax.tree.map(jnp.asarray, quant.quantize_params(dense, bits, group))
        rows[f"{name}, {'kernel' if kernel else 'XLA'}"] = served(cfg, requantized, tokens, kernel)
    print(f"{len(tokens)} tokens of {args.text.name}; reference: the GGUF's weights in float32")
    print(f"{'weights':>22} {'top-1 agrees':>13} {'KL (nats)':>10} {'NLL':>7}")
    print(f"{'float32 (reference)':>22} {compare(reference, reference, following)}")
    for name, got in rows.items():
        print(f"{name:>22} {compare(got, reference, following)}")


if __name__ == "__main__":
    main()
