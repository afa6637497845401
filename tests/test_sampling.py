"""On-device sampling: greedy, filters, per-row settings and seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model.sampling import SamplingParams
from jaxserver.model.sampling import sample as sample_eager

sample = jax.jit(sample_eager)


def rows(n, *, temperature=1.0, top_p=1.0, top_k=0, greedy=False, seeds=None) -> SamplingParams:
    seeds = list(range(n)) if seeds is None else seeds
    return SamplingParams(
        temperature=jnp.full((n,), temperature, jnp.float32),
        top_p=jnp.full((n,), top_p, jnp.float32),
        top_k=jnp.full((n,), top_k, jnp.int32),
        greedy=jnp.full((n,), greedy),
        key=jnp.stack([jax.random.PRNGKey(s) for s in seeds]),
    )


LOGITS = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.1, 0.05]], jnp.float32))


def draw_many(params_fn, n=4000) -> np.ndarray:
    logits = jnp.tile(LOGITS, (n, 1))
    return np.asarray(sample(logits, params_fn(n), positions=jnp.zeros((n,), jnp.int32)))


def test_greedy_and_zero_temperature_take_the_argmax():
    assert draw_many(lambda n: rows(n, greedy=True), 50).tolist() == [1] * 50
    assert draw_many(lambda n: rows(n, temperature=0.0), 50).tolist() == [1] * 50


def test_unfiltered_sampling_follows_the_distribution():
    counts = np.bincount(draw_many(lambda n: rows(n)), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.05, 0.5, 0.3, 0.1, 0.05], atol=0.03)


def test_top_k_and_top_p_restrict_the_support():
    assert set(draw_many(lambda n: rows(n, top_k=2)).tolist()) == {1, 2}
    # mass 0.5 (token 1) then 0.8 with token 2: top_p 0.7 keeps exactly {1, 2}
    assert set(draw_many(lambda n: rows(n, top_p=0.7)).tolist()) == {1, 2}
    assert set(draw_many(lambda n: rows(n, top_p=0.4)).tolist()) == {1}


def test_rows_keep_their_own_settings_in_one_batch():
    n = 400
    params = rows(n)._replace(greedy=jnp.arange(n) % 2 == 0)
    drawn = np.asarray(sample(jnp.tile(LOGITS, (n, 1)), params, jnp.zeros((n,), jnp.int32)))
    assert set(drawn[0::2].tolist()) == {1}
    assert len(set(drawn[1::2].tolist())) > 2


def test_same_seed_and_position_give_the_same_token_alone_or_batched():
    logits = jax.random.normal(jax.random.PRNGKey(3), (8, 1000))
    batch = rows(8, seeds=[7] * 8)
    positions = jnp.arange(8)
    together = np.asarray(sample(logits, batch, positions))
    alone = [int(sample(logits[i : i + 1], rows(1, seeds=[7]), positions[i : i + 1])[0]) for i in range(8)]
    assert together.tolist() == alone
    assert len(set(together.tolist())) > 1  # different positions draw differently
