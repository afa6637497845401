"""The continuous-batching engine on a tiny model: answers under load equal answers alone, per-request
sampling, stop strings, cancellation, backpressure and failure."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.engine.engine import Engine
from jaxserver.engine.request import GenerationChunk, GenerationRequest, SamplingOptions
from jaxserver.engine.runner import Runner, idle_state, row_bucket, sampling_rows, set_slot
from jaxserver.engine.scheduler import SlotContents
from jaxserver.errors import BadRequestError, OverloadedError
from jaxserver.model import cpu_kernels, llama
from jaxserver.model.loader import load_model
from jaxserver.parallel.mesh import cache_sharding, make_mesh

GREEDY = SamplingOptions(greedy=True)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    cfg, params, tokenizer = load_model(tiny_llama_dir)
    return cfg, jax.tree.map(jnp.asarray, params), tokenizer


@pytest.fixture
def make_engine(model):
    """Engines started by a test, shut down after it."""
    engines = []

    def make(weights: str = "float32", **settings) -> Engine:
        cfg, params, tokenizer = model
        engines.append(
            start_engine((cfg, llama.cast_params(params, jnp.dtype(weights)), tokenizer), **settings)
        )
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown(drain_timeout_s=0)


def make_runner(
    model,
    *,
    slots=4,
    cache_len=256,
    steps=4,
    cache_dtype=jnp.float32,
    attention_kernel=None,
    cache_sharding=None,
) -> Runner:
    """A runner on `model` (config, params, tokenizer), stopping at the tokenizer's EOS."""
    cfg, params, tokenizer = model
    return Runner(
        cfg,
        params,
        slots=slots,
        cache_len=cache_len,
        steps_per_call=steps,
        eos_ids=tokenizer.eos_token_ids,
        cache_dtype=cache_dtype,
        cache_sharding=cache_sharding,
        attention_kernel=attention_kernel,
    )


def start_engine(
    model,
    *,
    slots=8,
    max_waiting=64,
    steps=4,
    prefill_chunk=32,
    prefill_budget=None,
    cache_len=128,
    cache_dtype=jnp.float32,
    start=True,
    reuse_prefixes=True,
    attention_kernel=None,
) -> Engine:
    """An engine on `model`, its thread started unless `start` is False (a test then drives its steps)."""
    runner = make_runner(
        model,
        slots=slots,
        cache_len=cache_len,
        steps=steps,
        cache_dtype=cache_dtype,
        attention_kernel=attention_kernel,
    )
    engine = Engine(
        runner,
        model[2],
        max_waiting=max_waiting,
        prefill_chunk_tokens=prefill_chunk,
        prefill_budget_tokens=prefill_budget or prefill_chunk,
        left_pad=True,
        reuse_prefixes=reuse_prefixes,
    )
    if start:
        engine.start()
    return engine


def run(engine: Engine, request: GenerationRequest) -> tuple[list[int], str, str]:
    return summary(list(engine.submit(request)))


def summary(chunks: list[GenerationChunk]) -> tuple[list[int], str, str]:
    """An answer's tokens, text and finish reason."""
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1].finish_reason


