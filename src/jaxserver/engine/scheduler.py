"""Slot bookkeeping for the engine, with no JAX in it: which request waits, which slot it holds, how much
of its prompt is in the cache, and freeing the slot when it finishes. Only the engine thread calls it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from jaxserver.engine.request import OutputStream
from jaxserver.model.tokenizer import IncrementalDetokenizer


@dataclass
class Sequence:
    """A request that holds a slot."""

    stream: OutputStream
    slot: int
    detokenizer: IncrementalDetokenizer
    start: int = 0  # cache index of the first prompt token (> 0 when left-padded)
    prefilled: int = 0  # prompt tokens already written into the cache
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0  # text already sent to the consumer

    @property
    def request(self):
        return self.stream.request

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.request.prompt_ids)


class Scheduler:
    def __init__(self, slots: int):
        self.waiting: deque[OutputStream] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.decoding: dict[int, Sequence] = {}
        self.free_slots: list[int] = list(range(slots - 1, -1, -1))

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
            seq = Sequence(stream=stream, slot=self.free_slots.pop(), detokenizer=new_detokenizer())
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def start_decoding(self, seq: Sequence) -> None:
        self.prefilling.remove(seq)
        self.decoding[seq.slot] = seq

    def find(self, request_id: str) -> Sequence | OutputStream | None:
        for seq in [*self.prefilling, *self.decoding.values()]:
            if seq.request.request_id == request_id:
                return seq
        return next((s for s in self.waiting if s.request.request_id == request_id), None)

    def release(self, item: Sequence | OutputStream) -> None:
        """Forget a finished request; the only place a slot is freed."""
        if isinstance(item, OutputStream):
            if item in self.waiting:  # not there when it never left the engine's inbox
                self.waiting.remove(item)
            return
        if item in self.prefilling:
            self.prefilling.remove(item)
        self.decoding.pop(item.slot, None)
        self.free_slots.append(item.slot)

    def all_requests(self) -> list[Sequence | OutputStream]:
        return [*self.waiting, *self.prefilling, *self.decoding.values()]
