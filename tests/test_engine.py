"""The engine over the paged runner: batched, preempted and prefix-sharing requests answer as each alone,
sampling and penalties against direct references, cancellation, timeouts, overload and failure."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.engine import step_relay
from jaxserver.engine.engine import ENGINE_FAILED, Engine
from jaxserver.engine.request import GenerationChunk, GenerationRequest, SamplingOptions
from jaxserver.engine.runner import Runner
from jaxserver.errors import BadRequestError, EngineError, OverloadedError
from jaxserver.model import cpu_kernels, llama, paged
from jaxserver.model.loader import load_model
from jaxserver.parallel.mesh import make_mesh, paged_cache_sharding, shard_params

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


def start_engine(
    model,
    *,
    max_num_seqs=8,
    max_waiting=64,
    steps=4,
    budget=32,
    max_length=128,
    pages=64,
    cache_dtype=jnp.float32,
    start=True,
    prefix_caching=True,
    mesh_shape=None,
) -> Engine:
    """An engine on `model` (config, params, tokenizer), its thread started unless `start` is False (a test
    then drives its steps); with `mesh_shape`, over a mesh of the test's 8 devices."""
    cfg, params, tokenizer = model
    cache_sharding = None
    if mesh_shape is not None:
        mesh = make_mesh(("dp", "fsdp", "mp"), mesh_shape)
        params, cache_sharding = shard_params(params, mesh), paged_cache_sharding(cfg, mesh)
    runner = Runner(
        cfg,
        params,
        pages=pages,
        max_num_seqs=max_num_seqs,
        max_length=max_length,
        cache_dtype=cache_dtype,
        max_num_batched_tokens=budget,
        max_decode_steps=steps,
        eos_ids=tokenizer.eos_token_ids,
        compile_lazily=True,
        cache_sharding=cache_sharding,
    )
    engine = Engine(runner, tokenizer, max_waiting=max_waiting, prefix_caching=prefix_caching)
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


# bfloat16 weights decode through the CPU's bf16 matmul kernel, whose rows do not depend on each other;
# XLA's bf16 dot, where the CPU lacks AVX512-BF16, makes no such promise.
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


def test_cancelled_request_frees_its_row_within_a_call(make_engine, model):
    engine = make_engine(max_num_seqs=1, max_length=512)
    long = GenerationRequest([5, 6, 7], max_new_tokens=500, sampling=GREEDY, ignore_eos=True)
    chunks = engine.submit(long)
    first = next(iter(chunks))
    assert not first.finish_reason
    engine.abort(long.request_id)
    reasons = [c.finish_reason for c in chunks]
    assert reasons[-1] == "abort"
    tokens, _, reason = run(engine, GenerationRequest([8, 9], 4, GREEDY, ignore_eos=True))  # the row is free
    assert len(tokens) == 4 and reason == "length"
    stats = engine.stats()
    assert (
        stats["running_requests"] == 0 and stats["kv_cache"]["pages_free"] == stats["kv_cache"]["pages_total"]
    )


def test_timeout_ends_a_waiting_or_running_request_and_frees_its_place(model):
    """A request's timeout, counted from submission, ends it with "abort" whether it waits (no tokens) or
    decodes (the tokens so far), and its row goes to the next request; requests without a timeout, or
    whose timeout has not passed, run on. The engine is driven by hand with explicit clock readings."""
    engine = start_engine(model, max_num_seqs=1, max_length=512, start=False)
    running = engine.submit(GenerationRequest([5, 6], 400, GREEDY, ignore_eos=True, timeout_s=2.0))
    waiting = engine.submit(GenerationRequest([7, 8], 4, GREEDY, ignore_eos=True, timeout_s=0.5))
    patient = engine.submit(GenerationRequest([9, 10], 4, GREEDY, ignore_eos=True))
    engine._take_inbox(block=False)
    for _ in range(2):  # the prompt, then a decode call
        engine._run_plan(engine.scheduler.schedule())
    start = running.submitted_at
    engine._end_overdue(start + 0.2)
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == 2
    engine._end_overdue(start + 1.0)  # past the waiting request's timeout only
    assert [c.finish_reason for c in waiting] == ["abort"] and len(engine.scheduler.waiting) == 1
    engine._end_overdue(start + 2.0)
    running_chunks = list(running)
    assert running_chunks[-1].finish_reason == "abort"
    assert 0 < running_chunks[-1].tokens_generated < 400
    assert not engine.scheduler.running
    engine.start()
    assert [c.finish_reason for c in patient][-1] == "length"
    assert engine.finished["abort"] == 2
    engine.shutdown(drain_timeout_s=0)
    with pytest.raises(BadRequestError, match="timeout"):
        GenerationRequest([5], 4, GREEDY, timeout_s=0)