def prompts(n: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [[int(t) for t in rng.integers(3, vocab, size=int(rng.integers(3, 60)))] for _ in range(n)]


# bfloat16 weights (and KV cache) decode through the CPU's bf16 matmul kernel, whose rows do not depend on
# each other; XLA's bf16 dot, where the CPU lacks AVX512-BF16, makes no such promise.
WEIGHTS = [
    "float32",
    pytest.param(
        "bfloat16",
        marks=pytest.mark.skipif(not cpu_kernels.bf16_gemm_available(), reason="no AVX512-BF16 here"),
    ),
]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_concurrent_greedy_requests_equal_each_alone(make_engine, model, weights):
    """24 requests of 3-60 prompt tokens over 8 slots (so some wait, and long prompts prefill in pieces):
    the same tokens, and the same log-probabilities to the last bit, which the tiny model's clear maxima
    would hide otherwise."""
    engine = make_engine(weights)
    requests = [
        GenerationRequest(p, max_new_tokens=10 + i % 7, sampling=GREEDY, logprobs=2)
        for i, p in enumerate(prompts(24, model[0].vocab_size))
    ]

    def answer(request: GenerationRequest) -> tuple[list[int], str, str, list]:
        chunks = list(engine.submit(request))
        return (*summary(chunks), [lp for c in chunks for lp in c.logprobs or []])

    alone = [answer(r) for r in requests]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(answer, requests))
    assert together == alone
    assert all(reason in ("stop", "length") for _, _, reason, _ in alone)
    assert all(len(logprobs) == len(tokens) for tokens, _, _, logprobs in alone)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_sampled_neighbours_change_no_greedy_answer_and_seeds_reproduce(make_engine, model, weights):
    engine = make_engine(weights)
    ps = prompts(12, model[0].vocab_size)
    greedy = [GenerationRequest(p, 12, GREEDY) for p in ps[:6]]
    sampled = [
        GenerationRequest(p, 12, SamplingOptions(temperature=1.0, top_p=0.9, top_k=0, seed=i))
        for i, p in enumerate(ps[6:])
    ]
    greedy_alone = [run(engine, r) for r in greedy]
    sampled_alone = [run(engine, r) for r in sampled]
    with ThreadPoolExecutor(12) as pool:
        mixed = list(pool.map(lambda r: run(engine, r), greedy + sampled))
    assert mixed[:6] == greedy_alone
    assert mixed[6:] == sampled_alone  # a seeded request draws the same tokens alone or in a batch
    assert len({tuple(t) for t, _, _ in sampled_alone}) > 1


def test_stop_string_ends_the_answer_before_it(make_engine, model):
    engine = make_engine()
    prompt = prompts(1, model[0].vocab_size)[0]
    _, full_text, _ = run(engine, GenerationRequest(prompt, 30, GREEDY, ignore_eos=True))
    stop = full_text[8:11]
    assert len(stop) == 3 and stop in full_text
    _, text, reason = run(engine, GenerationRequest(prompt, 30, GREEDY, stop=(stop,), ignore_eos=True))
    assert reason == "stop" and text == full_text[: full_text.index(stop)]


def test_cancelled_request_frees_its_slot_within_a_chunk(make_engine, model):
    engine = make_engine(slots=1, cache_len=512)
    long = GenerationRequest([5, 6, 7], max_new_tokens=500, sampling=GREEDY, ignore_eos=True)
    chunks = engine.submit(long)
    first = next(iter(chunks))
    assert not first.finish_reason
    engine.abort(long.request_id)
    reasons = [c.finish_reason for c in chunks]
    assert reasons[-1] == "abort"
    tokens, _, reason = run(engine, GenerationRequest([8, 9], 4, GREEDY, ignore_eos=True))  # the slot is free
    assert len(tokens) == 4 and reason == "length"
    assert engine.stats()["active_slots"] == 0


def test_timeout_ends_a_waiting_or_running_request_and_frees_its_place(model):
    """A request's timeout, counted from submission, ends it with "abort" whether it waits for a slot
    (no tokens) or decodes (the tokens so far), and its slot goes to the next request; requests without
    a timeout, or whose timeout has not passed, run on. The engine is driven by hand with explicit clock
    readings."""
    engine = start_engine(model, slots=1, cache_len=512, start=False)
    running = engine.submit(GenerationRequest([5, 6], 400, GREEDY, ignore_eos=True, timeout_s=2.0))
    waiting = engine.submit(GenerationRequest([7, 8], 4, GREEDY, ignore_eos=True, timeout_s=0.5))
    patient = engine.submit(GenerationRequest([9, 10], 4, GREEDY, ignore_eos=True))
    engine._take_inbox(block=False)
    engine.scheduler.admit(engine.tokenizer.incremental_decoder)
    engine._prefill()
    engine._decode()
    start = running.submitted_at
    engine._end_overdue(start + 0.2)
    assert engine.scheduler.busy_slots == 1 and len(engine.scheduler.waiting) == 2
    engine._end_overdue(start + 1.0)  # past the waiting request's timeout only
    assert [c.finish_reason for c in waiting] == ["abort"] and len(engine.scheduler.waiting) == 1
    engine._end_overdue(start + 2.0)
    running_chunks = list(running)
    assert running_chunks[-1].finish_reason == "abort"
    assert 0 < running_chunks[-1].tokens_generated < 400
    assert engine.scheduler.busy_slots == 0 and not engine.state.active.any()
    engine.start()
    assert [c.finish_reason for c in patient][-1] == "length"
    assert engine.finished["abort"] == 2
    engine.shutdown(drain_timeout_s=0)
    with pytest.raises(BadRequestError, match="timeout"):
        GenerationRequest([5], 4, GREEDY, timeout_s=0)


