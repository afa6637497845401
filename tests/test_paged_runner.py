"""The paged runner under the paged scheduler: greedy answers of requests that share steps, are prefilled in
pieces beside decode tokens, share cached prefix pages and are preempted equal each request's answer by
recomputation over the unpaged model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.engine.page_pool import PagePool
from jaxserver.engine.paged_runner import PagedRunner
from jaxserver.engine.paged_scheduler import PagedScheduler
from jaxserver.engine.request import GenerationRequest, SamplingOptions
from jaxserver.model import llama, paged
from jaxserver.model.loader import load_model


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    cfg, params, _ = load_model(tiny_llama_dir)
    return cfg, jax.tree.map(jnp.asarray, params)


def greedy_by_recompute(cfg, params, prompt: list[int], n: int, length: int = 128) -> list[int]:
    """n greedy tokens, each from a fresh pass of the unpaged model (XLA attention) over all tokens so far,
    padded to one compiled length (a position's logits do not see the padding after it)."""
    head, layers = llama.head_params(params), llama.layer_params(params, cfg)

    @jax.jit
    def last_logits(ids: jax.Array, index: jax.Array) -> jax.Array:
        cache = llama.init_cache(cfg, 1, length, jnp.float32)
        zeros = jnp.zeros((1,), jnp.int32)
        logits, _ = llama.forward(head, layers, cfg, ids, cache, zeros, zeros, length, logit_index=index)
        return logits[0]

    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(np.argmax(last_logits(padded, np.asarray([len(ids) - 1], np.int32)))))
    return ids[len(prompt) :]


def generate(cfg, params, prompts: list[list[int]], new_tokens: int, pages: int, budget: int):
    runner = PagedRunner(
        cfg,
        params,
        pages=pages,
        max_num_seqs=4,
        max_length=128,
        cache_dtype=jnp.float32,
        max_num_batched_tokens=budget,
    )
    scheduler = PagedScheduler(
        PagePool(pages, paged.PAGE_TOKENS), max_num_seqs=4, max_num_batched_tokens=budget
    )
    greedy = SamplingOptions(greedy=True)
    seqs = [scheduler.add(GenerationRequest(p, new_tokens, sampling=greedy)) for p in prompts]
    for _ in range(500):
        if not scheduler.running and not scheduler.waiting:
            break
        plan = scheduler.schedule()
        sampled = runner.step(plan)
        scheduler.computed(plan)
        for index, token in sampled.items():
            seq = plan.pieces[index].seq
            seq.generated.append(token)
            if len(seq.generated) == new_tokens:
                scheduler.finish(seq)
    return [seq.generated for seq in seqs], scheduler


def test_paged_greedy_answers_equal_recomputation(tiny_model):
    cfg, params = tiny_model
    rng = np.random.default_rng(4)
    system = rng.integers(3, cfg.vocab_size, 20).tolist()  # a shared start: one full page, cached
    prompts = [system + rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 17, 30)]
    prompts.append(rng.integers(3, cfg.vocab_size, 9).tolist())
    # 8 pages of 16 tokens for 4 requests of 21-62 tokens (12 pages in all, one shared): some wait, some
    # are preempted.
    answers, scheduler = generate(cfg, params, prompts, new_tokens=12, pages=8, budget=24)
    assert scheduler.pool.hits > 0 and scheduler.preemptions > 0
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == greedy_by_recompute(cfg, params, prompt, 12)