def test_full_queue_rejects_at_once_without_disturbing_admitted(make_engine, model):
    engine = make_engine(max_num_seqs=1, max_waiting=1, max_length=512)
    running = engine.submit(GenerationRequest([5, 6], 300, GREEDY, ignore_eos=True))
    time.sleep(0.3)  # the first takes the row
    waiting = engine.submit(GenerationRequest([7, 8], 5, GREEDY, ignore_eos=True))
    started = time.monotonic()
    with pytest.raises(OverloadedError, match="retry"):
        for _ in range(5):
            engine.submit(GenerationRequest([9], 5, GREEDY))
    assert time.monotonic() - started < 0.5
    assert sum(len(c.token_ids) for c in running) == 300
    assert sum(len(c.token_ids) for c in waiting) == 5


def test_a_request_the_pool_could_never_hold_is_refused_at_submission(make_engine):
    engine = make_engine(pages=4, max_length=128)  # 64 tokens of pool
    with pytest.raises(BadRequestError, match="pages"):
        engine.submit(GenerationRequest([5] * 10, 60, GREEDY))
    assert run(engine, GenerationRequest([5] * 10, 50, GREEDY, ignore_eos=True))[2] == "length"


def test_engine_failure_reaches_every_waiting_client(make_engine, model):
    engine = make_engine(max_num_seqs=2, start=False)
    reasons = []
    engine.on_failure = reasons.append

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    engine.runner.step = engine.runner.decode = broken
    streams = [engine.submit(GenerationRequest([5, 6], 9, GREEDY)) for _ in range(3)]  # 2 run, 1 waits
    engine.start()
    ends = [list(stream)[-1] for stream in streams]
    assert [(c.finish_reason, c.error) for c in ends] == [("error", ENGINE_FAILED)] * 3  # no internals
    assert not engine.alive and engine.stats()["engine_failed"] and "device lost" in engine.error
    assert reasons == ["RuntimeError: device lost"]  # once, with the cause
    with pytest.raises(EngineError, match="the engine failed"):
        engine.submit(GenerationRequest([5, 6], 9, GREEDY))


def test_a_submission_racing_the_failure_is_refused_or_finished(make_engine, monkeypatch):
    """A request submitted while the engine fails must not sit in an inbox nobody reads: held inside
    `submit` until the failure has drained the inbox, it is refused."""
    engine = make_engine()
    inside, go_on = threading.Event(), threading.Event()
    make_decoder = engine.tokenizer.incremental_decoder

    def held_decoder():
        inside.set()
        go_on.wait(10)
        return make_decoder()

    monkeypatch.setattr(engine.tokenizer, "incremental_decoder", held_decoder)
    with ThreadPoolExecutor(1) as pool:
        submitted = pool.submit(engine.submit, GenerationRequest([5, 6], 9, GREEDY))
        assert inside.wait(10)
        engine.fail("lost a member of the group")
        go_on.set()
        with pytest.raises(EngineError):
            submitted.result(timeout=10)
    assert engine.stats()["waiting_requests"] == 0