def test_full_queue_rejects_at_once_without_disturbing_admitted(make_engine, model):
    engine = make_engine(slots=1, max_waiting=1, cache_len=512)
    running = engine.submit(GenerationRequest([5, 6], 300, GREEDY, ignore_eos=True))
    time.sleep(0.3)  # the first takes the slot
    waiting = engine.submit(GenerationRequest([7, 8], 5, GREEDY, ignore_eos=True))
    started = time.monotonic()
    with pytest.raises(OverloadedError, match="retry"):
        for _ in range(5):
            engine.submit(GenerationRequest([9], 5, GREEDY))
    assert time.monotonic() - started < 0.5
    assert sum(len(c.token_ids) for c in running) == 300
    assert sum(len(c.token_ids) for c in waiting) == 5


def test_engine_failure_reaches_every_waiting_client(make_engine, model):
    engine = make_engine(slots=2)

    def broken_decode(*args, **kwargs):
        raise RuntimeError("device lost")

    engine.runner.decode = broken_decode
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(run(engine, GenerationRequest([5, 6], 9, GREEDY))))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [reason for _, _, reason in results] == ["error"] * 3
    assert not engine.alive and "device lost" in engine.stats()["engine_error"]


def next_token_logits(model, ids: list[int]) -> np.ndarray:
    """The model's logits after `ids`, from a full forward pass with a fresh cache (no engine)."""
    cfg, params, _ = model
    cache = llama.init_cache(cfg, 1, len(ids), jnp.float32)
    zero = jnp.zeros((1,), jnp.int32)
    logits, _ = llama.forward(
        llama.head_params(params),
        llama.layer_params(params, cfg),
        cfg,
        jnp.asarray([ids]),
        cache,
        write_pos=zero,
        start=zero,
        attn_len=len(ids),
        logit_index=jnp.asarray([len(ids) - 1]),
    )
    return np.asarray(logits[0], np.float64)


def test_penalized_greedy_answer_matches_a_direct_reference(make_engine, model):
    """Repetition, presence and frequency penalties, checked step by step against numpy on full-forward
    logits; a penalized request beside unpenalized ones leaves both unchanged."""
    engine = make_engine()
    prompt = prompts(1, model[0].vocab_size)[0][:12]
    options = SamplingOptions(
        greedy=True, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3
    )
    tokens, _, _ = run(engine, GenerationRequest(prompt, 10, options, ignore_eos=True))
    expected: list[int] = []
    for _ in range(10):
        logits = next_token_logits(model, prompt + expected)
        counts = np.bincount(expected, minlength=logits.size)
        seen = (counts > 0) | np.isin(np.arange(logits.size), prompt)
        logits = np.where(seen, np.where(logits > 0, logits / 1.3, logits * 1.3), logits)
        logits = logits - 0.3 * counts - 0.4 * (counts > 0)
        expected.append(int(np.argmax(logits)))
    assert tokens == expected
    plain = GenerationRequest(prompt, 10, GREEDY, ignore_eos=True)
    assert run(engine, plain)[0] != expected  # the penalties changed the answer
    with ThreadPoolExecutor(4) as pool:
        mixed = list(
            pool.map(
                lambda r: run(engine, r)[0],
                [plain, GenerationRequest(prompt, 10, options, ignore_eos=True)] * 2,
            )
        )
    assert mixed == [run(engine, plain)[0], expected] * 2


