"""The paged runner under the paged scheduler: greedy answers of requests that share steps, are prefilled in
pieces beside decode tokens, share cached prefix pages and are preempted equal each request's answer by
recomputation over the unpaged model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.engine.page_pool import PagePool
from jaxserver.engine.request import GenerationRequest, SamplingOptions
from jaxserver.engine.runner import Runner
from jaxserver.engine.scheduler import Scheduler, Sequence
from jaxserver.model import llama, paged
from jaxserver.model.loader import load_model


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    cfg, params, _ = load_model(tiny_llama_dir)
    return cfg, jax.tree.map(jnp.asarray, params)


def recompute_logits(cfg, params, length: int = 128):
    """A function of tokens -> the unpaged model's logits (XLA attention) after the last of them, from a
    fresh pass padded to one compiled length (a position's logits do not see the padding after it)."""
    head, layers = llama.head_params(params), llama.layer_params(params, cfg)

    @jax.jit
    def last_logits(ids: jax.Array, index: jax.Array) -> jax.Array:
        cache = llama.init_cache(cfg, 1, length, jnp.float32)
        zeros = jnp.zeros((1,), jnp.int32)
        logits, _ = llama.forward(head, layers, cfg, ids, cache, zeros, logit_index=index)
        return logits[0]

    def logits_after(ids: list[int]) -> np.ndarray:
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        return np.asarray(last_logits(padded, np.asarray([len(ids) - 1], np.int32)))

    return logits_after


def greedy_by_recompute(cfg, params, prompt: list[int], n: int) -> list[int]:
    logits_after, ids = recompute_logits(cfg, params), list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(logits_after(ids))))
    return ids[len(prompt) :]


def generate(
    cfg,
    params,
    prompts: list[list[int]],
    new_tokens: list[int],
    pages: int,
    budget: int,
    decode_steps: int = 1,
):
    """Greedy answers as an engine would run them: a step of decode tokens only (and nobody waiting) runs
    up to `decode_steps` steps in one call."""
    runner = Runner(
        cfg,
        params,
        pages=pages,
        max_num_seqs=4,
        max_length=128,
        cache_dtype=jnp.float32,
        max_num_batched_tokens=budget,
        max_decode_steps=decode_steps,
        compile_lazily=True,
    )
    scheduler = Scheduler(PagePool(pages, paged.PAGE_TOKENS), max_num_seqs=4, max_num_batched_tokens=budget)
    greedy = SamplingOptions(greedy=True)
    seqs = [
        scheduler.add(Sequence(GenerationRequest(p, n, sampling=greedy))) for p, n in zip(prompts, new_tokens)
    ]
    chunks = 0  # calls that ran several decode steps
    for _ in range(500):
        if not scheduler.running and not scheduler.waiting:
            break
        plan = scheduler.schedule()
        decoding_only = all(piece.end - piece.start == 1 and piece.samples for piece in plan.pieces)
        steps = scheduler.reserve(plan, decode_steps) if decoding_only and not scheduler.waiting else 1
        if steps > 1:
            generated = runner.decode(plan, steps)
            chunks += 1
        else:
            generated = {index: [token] for index, (token, _) in runner.step(plan).items()}
        for index, tokens in generated.items():
            plan.pieces[index].seq.generated += tokens
        # A multi-step chunk computed one token per token it generated; a step computed its pieces.
        ends = {i: plan.pieces[i].start + len(t) for i, t in generated.items()} if steps > 1 else None
        scheduler.computed(plan, ends)
        for index in generated:
            seq = plan.pieces[index].seq
            if len(seq.generated) >= seq.request.max_new_tokens:
                scheduler.finish(seq)
    return [seq.generated for seq in seqs], scheduler, chunks


@pytest.mark.parametrize("decode_steps", [1, 4], ids=["one-step", "four-step-decode"])
def test_paged_greedy_answers_equal_recomputation(tiny_model, decode_steps):
    cfg, params = tiny_model
    rng = np.random.default_rng(4)
    system = rng.integers(3, cfg.vocab_size, 20).tolist()  # a shared start: one full page, cached
    prompts = [system + rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 17, 30)]
    prompts.append(rng.integers(3, cfg.vocab_size, 9).tolist())
    # 5 pages of 16 tokens for 4 requests of 16-62 tokens (11 pages in all, one shared): some wait, some
    # are preempted.
    # Budgets that end inside a multi-step chunk end it there.
    new_tokens = [12, 9, 12, 7]
    answers, scheduler, chunks = generate(
        cfg, params, prompts, new_tokens, pages=5, budget=24, decode_steps=decode_steps
    )
    assert scheduler.prefix_hit_pages > 0 and scheduler.preemptions > 0 and (chunks > 0) == (decode_steps > 1)
    for prompt, n, answer in zip(prompts, new_tokens, answers, strict=True):
        assert answer == greedy_by_recompute(cfg, params, prompt, n)


def test_penalties_and_logprobs_follow_the_unpaged_model(tiny_model):
    """A request with repetition, presence and frequency penalties, beside one without, asking for
    logprobs: each greedy token is the argmax of the recomputed logits after vLLM's penalties, and its
    logprob that of the unpenalized distribution."""
    cfg, params = tiny_model
    runner = Runner(
        cfg,
        params,
        pages=16,
        max_num_seqs=4,
        max_length=128,
        cache_dtype=jnp.float32,
        max_num_batched_tokens=64,
    )
    scheduler = Scheduler(PagePool(16, paged.PAGE_TOKENS), max_num_seqs=4, max_num_batched_tokens=64)
    options = SamplingOptions(
        greedy=True, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4
    )
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (11, 6)]
    penalized = scheduler.add(Sequence(GenerationRequest(prompts[0], 10, sampling=options, logprobs=2)))
    plain = scheduler.add(Sequence(GenerationRequest(prompts[1], 10, sampling=SamplingOptions(greedy=True))))
    logprobs = []
    while scheduler.running or scheduler.waiting:
        plan = scheduler.schedule()
        for index, (token, entry) in runner.step(plan).items():
            seq = plan.pieces[index].seq
            seq.generated.append(token)
            if seq is penalized:
                logprobs.append(entry)
        scheduler.computed(plan)
        for seq in (penalized, plain):
            if seq in scheduler.running and len(seq.generated) == 10:
                scheduler.finish(seq)
    logits_after, ids = recompute_logits(cfg, params), list(prompts[0])
    for step, entry in enumerate(logprobs):
        raw = logits_after(ids)
        counts = np.bincount(ids[len(prompts[0]) :], minlength=cfg.vocab_size)
        seen = (counts > 0) | np.isin(np.arange(cfg.vocab_size), prompts[0])
        scaled = np.where(raw > 0, raw / 1.3, raw * 1.3)
        penalties = np.where(seen, scaled, raw) - 0.4 * counts - 0.5 * (counts > 0)
        assert penalized.generated[step] == int(np.argmax(penalties)) == entry.token_id, step
        log_softmax = raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())
        assert entry.logprob == pytest.approx(log_softmax[entry.token_id], abs=1e-4)
        assert [t for t, _ in entry.top] == np.argsort(-log_softmax)[:2].tolist()
        ids.append(entry.token_id)
    assert len(logprobs) == 10 and plain.generated == greedy_by_recompute(cfg, params, prompts[1], 10)