def test_a_hung_step_shows_as_a_stall_and_clears_when_it_returns(make_engine):
    engine = make_engine(start=False)
    engine.stall_timeout_s = 0.3
    entered, release = threading.Event(), threading.Event()
    step = engine.runner.step

    def hanging_step(*args, **kwargs):
        entered.set()
        release.wait(10)
        return step(*args, **kwargs)

    engine.runner.step = hanging_step
    stream = engine.submit(GenerationRequest([5, 6], 3, GREEDY))
    engine.start()
    assert entered.wait(10)
    assert engine.stalled_for() is None  # not yet over the bound
    time.sleep(0.5)
    assert engine.stalled_for() > 0.3
    release.set()
    assert summary(list(stream))[2] == "length"
    assert engine.stalled_for() is None


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


def test_logit_bias_matches_a_direct_reference_and_stays_in_its_row(make_engine, model):
    """A logit bias, checked step by step against numpy on full-forward logits: it bans the plain answer's
    tokens and lifts others; beside a plain request both answer as alone."""
    engine = make_engine()
    prompt = prompts(2, model[0].vocab_size)[1][:10]
    plain = GenerationRequest(prompt, 8, GREEDY, ignore_eos=True)
    plain_tokens = run(engine, plain)[0]
    bias = {token: -100.0 for token in plain_tokens[:3]} | {7: 2.5, 11: 1.5}
    options = SamplingOptions(greedy=True, logit_bias=tuple(bias.items()))
    biased = GenerationRequest(prompt, 8, options, ignore_eos=True)
    expected: list[int] = []
    for _ in range(8):
        logits = next_token_logits(model, prompt + expected)
        for token, value in bias.items():
            logits[token] += value
        expected.append(int(np.argmax(logits)))
    assert run(engine, biased)[0] == expected
    assert not set(expected) & set(plain_tokens[:3])
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(lambda r: run(engine, r)[0], [plain, biased] * 2))
    assert mixed == [plain_tokens, expected] * 2


def test_logit_bias_is_checked_at_submission(model):
    from jaxserver.config import JAXServerConfig
    from jaxserver.engine.request import new_request

    config, vocab = JAXServerConfig(max_length=64), model[0].vocab_size
    for bias, fragment in [(((vocab, 1.0),), "token ids"), (((3, 101.0),), "[-100, 100]")]:
        with pytest.raises(BadRequestError, match=re.escape(fragment)) as caught:
            new_request(config, vocab, [5, 6], logit_bias=bias)
        assert caught.value.param == "logit_bias"


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