def test_logprobs_are_the_models_distribution_at_each_step(make_engine, model):
    engine = make_engine()
    prompt = prompts(2, model[0].vocab_size)[1][:20]
    chunks = list(engine.submit(GenerationRequest(prompt, 6, GREEDY, ignore_eos=True, logprobs=3)))
    tokens = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks for lp in c.logprobs or []]
    assert [lp.token_id for lp in logprobs] == tokens and len(tokens) == 6
    for i, lp in enumerate(logprobs):
        logits = next_token_logits(model, prompt + tokens[:i])
        reference = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert lp.logprob == pytest.approx(reference[lp.token_id], abs=1e-4)
        assert [t for t, _ in lp.top] == np.argsort(-reference)[:3].tolist()
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely token
    no_logprobs = list(engine.submit(GenerationRequest(prompt, 6, GREEDY, ignore_eos=True)))
    assert all(c.logprobs is None for c in no_logprobs)
    assert [t for c in no_logprobs for t in c.token_ids] == tokens


def test_a_chunk_ends_at_the_step_where_a_row_finishes(model):
    """Rows with 3 and 20 tokens to go in a chunk of up to 16 steps: the chunk stops after the third, so
    the finished row's slot and answer are released at once; the other row goes on in the next chunk."""
    cfg, params, _ = model
    runner = Runner(
        cfg, params, slots=4, cache_len=64, steps_per_call=16, eos_ids=(), cache_dtype=jnp.float32
    )
    state = idle_state(4)
    greedy = sampling_rows(1, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
    for slot, remaining in ((0, 3), (2, 20)):
        set_slot(
            state, slot, token=5, length=8, start=0, remaining=remaining, stop_at_eos=False, sampling=greedy
        )
    outputs, state = runner.decode(state)
    assert outputs.emitted.sum(axis=1).tolist() == [3, 0, 3, 0]
    assert state.active.tolist() == [False, False, True, False] and state.remaining[2] == 17
    outputs, state = runner.decode(state)
    assert outputs.emitted.sum(axis=1).tolist() == [0, 0, 16, 0]


@pytest.mark.parametrize(("budget", "first_turn"), [(32, 3), (2048, 5)])
def test_prefill_budget_bounds_the_prompts_written_while_others_decode(model, budget, first_turn):
    """Five 12-token prompts wait. The first is prefilled whatever the budget (nothing decodes yet); then
    pieces follow while budget remains (the one that crosses it included): with 32 tokens, three prompts
    in the first turn and the other two in the next; with 2048, all five at once."""
    engine = start_engine(model, prefill_chunk=16, prefill_budget=budget, start=False)
    for i in range(5):
        engine.submit(GenerationRequest([5 + i] * 12, 4, SamplingOptions(greedy=True)))
    engine._take_inbox(block=False)
    engine.scheduler.admit(engine.tokenizer.incremental_decoder)
    engine._prefill()
    assert (len(engine.scheduler.decoding), engine.totals.prompt_tokens) == (first_turn, 12 * first_turn)
    engine._prefill()
    assert (len(engine.scheduler.decoding), len(engine.scheduler.prefilling)) == (5, 0)


def answer_with_logprobs(engine: Engine, prompt: list[int], n: int = 8) -> tuple[list[int], list]:
    chunks = list(engine.submit(GenerationRequest(prompt, n, GREEDY, ignore_eos=True, logprobs=2)))
    return [t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs or []]


@pytest.mark.parametrize("prefill_chunk", [16, 64])  # 64: prompts are left-padded (start > 0), in one piece
@pytest.mark.parametrize("attention_kernel", [None, pytest.param(False, id="xla-attention")])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_prefix_reuse_prefills_only_the_rest_and_changes_no_answer(
    make_engine, model, weights, attention_kernel, prefill_chunk
):
    """Prompts that begin as an earlier one did (a shared 20-token start; a conversation's next turn,
    which holds the last answer) prefill only what follows the tokens their slot still holds, and get
    the tokens and log-probabilities they get from an engine that reuses nothing: to the last bit where
    the kernels attend (one row at a time), to 1e-5 where XLA attends over padded buckets, whose sums
    round differently by shape (as prompts prefilled in other pieces do)."""
    vocab = model[0].vocab_size
    shared, first_tail, second_tail = prompts(3, vocab)[0][:20], [7, 8, 9], [11, 12, 13, 14, 15]
    first = shared + first_tail
    settings = {"weights": weights, "slots": 2, "attention_kernel": attention_kernel}
    settings["prefill_chunk"] = prefill_chunk

    def same(got: tuple[list[int], list], want: tuple[list[int], list]) -> bool:
        if attention_kernel is None:
            return got == want
        values = [[lp.logprob, *(v for _, v in lp.top)] for lp in got[1]]
        wanted = [[lp.logprob, *(v for _, v in lp.top)] for lp in want[1]]
        return got[0] == want[0] and np.allclose(values, wanted, rtol=0, atol=1e-5)

    fresh = make_engine(reuse_prefixes=False, **settings)
    first_answer = answer_with_logprobs(fresh, first)
    conversation = first + first_answer[0] + [14, 15, 16]
    expected = [answer_with_logprobs(fresh, p) for p in (conversation, shared + second_tail)]
    assert fresh.totals.prompt_tokens_reused == 0

    engine = make_engine(reuse_prefixes=True, **settings)
    assert same(answer_with_logprobs(engine, first), first_answer)
    assert engine.totals.prompt_tokens_reused == 0
    # The first prompt's slot holds it and all but the last token of its answer (never fed back).
    assert same(answer_with_logprobs(engine, conversation), expected[0])
    reused_by_conversation = len(first) + len(first_answer[0]) - 1
    assert engine.totals.prompt_tokens_reused == reused_by_conversation
    assert same(answer_with_logprobs(engine, shared + second_tail), expected[1])
    assert engine.totals.prompt_tokens_reused == reused_by_conversation + len(shared)
    written = len(first) + len(conversation) + len(shared + second_tail) - engine.totals.prompt_tokens_reused
    assert engine.totals.prompt_tokens == written


def test_prefix_reuse_picks_the_slot_with_the_longest_match_and_keeps_the_answers_room(model):
    """Among free slots, the one holding the longest start of the prompt; never the whole prompt (its
    last token's logits give the first new token); a left-padded slot only if the answer still fits;
    else the least recently freed slot, leaving the newer contents for later."""
    engine = start_engine(model, slots=4, cache_len=64, start=False)
    scheduler = engine.scheduler
    held = {0: (0, [1, 2, 3, 4]), 1: (0, [1, 2, 3, 4, 5, 6, 7]), 2: (0, [1, 2]), 3: (40, [1, 2, 3, 4, 5, 6])}
    for slot, (start, tokens) in held.items():
        scheduler.contents[slot] = SlotContents(start, np.asarray(tokens))
    scheduler.free_slots = [1, 0, 3, 2]  # slot 2 freed first, slot 1 last

    def pick(prompt: list[int], max_new_tokens: int = 8) -> tuple[int, int, int]:
        return scheduler._pick_slot(GenerationRequest(prompt, max_new_tokens, GREEDY))

    assert pick([1, 2, 3, 4, 5, 6, 7, 9]) == (1, 0, 7)
    # The whole prompt is held: its last token is prefilled again. Slot 3 leaves 64 - 40 - 7 < 20.
    assert pick([1, 2, 3, 4, 5, 6, 7], max_new_tokens=20) == (1, 0, 6)
    assert pick([1, 2, 3, 4, 5, 6, 9]) == (3, 40, 6)  # equal matches: the less recently freed slot
    assert pick([1, 2, 3, 4, 5, 6, 9], max_new_tokens=20) == (1, 0, 6)
    assert pick([9, 9]) == (2, 0, 0)
    scheduler.reuse_prefixes = False
    assert pick([1, 2, 3, 4, 5, 6, 9]) == (2, 0, 0)


def test_prefix_donor_is_the_slot_holding_the_most_of_the_prompt_busy_or_free(model):
    """`donor` looks at every other slot: what a free one remembers, what a busy one has written (the
    prompt so far, then all but the last generated token), and names the one holding the longest start of
    the prompt, if that is at least MIN_COPY_TOKENS more than the request's own slot holds; never the
    whole prompt, and never a left-padded row."""
    engine = start_engine(model, slots=4, cache_len=96, start=False)
    scheduler = engine.scheduler
    base = list(range(100, 140))
    requests = [GenerationRequest(p, 8, GREEDY) for p in (base[:30], base[:34] + [1, 2], base[:25])]
    for request in requests:
        engine.submit(request)
    engine._take_inbox(block=False)
    writer, taker, whole = scheduler.admit(engine.tokenizer.incremental_decoder)
    assert scheduler.donor(taker) is None  # nothing written yet
    writer.prefilled = 30
    assert scheduler.donor(taker) == (writer.slot, 0, 30)
    assert scheduler.donor(whole) == (writer.slot, 0, 24)  # the prompt's last token is prefilled
    scheduler.start_decoding(writer)
    writer.generated = [130, 131, 132, 133, 134]  # base continues; the last token has no entry yet
    assert scheduler.donor(taker) == (writer.slot, 0, 34)
    taker.prefilled = 19  # 34 - 19 < MIN_COPY_TOKENS
    assert scheduler.donor(taker) is None
    taker.prefilled = 0
    engine._finish(writer, "stop")  # freed slots keep offering what they hold
    assert scheduler.donor(taker) == (writer.slot, 0, 34)
    scheduler.contents[writer.slot] = SlotContents(3, np.asarray(base))
    assert scheduler.donor(taker) == (writer.slot, 3, 34)
    scheduler.contents[writer.slot] = SlotContents(96 - 36 - 8 + 1, np.asarray(base))
    assert scheduler.donor(taker) is None  # the answer would not have its 8 tokens of room
    scheduler.contents[writer.slot] = SlotContents(3, np.asarray(base))
    taker.prefilled = 1  # at start 0
    assert scheduler.donor(taker) is None
    scheduler.reuse_prefixes = False
    scheduler.contents[writer.slot] = SlotContents(0, np.asarray(base))
    assert scheduler.donor(taker) is None


@pytest.mark.parametrize("prefill_chunk", [16, 64])  # 64: the first prompt is left-padded, the others follow
@pytest.mark.parametrize("attention_kernel", [None, pytest.param(False, id="xla-attention")])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_prompts_sharing_a_start_copy_it_from_each_other_and_change_no_answer(
    make_engine, model, weights, attention_kernel, prefill_chunk
):
    """Requests that arrive together with one 40-token start (a system prompt) and different ends: the
    first prefills it, the others copy its entries from the first's slot (with its left padding, if any)
    and prefill only their ends, and each gets the tokens and log-probabilities it gets from an engine
    that reuses nothing (to the last bit where the kernels attend, to 1e-5 where XLA attends over padded
    buckets)."""
    vocab = model[0].vocab_size
    shared = (prompts(1, vocab)[0] * 40)[:40]
    requests = [shared + [7 + i] * (3 + i) for i in range(3)]
    settings = {"weights": weights, "slots": 4, "attention_kernel": attention_kernel}
    settings["prefill_chunk"] = prefill_chunk
    fresh = make_engine(reuse_prefixes=False, **settings)
    expected = [answer_with_logprobs(fresh, p) for p in requests]

    engine = make_engine(reuse_prefixes=True, start=False, **settings)
    streams = [engine.submit(GenerationRequest(p, 8, GREEDY, ignore_eos=True, logprobs=2)) for p in requests]
    engine._take_inbox(block=False)
    assert len(engine.scheduler.admit(engine.tokenizer.incremental_decoder)) == 3
    engine.start()
    got = []
    for stream in streams:
        chunks = list(stream)
        got.append(
            ([t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs or []])
        )
    assert engine.totals.prompt_tokens_copied == engine.totals.prompt_tokens_reused == 2 * 40
    assert engine.totals.prompt_tokens == sum(map(len, requests)) - 2 * 40
    for answer, want in zip(got, expected, strict=True):
        assert answer[0] == want[0]
        values = [[lp.logprob, *(v for _, v in lp.top)] for lp in answer[1]]
        wanted = [[lp.logprob, *(v for _, v in lp.top)] for lp in want[1]]
        np.testing.assert_allclose(values, wanted, rtol=0, atol=0 if attention_kernel is None else 1e-5)


@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])  # (2, 2, 2): slots and kv heads split over devices
def test_copy_prefix_copies_one_slots_first_entries_into_another(model, mesh_shape):
    """`Runner.copy_prefix` replaces the destination row's first entries (whole key blocks, a power of two
    of positions) by the source row's, keys and values of every layer, and leaves everything else as it
    was, also with the cache split over 8 devices."""
    cfg = model[0]
    sharding = None
    if mesh_shape is not None:
        mesh = make_mesh(("dp", "fsdp", "mp"), mesh_shape)
        sharding = cache_sharding((4, cfg.num_kv_heads, 64, cfg.head_dim), mesh)
    runner = make_runner(model, cache_len=64, cache_sharding=sharding)
    rng = np.random.default_rng(0)
    filled = [rng.standard_normal(a.shape).astype(np.float32) for a in (*runner.cache.k, *runner.cache.v)]
    put = (lambda a: jax.device_put(a, sharding)) if sharding is not None else jnp.asarray
    half = len(filled) // 2
    runner.cache = llama.KVCache(tuple(map(put, filled[:half])), tuple(map(put, filled[half:])))
    placed = [a.sharding for a in (*runner.cache.k, *runner.cache.v)]
    runner.copy_prefix(1, 2, 20)  # 20 tokens: 32 positions, two key blocks
    for before, after, where in zip(filled, (*runner.cache.k, *runner.cache.v), placed, strict=True):
        assert after.sharding.is_equivalent_to(where, before.ndim)  # still split as it was
        expected = before.copy()
        count = 2 if before.ndim == 5 else 32  # key blocks or positions
        expected[2, :, :count] = before[1, :, :count]
        np.testing.assert_array_equal(np.asarray(after), expected)


