"""The host side of the device work over a paged KV cache: a `StepPlan` becomes one ragged step's
arrays, which compute its pieces and sample each finished piece's next token, or a multi-step decode
call's; the executor (`engine.executor`) runs them.

A step's flat batch is padded to a token bucket, and its rows (one per sequence) to a fixed function of
that bucket, so the compiled shapes are a dozen token counts whatever mix of prompts and decode tokens
arrives. Padding tokens belong to no sequence: they read and write nothing. A step of decode tokens only
may run several steps in one call (`decode`), each feeding the token the last one sampled, until a row
finishes: Python is entered once per chunk, which is where multi-step decoding pays. `warm_up` compiles
the smallest step, enough to serve; `compile_programs` compiles the rest beside serving, and each program
is used from the moment it is ready.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.executor import Call, Executor, SampleBatch, StepBatch
from jaxserver.engine.programs import StepOutputs, decode_rows, idle_rows, sampling_rows
from jaxserver.engine.request import SamplingOptions, TokenLogprobs
from jaxserver.engine.scheduler import Sequence, StepPlan
from jaxserver.engine.step_relay import TokensByRow
from jaxserver.model import cpu_kernels, paged, serving_layout
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.sampling import SamplingArrays


class Runner:
    """Turns the scheduler's plans into the executor's host arrays and its outputs into tokens; keeps each
    row's sampling settings and which request they are for."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        pages: int,
        max_num_seqs: int,
        max_length: int,
        cache_dtype: jnp.dtype,
        max_num_batched_tokens: int,
        max_decode_steps: int = 1,
        eos_ids: tuple[int, ...] = (),
        cache_sharding: jax.sharding.Sharding | None = None,
        compile_lazily: bool = False,
        attention: paged.Attention | None = None,
        announce: Callable[[Call], None] | None = None,
    ):
        """`compile_lazily`: compile each program at its first use rather than only by `warm_up` and
        `compile_programs` (which serving runs beside the engine, so that no request waits for one).
        `attention`: by default the CPU kernel wherever it reads the pages (`executor.attention_for`).
        `announce`: gets every call to the executor before it runs (`Executor`)."""
        self.cfg = cfg
        self.executor = Executor(
            cfg,
            params,
            pages=pages,
            max_num_seqs=max_num_seqs,
            max_length=max_length,
            cache_dtype=cache_dtype,
            max_num_batched_tokens=max_num_batched_tokens,
            max_decode_steps=max_decode_steps,
            eos_ids=eos_ids,
            cache_sharding=cache_sharding,
            compile_lazily=compile_lazily,
            attention=attention,
        )
        self.executor.announce = announce
        self.max_num_seqs = max_num_seqs
        self.max_pages = self.executor.max_pages
        self.max_num_batched_tokens = self.executor.max_num_batched_tokens
        self.max_length = max_length
        self.max_decode_steps = max_decode_steps
        self.cache_dtype = jnp.dtype(cache_dtype)  # the entries' (bf16 pages are stored as uint16)
        self.attention_kernel = self.executor.attention is cpu_kernels.paged_attention
        # Each row's sampling settings as host arrays, set when another request takes the row.
        self._sampling = sampling_rows(max_num_seqs, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
        self._row_owners: list[tuple[str, int] | None] = [None] * max_num_seqs
        # Rows whose bias is not zero: the sampler adds a row's bias whatever its request, so a request
        # without one that takes such a row clears it.
        self._biased_rows: set[int] = set()

    def model_params(self) -> Params:
        """The parameters in the stacked layout they were given in, rebuilt from the serving weights."""
        return serving_layout.stacked_params(self.executor.params, self.executor.layers, self.cfg)

    @property
    def cache(self) -> paged.PagedKVCache:
        return self.executor.cache

    @property
    def pages(self) -> int:
        return self.executor.cache.pages

    @property
    def cache_bytes(self) -> int:
        return self.executor.cache.nbytes

    @property
    def token_budget(self) -> int:
        return self.executor.token_budget

    @property
    def programs_to_compile(self) -> int:
        return self.executor.programs_to_compile

    def warm_up(self) -> None:
        self.executor.warm_up()

    def idle(self) -> None:
        self.executor.idle()

    def compile_programs(self) -> None:
        self.executor.compile_programs()

    def can_decode(self, plan: StepPlan) -> bool:
        """Whether `decode` has its program for the plan's rows compiled (with `compile_lazily`, it is
        compiled now)."""
        return self.executor.can_decode(decode_rows(len(plan.pieces), self.max_num_seqs))

    def shape(self, plan: StepPlan) -> tuple[int, int]:
        """The (tokens, rows) shape a plan runs in: the smallest compiled step that holds its tokens (else
        the bucket that will be compiled for them). The rows follow from the tokens, since a step has at
        most one row per token."""
        tokens = self.executor.step_tokens(plan.tokens)
        return tokens, min(tokens, self.max_num_seqs)

    def step(
        self, plan: StepPlan, allowed: np.ndarray | None = None
    ) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """Compute the plan's pieces; the sampled next token (and its logprobs, when the request asked) of
        every piece that reaches its sequence's end, by the piece's index in the plan. `allowed`: a token
        bitmask per piece (int32 [pieces, >= ceil(vocab / 32)], all bits set for an unconstrained one)."""
        token_count, rows = self.shape(plan)
        tokens = np.zeros(token_count, np.int32)
        positions = np.zeros(token_count, np.int32)
        token_seqs = np.full(token_count, rows, np.int32)  # padding: a sequence past the table
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        logit_index = np.zeros(rows, np.int32)
        at = 0
        for row, piece in enumerate(plan.pieces):
            count = piece.end - piece.start
            tokens[at : at + count] = piece.seq.tokens[piece.start : piece.end]
            positions[at : at + count] = np.arange(piece.start, piece.end)
            token_seqs[at : at + count] = row
            indices = piece.seq.table.indices
            page_table[row, : len(indices)] = indices
            logit_index[row] = at + count - 1
            at += count
        batch = StepBatch(tokens, positions, token_seqs, page_table, logit_index)
        outputs = self.executor.step(batch, self._sample_batch(plan, allowed))
        return {
            i: (int(outputs.tokens[i]), _listed(outputs, i, piece.seq.request.logprobs))
            for i, piece in enumerate(plan.pieces)
            if piece.samples
        }

    def decode(
        self, plan: StepPlan, steps: int, on_tokens: Callable[[TokensByRow], None] | None = None
    ) -> dict[int, list[int]]:
        """Up to `steps` (at most `max_decode_steps`) decode steps of a plan of decode tokens only, whose
        sequences' pages have room for them (`Scheduler.reserve`) and whose program is compiled
        (`can_decode`); the tokens each piece generated, by its index in the plan. It stops early at the
        step where a sequence ends (EOS, its token budget, the context). Requests that are `stepped`
        are `step`'s only. While the call runs, `on_tokens` gets each piece's new tokens every few steps
        (`StepRelay.run`)."""
        if any(piece.seq.request.stepped for piece in plan.pieces):
            raise ValueError("decode runs no penalties, logit bias, grammar or logprobs; step such plans")
        if not all(piece.end - piece.start == 1 and piece.samples for piece in plan.pieces):
            raise ValueError("decode takes plans of decode tokens only (one token per sequence, at its end)")
        if not self.can_decode(plan):
            raise ValueError(f"the decode program for {len(plan.pieces)} sequences is not compiled yet")
        steps = min(steps, self.max_decode_steps)
        rows = decode_rows(len(plan.pieces), self.max_num_seqs)
        state = idle_rows(rows)._replace(sampling=self._rows_sampling(plan, rows))
        page_table = np.full((rows, self.max_pages), -1, np.int32)  # -1: no page (the kernel skips it)
        for row, piece in enumerate(plan.pieces):
            seq, request = piece.seq, piece.seq.request
            state.tokens[row], state.lengths[row] = seq.tokens[piece.start], piece.start
            state.remaining[row] = request.max_new_tokens - len(seq.generated)
            state.active[row], state.stop_at_eos[row] = True, not request.ignore_eos
            page_table[row, : len(seq.table.pages)] = seq.table.indices
        tokens, emitted = self.executor.decode(state, page_table, steps, len(plan.pieces), on_tokens)
        return {i: tokens[i][emitted[i]].tolist() for i in range(len(plan.pieces))}

    def _sample_batch(self, plan: StepPlan, allowed: np.ndarray | None) -> SampleBatch:
        """The sampler's inputs for the plan's pieces, in the smallest compiled sampler that holds their
        rows, among the tokens `allowed` (a bitmask per piece) keeps."""
        rows = self.executor.sampler_rows(len(plan.pieces))
        seq_rows, samples, positions = (np.zeros(rows, dtype) for dtype in (np.int32, bool, np.int32))
        for row, piece in enumerate(plan.pieces):
            seq_rows[row], samples[row], positions[row] = piece.seq.row, piece.samples, piece.end
        requests = [piece.seq.request for piece in plan.pieces]
        sampling = self._rows_sampling(plan, rows)  # first: a new row's penalties start here
        mask = None
        if allowed is not None:
            mask = self.executor.all_allowed(rows).copy()
            mask[: len(plan.pieces)] = allowed[:, : mask.shape[1]]
        return SampleBatch(
            sampling,
            seq_rows,
            samples,
            positions,
            mask,
            penalize=any(request.sampling.penalized for request in requests),
            constrain=allowed is not None,
            want_logprobs=any(request.logprobs is not None for request in requests),
        )

    def _start_penalties(self, row: int, seq: Sequence) -> None:
        """Row `row`'s penalties from the tokens a sequence holds (a resumed one has generated some), and
        its request's logit bias."""
        vocab = self.cfg.vocab_size
        counts = np.bincount(np.asarray(seq.generated, np.int64), minlength=vocab).astype(np.int32)
        in_prompt = np.zeros(vocab, bool)
        in_prompt[seq.request.prompt_ids] = True
        bias = np.zeros(vocab, np.float32)
        for token, value in seq.request.sampling.logit_bias:
            bias[token] = value
        self.executor.set_penalties(row, counts, in_prompt, bias)
        if seq.request.sampling.logit_bias:
            self._biased_rows.add(row)
        else:
            self._biased_rows.discard(row)

    def _rows_sampling(self, plan: StepPlan, rows: int) -> SamplingArrays:
        """The plan's sequences' sampling settings, one row per piece (padding rows as row 0's)."""
        for piece in plan.pieces:
            seq = piece.seq
            # A resumed sequence counts as new: its row may be another, or hold counts of its earlier stay.
            owner = (seq.request.request_id, seq.preemptions)
            if self._row_owners[seq.row] != owner:
                _set_row(self._sampling, seq.row, seq.request.sampling)
                if seq.request.sampling.penalized or seq.row in self._biased_rows:
                    self._start_penalties(seq.row, seq)
                self._row_owners[seq.row] = owner
        order = np.zeros(rows, np.int32)
        order[: len(plan.pieces)] = [piece.seq.row for piece in plan.pieces]
        return SamplingArrays(*(column[order] for column in self._sampling))


def _listed(outputs: StepOutputs, row: int, top: int | None) -> TokenLogprobs | None:
    """Row `row`'s logprobs with its `top` alternatives, when the request asked for them."""
    if top is None:
        return None
    chosen, top_ids, top_values = outputs.logprobs
    pairs = list(zip(top_ids[row, :top].tolist(), top_values[row, :top].tolist(), strict=True))
    return TokenLogprobs(int(outputs.tokens[row]), float(chosen[row]), pairs)


def _set_row(sampling: SamplingArrays, row: int, options: SamplingOptions) -> None:
    """Row `row` of the host arrays `sampling` set to a request's options."""
    # The logit bias is no column here: it lives in the runner's penalty rows.
    one = sampling_rows(1, **{name: v for name, v in vars(options).items() if name != "logit_bias"})
    for column, value in zip(sampling, one, strict=True):
        column[row] = value[0]