def test_preempted_requests_answer_as_each_alone(make_engine, model):
    """A pool of 8 pages (128 tokens) for 6 requests of up to 90 tokens each: running requests are
    preempted for older ones' pages, recomputed later, and every answer (tokens and logprobs) is the one
    the request gets alone."""
    engine = make_engine(pages=8, max_num_seqs=4, max_length=128)
    requests = [
        GenerationRequest(p[:40], 50, GREEDY, ignore_eos=True, logprobs=1)
        for p in prompts(6, model[0].vocab_size)
    ]

    def answer(request: GenerationRequest) -> tuple[list[int], list[float]]:
        chunks = list(engine.submit(request))
        return [t for c in chunks for t in c.token_ids], [
            lp.logprob for c in chunks for lp in c.logprobs or []
        ]

    alone = [answer(r) for r in requests]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(answer, requests))
    assert engine.scheduler.preemptions > 0
    assert engine.stats()["step_totals"]["tokens_recomputed"] > 0
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(together, alone, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_shared_prefix_pages_change_no_answer(make_engine, model, weights):
    """Prompts that begin as earlier ones did (a shared 40-token start; a conversation's next turn holding
    the last answer) are computed only from the first page the cache lacks, and get the tokens they get
    from an engine that caches nothing, with logprobs within 1e-5 (a prompt computed in other pieces
    sums in other shapes)."""
    vocab = model[0].vocab_size
    shared = (prompts(3, vocab)[0] * 3)[:40]
    first, second = shared + [7, 8, 9], shared + [11, 12, 13, 14, 15]

    def answer(engine: Engine, prompt: list[int]) -> tuple[list[int], list[float]]:
        chunks = list(engine.submit(GenerationRequest(prompt, 8, GREEDY, ignore_eos=True, logprobs=2)))
        return [t for c in chunks for t in c.token_ids], [
            lp.logprob for c in chunks for lp in c.logprobs or []
        ]

    fresh = make_engine(weights, prefix_caching=False)
    first_answer = answer(fresh, first)
    conversation = first + first_answer[0] + [14, 15, 16]
    expected = [first_answer] + [answer(fresh, p) for p in (conversation, second)]
    assert fresh.totals.prompt_tokens_reused == 0

    engine = make_engine(weights, prefix_caching=True)
    got = [answer(engine, p) for p in (first, conversation, second)]
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, expected, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-5)
    # The conversation found the first request's full pages (its prompt and answer but the last token,
    # never fed back); the second prompt the shared start's two full pages.
    page = paged.PAGE_TOKENS
    assert engine.totals.prompt_tokens_reused == page * ((len(first) + 7) // page) + page * (40 // page)


def test_a_decode_call_ends_at_the_step_where_a_sequence_finishes(make_engine):
    """Sequences with 3 and 20 tokens to go, decoded up to 16 steps per call: the first call stops after
    the third step, so the finished answer is out at once; the other goes on in the next calls, longer
    ones once a call was timed (a tiny model's step is far below DECODE_CALL_S / 16)."""
    engine = make_engine(steps=16, max_length=64, start=False)
    short = engine.submit(GenerationRequest([5] * 6, 4, GREEDY, ignore_eos=True))
    long = engine.submit(GenerationRequest([6] * 6, 21, GREEDY, ignore_eos=True))
    engine.start()  # both are admitted in its first step
    assert [len(c.token_ids) for c in short] == [1, 3]  # the prompt step's token, then one call
    sizes = [len(c.token_ids) for c in long]
    assert sizes[:2] == [1, 3] and sum(sizes) == 21 and 4 < max(sizes) <= 16


@pytest.mark.parametrize("mesh_shape", [None, (1, 1, 8)], ids=["one-device", "8-device-mesh"])
def test_decode_calls_stream_each_step_and_end_at_stop_strings(make_engine, model, monkeypatch, mesh_shape):
    """Handing tokens on at every step: a call of up to 16 steps sends one chunk per token as it runs, and
    a stop string met inside a call ends the answer exactly where it does without streaming. On a mesh a
    program returns before it has run (asynchronous dispatch): the relay must still wait for its end."""
    engine = make_engine(steps=16, max_length=128, mesh_shape=mesh_shape)
    prompt = prompts(1, model[0].vocab_size)[0]
    tokens, full_text, _ = run(engine, GenerationRequest(prompt, 40, GREEDY, ignore_eos=True))
    monkeypatch.setattr(step_relay, "RELAY_INTERVAL_S", 0.0)
    calls = engine.stats()["step_totals"]["decode_calls"]
    chunks = list(engine.submit(GenerationRequest(prompt, 40, GREEDY, ignore_eos=True)))
    assert summary(chunks)[:2] == (tokens, full_text)
    assert all(len(c.token_ids) == 1 for c in chunks[:-1])
    assert engine.stats()["step_totals"]["decode_calls"] - calls < 40 // 4
    stop = full_text[20:23]
    _, text, reason = run(engine, GenerationRequest(prompt, 40, GREEDY, stop=(stop,), ignore_eos=True))
    assert reason == "stop" and text == full_text[: full_text.index(stop)]
    stats = engine.stats()
    assert stats["running_requests"] == 0
    assert stats["kv_cache"]["pages_free"] == stats["kv_cache"]["pages_total"]