def test_decode_shapes_compiled_ahead_are_the_ones_decode_calls(model):
    """`compile_ahead` (on another thread) compiles the very program a later decode of that shape runs,
    counting the shapes it has yet to compile (what /status reports) down to zero."""
    runner = make_runner(model)
    state = idle_state(4)
    greedy = sampling_rows(1, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)
    for slot in range(4):
        set_slot(state, slot, token=5, length=150, start=0, remaining=100, stop_at_eos=False, sampling=greedy)
    runner.decode(idle_state(4))  # an earlier call donated the first cache arrays
    assert runner.decode_shape(state, 4) == (4, 256)
    compilations: list[str] = []
    pending_while_compiling: list[int] = []

    def count(event: str, seconds: float, **_) -> None:
        if event.endswith("backend_compile_duration"):
            compilations.append(event)
            pending_while_compiling.append(runner.shapes_to_compile)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        ahead = threading.Thread(target=runner.compile_ahead, args=([(4, 256)],))
        ahead.start()
        ahead.join()
        assert len(compilations) == 1
        assert pending_while_compiling == [1] and runner.shapes_to_compile == 0
        outputs, after = runner.decode(state)
        assert len(compilations) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert outputs.emitted.all() and (after.lengths == 154).all()


@pytest.mark.parametrize("slots", [1, 6, 32, 256])
def test_row_buckets_cover_every_batch_with_little_padding(slots):
    """Every number of active rows fits its bucket; past 8 rows at most a fifth of a bucket is padding,
    and the number of decode shapes grows by four per doubling of the slots."""
    sizes = {row_bucket(n, slots) for n in range(1, slots + 1)}
    for n in range(1, slots + 1):
        rows = row_bucket(n, slots)
        assert n <= rows <= slots
        if n > 8:
            assert (rows - n) / rows <= 0.2
    assert slots in sizes and len(sizes) <= 4 + 4 * max(0, (slots - 1).bit_length() - 3)
