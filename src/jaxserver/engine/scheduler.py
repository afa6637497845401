"""Slot bookkeeping for the engine, with no JAX in it: which request waits, which slot it holds, how much
of its prompt is in the cache, and freeing the slot when it finishes. Only the engine thread calls it.

A freed slot keeps its keys and values. With prefix reuse on, the scheduler remembers which tokens they
belong to, and gives a new request the free slot whose tokens begin as its prompt does, so only the rest
of the prompt is prefilled: the chat template's system text that every request repeats, or the whole
history of a conversation whose next turn lands in the slot its last turn used (as llama.cpp's server
reuses a slot's prompt). Where another slot, busy or free, holds a longer start of the prompt than the
request's own (requests with one system prompt that arrive together), `donor` names it, and the engine
copies those entries over before prefilling the rest. A row's keys and values depend only on the tokens
before it, and every kernel computes a row the same way whatever is beside it, so the reused entries are
those the prompt would write.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jaxserver.engine.request import GenerationRequest, OutputStream
from jaxserver.model.tokenizer import IncrementalDetokenizer


@dataclass
class Sequence:
    """A request that holds a slot."""

    stream: OutputStream
    slot: int
    detokenizer: IncrementalDetokenizer
    start: int = 0  # cache index of the first prompt token (> 0 when left-padded)
    prefilled: int = 0  # prompt tokens already in the cache (at admission: those an earlier request left)
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # text already sent to the consumer

    @property
    def request(self):
        return self.stream.request

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.request.prompt_ids)


# A start of a prompt is copied from another slot only when it saves at least this many tokens of
# prefill: below, the copy's call costs about what it saves.
MIN_COPY_TOKENS = 16


@dataclass
class SlotContents:
    """The tokens whose keys and values a free slot holds, from cache index `start` on."""

    start: int
    tokens: np.ndarray


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class Scheduler:
    def __init__(self, slots: int, cache_len: int, reuse_prefixes: bool = False):
        self.waiting: deque[OutputStream] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.decoding: dict[int, Sequence] = {}
        # Taken from the end: never-used slots first (0, 1, ...), then the least recently freed, whose
        # contents are the least likely to be asked for again.
        self.free_slots: list[int] = list(range(slots - 1, -1, -1))
        self.cache_len = cache_len
        self.reuse_prefixes = reuse_prefixes
        self.contents: list[SlotContents | None] = [None] * slots

    @property
    def busy_slots(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding)

    def admit(self, new_detokenizer) -> list[Sequence]:
        """Move waiting requests into free slots, oldest first."""
        admitted = []
        while self.waiting and self.free_slots:
            stream = self.waiting.popleft()
            slot, start, reused = self._pick_slot(stream.request)
            self.free_slots.remove(slot)
            self.contents[slot] = None
            seq = Sequence(
                stream=stream,
                slot=slot,
                detokenizer=new_detokenizer(),
                start=start,
                prefilled=reused,
            )
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def _pick_slot(self, request: GenerationRequest) -> tuple[int, int, int]:
        """(slot, its start, prompt tokens already there) for a request: the free slot holding the longest
        beginning of its prompt (of equal ones, the least recently freed), else the next free one. At
        least the prompt's last token is left to prefill (its logits give the first new token), and a
        reused slot must leave the answer as much room as a fresh one would."""
        best = (self.free_slots[-1], 0, 0)
        if not self.reuse_prefixes:
            return best
        prompt = np.asarray(request.prompt_ids)
        for slot in reversed(self.free_slots):
            held = self.contents[slot]
            if held is None or (
                held.start and held.start + len(prompt) + request.max_new_tokens > self.cache_len
            ):
                continue
            reused = min(common_prefix(held.tokens, prompt), len(prompt) - 1)
            if reused > best[2]:
                best = (slot, held.start, reused)
        return best

    def donor(self, seq: Sequence) -> tuple[int, int, int] | None:
        """(slot, its start, prompt tokens it holds) of another slot whose cache begins with at least
        MIN_COPY_TOKENS more of `seq`'s prompt than `seq`'s slot holds, the longest such; None if there is
        none. Entries keep their cache indices when copied, so `seq` takes the donor's start (left
        padding): only while it has nothing of its own, or if the starts agree, and if the answer keeps the
        room a fresh slot would give it. As in `_pick_slot`, the prompt's last token is left to prefill."""
        if not self.reuse_prefixes:
            return None
        request = seq.request
        prompt = np.asarray(request.prompt_ids)
        best, most = None, seq.prefilled + MIN_COPY_TOKENS - 1
        for slot, held in self._written():
            if slot == seq.slot or (seq.prefilled and held.start != seq.start):
                continue
            if held.start and held.start + len(prompt) + request.max_new_tokens > self.cache_len:
                continue
            n = min(common_prefix(held.tokens, prompt), len(prompt) - 1)
            if n > most:
                best, most = (slot, held.start, n), n
        return best

    def _written(self) -> list[tuple[int, SlotContents]]:
        """What every slot's cache holds: free slots' remembered tokens, and busy slots' entries so far."""
        held = [(slot, self.contents[slot]) for slot in self.free_slots if self.contents[slot] is not None]
        for seq in [*self.prefilling, *self.decoding.values()]:
            held.append((seq.slot, SlotContents(seq.start, np.asarray(written_tokens(seq), np.int64))))
        return held

    def start_decoding(self, seq: Sequence) -> None:
        self.prefilling.remove(seq)
        self.decoding[seq.slot] = seq

    def find(self, request_id: str) -> Sequence | OutputStream | None:
        for seq in [*self.prefilling, *self.decoding.values()]:
            if seq.request.request_id == request_id:
                return seq
        return next((s for s in self.waiting if s.request.request_id == request_id), None)

    def release(self, item: Sequence | OutputStream) -> None:
        """Forget a finished request; the only place a slot is freed. The slot keeps its entries
        (`written_tokens`)."""
        if isinstance(item, OutputStream):
            if item in self.waiting:  # not there when it never left the engine's inbox
                self.waiting.remove(item)
            return
        if item in self.prefilling:
            self.prefilling.remove(item)
        self.decoding.pop(item.slot, None)
        self.contents[item.slot] = SlotContents(item.start, np.asarray(written_tokens(item), np.int64))
        self.free_slots.insert(0, item.slot)

    def all_requests(self) -> list[Sequence | OutputStream]:
        return [*self.waiting, *self.prefilling, *self.decoding.values()]


def written_tokens(seq: Sequence) -> list[int]:
    """The tokens whose keys and values `seq`'s slot holds from its start on: the prompt written so far
    and every generated token but the last (sampled, never fed back)."""
    return seq.request.prompt_ids[: seq.prefilled] + seq.generated[:-1]
