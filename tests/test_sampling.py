"""On-device sampling: greedy, filters, penalties, logprobs, per-row settings and seeded reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.model.sampling import Penalties, SamplingParams, apply_penalties, count_tokens, token_logprobs
from jaxserver.model.sampling import sample as sample_eager

sample = jax.jit(sample_eager)


def rows(
    n,
    *,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    greedy=False,
    seeds=None,
    min_p=0.0,
    presence=0.0,
    frequency=0.0,
    repetition=1.0,
) -> SamplingParams:
    seeds = list(range(n)) if seeds is None else seeds
    return SamplingParams(
        temperature=jnp.full((n,), temperature, jnp.float32),
        top_p=jnp.full((n,), top_p, jnp.float32),
        top_k=jnp.full((n,), top_k, jnp.int32),
        greedy=jnp.full((n,), greedy),
        key=jnp.stack([jax.random.PRNGKey(s) for s in seeds]),
        min_p=jnp.full((n,), min_p, jnp.float32),
        presence_penalty=jnp.full((n,), presence, jnp.float32),
        frequency_penalty=jnp.full((n,), frequency, jnp.float32),
        repetition_penalty=jnp.full((n,), repetition, jnp.float32),
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


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    # probabilities 0.05, 0.5, 0.3, 0.1, 0.05: min_p 0.5 keeps p >= 0.25, so tokens 1 and 2
    assert set(draw_many(lambda n: rows(n, min_p=0.5)).tolist()) == {1, 2}
    assert set(draw_many(lambda n: rows(n, min_p=0.9)).tolist()) == {1}
    assert len(set(draw_many(lambda n: rows(n, min_p=0.0)).tolist())) == 5


def test_penalties_match_their_definitions():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0]])
    penalties = Penalties(
        counts=jnp.asarray([[0, 2, 1, 0]]), in_prompt=jnp.asarray([[True, False, False, False]])
    )
    got = apply_penalties(logits, rows(1, repetition=2.0, presence=0.5, frequency=0.25), penalties)
    # token 0: in the prompt, positive -> /2; token 1: generated twice, negative -> *2, -0.5, -2*0.25;
    # token 2: generated once -> /2, -0.5, -0.25; token 3: untouched
    np.testing.assert_allclose(np.asarray(got), [[1.0, -3.0, -0.5, 3.0]], rtol=1e-6)
    untouched = apply_penalties(logits, rows(1), penalties)
    np.testing.assert_allclose(np.asarray(untouched), np.asarray(logits))


def test_count_tokens_only_counts_live_rows():
    penalties = Penalties(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4), bool))
    penalties = count_tokens(penalties, jnp.asarray([3, 1]), jnp.asarray([True, False]))
    penalties = count_tokens(penalties, jnp.asarray([3, 1]), jnp.asarray([True, True]))
    assert np.asarray(penalties.counts).tolist() == [[0, 0, 0, 2], [0, 1, 0, 0]]


def test_greedy_with_a_penalty_avoids_the_repeated_token():
    penalties = Penalties(jnp.asarray([[0, 1, 0, 0, 0]]), jnp.zeros((1, 5), bool))
    penalized = apply_penalties(LOGITS, rows(1, greedy=True, presence=2.0), penalties)
    assert int(sample(penalized, rows(1, greedy=True), jnp.zeros((1,), jnp.int32))[0]) == 2


def test_token_logprobs_are_the_log_softmax_and_its_top_entries():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 50))
    tokens = jnp.asarray([4, 7, 9])
    arrays = token_logprobs(logits, tokens, 5)
    reference = np.asarray(
        jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits)
    )
    np.testing.assert_allclose(np.asarray(arrays.chosen), reference[[0, 1, 2], [4, 7, 9]], atol=1e-5)
    expected_top = np.argsort(-reference, axis=-1)[:, :5]
    assert np.asarray(arrays.top_ids).tolist() == expected_top.tolist()
    np.testing.assert_allclose(
        np.asarray(arrays.top_values), np.sort(reference, -1)[:, ::-1][:, :5], atol=1e-5
    )
