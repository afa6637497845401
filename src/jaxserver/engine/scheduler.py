"""Slot bookkeeping for the engine, with no JAX in it: which request waits, which slot it holds, how much
of its prompt is in the cache, and freeing the slot when it finishes. Only the engine thread calls it.

A freed slot keeps its keys and values. With prefix reuse on, the scheduler remembers which tokens they
belong to, and gives a new request the free slot whose tokens begin as its prompt does, so only the rest
of the prompt is prefilled: the chat template's system text that every request repeats, or the whole
history of a conversation whose next turn lands in the slot its last turn used (as llama.cpp's server
reuses a slot's prompt). A row's keys and values depend only on the tokens before it, and every kernel
computes a row the same way whatever is beside it, so the reused entries are those the prompt would write.
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

    def start_decoding(self, seq: Sequence) -> None:
        self.prefilling.remove(seq)
        self.decoding[seq.slot] = seq

    def find(self, request_id: str) -> Sequence | OutputStream | None:
        for seq in [*self.prefilling, *self.decoding.values()]:
            if seq.request.request_id == request_id:
                return seq
        return next((s for s in self.waiting if s.request.request_id == request_id), None)

    def release(self, item: Sequence | OutputStream) -> None:
        """Forget a finished request; the only place a slot is freed. The slot keeps the entries of the
        prompt written so far and of every generated token but the last (sampled, never fed back)."""
        if isinstance(item, OutputStream):
            if item in self.waiting:  # not there when it never left the engine's inbox
                self.waiting.remove(item)
            return
        if item in self.prefilling:
            self.prefilling.remove(item)
        self.decoding.pop(item.slot, None)
        written = item.request.prompt_ids[: item.prefilled] + item.generated[:-1]
        self.contents[item.slot] = SlotContents(item.start, np.asarray(written, np.int64))
        self.free_slots.insert(0, item.slot)

    def all_requests(self) -> list[Sequence | OutputStream]:
        return [*self.waiting, *self.prefilling, *self.decoding.values()]
