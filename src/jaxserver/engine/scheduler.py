"""Which tokens the next step computes, over a paged KV cache, with no JAX in it.

Every step has one budget of tokens (`max_num_batched_tokens`) shared by decode tokens and prompt pieces.
Running sequences come first, oldest first: a decoding one takes one token, a prompt still being prefilled
takes as much of the rest as the budget leaves. Then waiting requests are admitted, oldest first, while
the budget, the rows (`max_num_seqs`) and the pages last; each starts from the longest start of its tokens
the prefix cache holds. When a running sequence needs a page and none is free, the newest running sequence
is preempted: its pages are released (those it filled stay cached) and it waits at the front of the queue,
to be recomputed from its prompt and the tokens it had generated, which it keeps. The engine admits no
request that could not fit the whole pool alone, so the oldest running sequence always gets its pages.
Only the engine thread calls it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from jaxserver.engine.constraints import TokenMatcher
from jaxserver.engine.page_pool import PagePool, PageTable
from jaxserver.engine.request import GenerationRequest, OutputStream
from jaxserver.model.tokenizer import IncrementalDetokenizer


@dataclass(eq=False)
class Sequence:
    """A request from submission to finish: its tokens, how many of them the cache holds, its pages, and
    what of its answer its stream has been sent."""

    request: GenerationRequest
    stream: OutputStream | None = None
    detokenizer: IncrementalDetokenizer | None = None
    matcher: TokenMatcher | None = None  # where its answer is in its grammar, for a constrained request
    emitted_chars: int = 0  # text already sent to the stream
    generated: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    table: PageTable = field(default_factory=PageTable)
    row: int = -1  # its row in the runner's per-sequence arrays while it runs
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.generated

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)


@dataclass
class Piece:
    """Tokens of one sequence computed in a step: tokens[start:end] of its tokens, at those positions. A
    piece that reaches the sequence's last token samples the next one."""

    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass
class StepPlan:
    pieces: list[Piece] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(piece.end - piece.start for piece in self.pieces)


class Scheduler:
    def __init__(self, pool: PagePool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.preemptions = 0
        self.prefix_hit_pages = 0  # pages admitted requests found in the prefix cache

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def sequences(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def check_fits(self, request: GenerationRequest) -> None:
        """ValueError if the request's prompt and new tokens could not fit the whole pool (it could never
        run, since the oldest running sequence must always get its pages)."""
        needed = self.pool.pages_for(len(request.prompt_ids) + request.max_new_tokens)
        if needed > len(self.pool.pages):
            raise ValueError(
                f"the prompt and max_new_tokens need {needed} KV cache pages of {self.pool.page_tokens} tokens "
                f"and the pool holds {len(self.pool.pages)}"
            )

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence (checked by `check_fits`)."""
        self.check_fits(seq.request)
        self.waiting.append(seq)
        return seq

    def schedule(self, token_budget: int | None = None) -> StepPlan:
        """The next step's pieces, at most `token_budget` tokens (default `max_num_batched_tokens`); pages
        are taken for them (and released from preempted sequences)."""
        limit = min(token_budget or self.max_num_batched_tokens, self.max_num_batched_tokens)
        plan, budget = StepPlan(), limit
        for seq in list(self.running):
            if seq not in self.running or budget == 0:  # preempted for an older sequence's page
                continue
            count = min(seq.num_tokens - seq.computed, budget)
            if count > 0 and self._make_room(seq, seq.computed + count, plan):
                plan.pieces.append(Piece(seq, seq.computed, seq.computed + count))
            budget = limit - plan.tokens  # a preempted sequence's piece gives back
        while self.waiting and budget > 0 and self._free_rows and not plan.preempted:
            seq = self.waiting[0]
            seq.table = self.pool.open(seq.tokens)
            hits = len(seq.table.pages)
            seq.computed = hits * self.pool.page_tokens
            count = min(seq.num_tokens - seq.computed, budget)
            if not self.pool.grow(seq.table, seq.computed + count):
                self.pool.close(seq.table)
                seq.computed = 0
                break
            self.waiting.popleft()
            self.prefix_hit_pages += hits
            seq.row = self._free_rows.pop()
            self.running.append(seq)
            plan.pieces.append(Piece(seq, seq.computed, seq.computed + count))
            budget -= count
        return plan

    def reserve(self, plan: StepPlan, steps: int) -> int:
        """Pages for `steps` decode steps of a plan of decode tokens only (as far as each sequence's token
        budget reaches), without preempting: the steps the pages allow, `steps` or 1."""
        for piece in plan.pieces:
            seq = piece.seq
            left = seq.request.max_new_tokens - len(seq.generated)
            if not self.pool.grow(seq.table, piece.start + min(steps, max(left, 1))):
                return 1
        return steps

    def computed(self, plan: StepPlan, ends: dict[int, int] | None = None) -> None:
        """The plan's pieces are in the cache, up to their ends (or `ends[i]` for piece i: a piece decoded
        for several steps computed one token per token it generated): count them and cache the pages they
        filled. Only computed tokens are cached, so the sampled ones may be appended before or after."""
        for index, piece in enumerate(plan.pieces):
            seq = piece.seq
            seq.computed = piece.end if ends is None else ends.get(index, piece.end)
            if seq.computed // self.pool.page_tokens > seq.table.settled:  # a page filled up
                self.pool.cache_full_pages(seq.table, seq.tokens[: seq.computed])

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that ended (or was aborted), waiting or running."""
        if seq in self.running:
            self.running.remove(seq)
            self._free_rows.append(seq.row)
            seq.row = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.close(seq.table)

    def _make_room(self, seq: Sequence, tokens: int, plan: StepPlan) -> bool:
        """Grow `seq`'s pages to `tokens`, preempting the newest running sequences while pages lack; False
        if `seq` itself had to go."""
        while not self.pool.grow(seq.table, tokens):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._free_rows.append(seq.row)
        seq.row = -1
        self.pool.close(seq.table)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        plan.pieces = [piece for piece in plan.pieces if piece.seq is not seq]
