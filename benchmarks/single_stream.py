"""Single-stream figures for the default model, jaxserver beside Hugging Face transformers (torch, CPU),
on the same dequantized GGUF weights, in one run:

- decode tokens/s for one stream (greedy, EOS ignored, so both produce exactly --new-tokens tokens);
- time to first token for a --prompt-tokens prompt (prefill + first sampled token).

    python benchmarks/single_stream.py [--new-tokens 256] [--prompt-tokens 512] [--repeats 3]

Needs the test extra (torch, accelerate) for the transformers side; --skip-transformers runs ours only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

from jaxserver import JAXServer, JAXServerConfig
from jaxserver.model.loader import default_model_path


def long_prompt_ids(server: JAXServer, n: int) -> list[int]:
    text = " ".join(
        f"Item {i} of the list is a sentence about the weather in city number {i}." for i in range(400)
    )
    return server.tokenizer.encode(text)[:n]


def time_ours(server: JAXServer, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the whole generation)."""
    request = server.prepare("x", greedy=True, max_new_tokens=new_tokens)
    request = dataclasses.replace(request, prompt_ids=prompt_ids, ignore_eos=True)
    started = time.perf_counter()
    first = None
    generated = 0
    for chunk in server.stream(request):
        first = first or time.perf_counter() - started
        generated = chunk.tokens_generated
    assert generated == new_tokens, generated
    return first, time.perf_counter() - started


def time_transformers(model, prompt_ids: list[int], new_tokens: int) -> float:
    import torch

    ids = torch.tensor([prompt_ids])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2
        )
    assert out.shape[1] - ids.shape[1] == new_tokens
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/single_stream.json"))
    args = parser.parse_args()

    config = JAXServerConfig(max_length=2048, mesh_axes_shape=(1, 1, 1), logging=True)
    server = JAXServer.load(None, config=config)
    short = server.tokenizer.encode(server.build_instruct_prompt("Tell me a long story about a lighthouse."))
    long = long_prompt_ids(server, args.prompt_tokens)
    time_ours(server, short, 8)  # compile the shapes used below before timing
    time_ours(server, short, args.new_tokens)
    time_ours(server, long, 2)

    def ours_decode() -> float:
        first, total = time_ours(server, short, args.new_tokens)
        return (args.new_tokens - 1) / (total - first)

    results = {
        "jaxserver": {
            "decode_tokens_per_s": statistics.median(ours_decode() for _ in range(args.repeats)),
            "ttft_s": statistics.median(time_ours(server, long, 1)[0] for _ in range(args.repeats)),
        }
    }
    if not args.skip_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        path = default_model_path()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        time_transformers(model, short, 4)  # warm-up

        def theirs_decode() -> float:
            one = time_transformers(model, short, 1)
            many = time_transformers(model, short, args.new_tokens)
            return (args.new_tokens - 1) / (many - one)

        results["transformers"] = {
            "decode_tokens_per_s": statistics.median(theirs_decode() for _ in range(args.repeats)),
            "ttft_s": statistics.median(time_transformers(model, long, 1) for _ in range(args.repeats)),
        }
        ours, theirs = results["jaxserver"], results["transformers"]
        results["ratio"] = {
            "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
            "ttft_speedup": theirs["ttft_s"] / ours["ttft_s"],
        }

    results["settings"] = {
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32",
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(long),
        "repeats (median)": args.repeats,
        "max_compile_tokens": config.max_compile_tokens,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch_threads": __import__("torch").get_num_threads() if not args.skip_transformers else None,
        "jax": __import__("jax").__version__,
    }
    print(f"\n{'':14}{'decode tok/s':>14}{'TTFT ' + str(len(long)) + ' tok (s)':>22}")
    for name in ("jaxserver", "transformers"):
        if name in results:
            row = results[name]
            print(f"{name:14}{row['decode_tokens_per_s']:>14.1f}{row['ttft_s']:>22.3f}")
    if "ratio" in results:
        print(
            f"{'ratio':14}{results['ratio']['decode_speedup']:>13.2f}x{results['ratio']['ttft_speedup']:>21.2f}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
