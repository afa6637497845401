"""Where the engine thread's time went: totals over its calls to the runner."""

from __future__ import annotations

from dataclasses import dataclass

from jaxserver.engine.scheduler import StepPlan


@dataclass
class StepTotals:
    """Where the engine thread's time went since it started, summed over its calls to the runner; read by
    /status, /metrics and the benchmarks, whose profile is the difference between two readings. Steps that
    carry prompt tokens count as prefill (with the decode tokens beside them), the rest as decode."""

    prefill_seconds: float = 0.0
    prefill_calls: int = 0
    prompt_tokens: int = 0  # prompt tokens written into the cache (recomputed ones included)
    prompt_tokens_computed: int = 0  # tokens those steps computed, with the padding of their buckets
    prompt_tokens_reused: int = 0  # prompt tokens found in the prefix cache
    tokens_recomputed: int = 0  # tokens written again after their sequence was preempted
    decode_seconds: float = 0.0
    decode_calls: int = 0
    decode_steps: int = 0  # forward passes of decode-only batches
    decode_tokens: int = 0  # tokens those steps generated
    decode_rows_computed: int = 0  # rows those steps computed, padding rows included

    def add_decode(self, seconds: float, steps: int, rows: int, generated: int) -> None:
        """A decode-only call: `steps` forward passes of `rows` rows each, `generated` tokens."""
        self.decode_seconds += seconds
        self.decode_calls += 1
        self.decode_steps += steps
        self.decode_tokens += generated
        self.decode_rows_computed += rows * steps

    def add_prefill(self, plan: StepPlan, seconds: float, tokens_computed: int) -> None:
        """A step with prompt tokens, computed in a bucket of `tokens_computed`."""
        self.prefill_seconds += seconds
        self.prefill_calls += 1
        self.prompt_tokens_computed += tokens_computed
        for piece in plan.pieces:
            prompt_len = len(piece.seq.request.prompt_ids)
            self.prompt_tokens += max(0, min(piece.end, prompt_len) - piece.start)
            if piece.seq.preemptions:
                self.tokens_recomputed += piece.end - piece.start - (1 if piece.samples else 0)
