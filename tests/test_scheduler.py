"""The paged scheduler as a unit: one token budget per step shared by decode tokens and prompt pieces,
admission from the prefix cache, and preemption that loses and changes nothing."""

import pytest

from jaxserver.engine.page_pool import PagePool
from jaxserver.engine.request import GenerationRequest
from jaxserver.engine.scheduler import Scheduler, Sequence

T = 4  # tokens per page


def request(prompt: list[int], new_tokens: int = 4) -> Sequence:
    return Sequence(GenerationRequest(prompt_ids=prompt, max_new_tokens=new_tokens))


def fake_token(seq) -> int:
    """A model whose next token depends only on the sequence's tokens so far (checkable by hand)."""
    return (sum(seq.tokens) * 31 + len(seq.tokens)) % 1000


def step(scheduler: Scheduler) -> list[tuple[int, int, int]]:
    """Run one step as an engine would: sample where a piece reaches the end, finish full sequences.
    Returns the plan as (prompt's first token, start, end) per piece."""
    plan = scheduler.schedule()
    scheduler.computed(plan)
    for piece in plan.pieces:
        if piece.samples:
            piece.seq.generated.append(fake_token(piece.seq))
            if len(piece.seq.generated) == piece.seq.request.max_new_tokens:
                scheduler.finish(piece.seq)
    return [(p.seq.request.prompt_ids[0], p.start, p.end) for p in plan.pieces]


def run(scheduler: Scheduler, requests: list[Sequence], steps: int = 200) -> dict[int, list[int]]:
    seqs = [scheduler.add(Sequence(r.request)) for r in requests]  # fresh ones for each scheduler
    for _ in range(steps):
        if not scheduler.running and not scheduler.waiting:
            break
        step(scheduler)
    assert not scheduler.running and not scheduler.waiting
    return {seq.request.prompt_ids[0]: seq.generated for seq in seqs}


def test_decode_tokens_and_a_prompt_piece_share_one_budget():
    scheduler = Scheduler(PagePool(64, T), max_num_seqs=8, max_num_batched_tokens=10)
    scheduler.add(request([1, 1, 1]))
    scheduler.add(request([2, 2]))
    assert step(scheduler) == [(1, 0, 3), (2, 0, 2)]  # both prompts whole, each samples a first token
    scheduler.add(request([3] * 20))
    # Both decode (one token each); the new prompt takes the 8 tokens left, then the rest in later steps.
    assert step(scheduler) == [(1, 3, 4), (2, 2, 3), (3, 0, 8)]
    assert step(scheduler) == [(1, 4, 5), (2, 3, 4), (3, 8, 16)]
    assert step(scheduler) == [(1, 5, 6), (2, 4, 5), (3, 16, 20)]


def test_admission_stops_at_max_num_seqs():
    scheduler = Scheduler(PagePool(64, T), max_num_seqs=2, max_num_batched_tokens=100)
    for first in (1, 2, 3):
        scheduler.add(request([first] * 3))
    assert [piece[0] for piece in step(scheduler)] == [1, 2]
    assert len(scheduler.waiting) == 1


def test_a_prompt_starts_from_the_pages_the_cache_holds():
    scheduler = Scheduler(PagePool(64, T), max_num_seqs=4, max_num_batched_tokens=100)
    system = list(range(10, 22))  # three full pages
    run(scheduler, [request([*system, 1], new_tokens=1)])
    scheduler.add(request([*system, 2, 2]))
    assert step(scheduler) == [(10, 12, 14)]  # only the two new tokens are computed


def test_preempted_sequences_resume_and_answer_as_if_never_preempted():
    """A pool too small for every request at once: the newest are preempted and recomputed, every request
    still gets all its tokens, and the same ones as with room for all."""
    requests = [request([first] * 9, new_tokens=12) for first in range(1, 6)]
    roomy = run(Scheduler(PagePool(100, T), max_num_seqs=8, max_num_batched_tokens=16), requests)
    tight = Scheduler(PagePool(14, T), max_num_seqs=8, max_num_batched_tokens=16)
    assert run(tight, requests) == roomy
    assert tight.preemptions > 0
    assert tight.pool.free_pages == 14


def test_a_preempted_sequence_keeps_its_tokens_and_its_cached_pages_serve_its_return():
    scheduler = Scheduler(PagePool(6, T), max_num_seqs=4, max_num_batched_tokens=32)
    old, new = scheduler.add(request([1] * 8, 16)), scheduler.add(request([2] * 8, 16))
    while new.computed < 8 or len(new.generated) < 2:
        step(scheduler)
    plan = scheduler.schedule()  # both need a third page; only one is left
    while not plan.preempted:
        scheduler.computed(plan)
        for piece in plan.pieces:
            piece.seq.generated.append(fake_token(piece.seq))
        plan = scheduler.schedule()
    assert plan.preempted == [new] and scheduler.waiting[0] is new and new.computed == 0
    assert len(new.generated) >= 2 and all(piece.seq is old for piece in plan.pieces)


def test_finishing_frees_the_row_and_the_pages():
    pool = PagePool(8, T)
    scheduler = Scheduler(pool, max_num_seqs=1, max_num_batched_tokens=8)
    seq = scheduler.add(request([5] * 6))
    step(scheduler)
    scheduler.finish(seq)
    assert pool.free_pages == 8 and scheduler.running == []
    scheduler.add(request([6] * 3))
    assert step(scheduler) == [(6, 0, 3)]  # the row is free again


def test_a_request_that_could_not_fit_the_whole_pool_is_refused_at_once():
    scheduler = Scheduler(PagePool(2, T), max_num_seqs=2, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="need 3 KV cache pages"):
        scheduler.add(request([1] * 6, new_tokens=3))
    assert not scheduler.waiting
