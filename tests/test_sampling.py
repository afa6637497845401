"""On-device sampling: greedy, filters, penalties, logprobs, per-row settings and seeded reproducibility."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.model.sampling import (
    Penalties,
    SamplingArrays,
    apply_penalties,
    argmax_rows,
    count_tokens,
    token_logprobs,
)
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
) -> SamplingArrays:
    seeds = list(range(n)) if seeds is None else seeds
    return SamplingArrays(
        temperature=jnp.full((n,), temperature, jnp.float32),
        top_p=jnp.full((n,), top_p, jnp.float32),
        top_k=jnp.full((n,), top_k, jnp.int32),
        greedy=jnp.full((n,), greedy),
        key=jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)),
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


def test_argmax_rows_matches_numpy_including_ties():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    logits[1, [17, 400, 999]] = 9.0  # a tie: the first index wins, as in numpy
    logits[2, -1] = 9.0  # the maximum at the last index
    logits[3] = -np.inf
    logits[3, 5] = -1e30  # the only finite entry
    logits[4, [3, 700]] = np.inf  # infinite maxima tie too
    assert np.asarray(jax.jit(argmax_rows)(jnp.asarray(logits))).tolist() == np.argmax(logits, -1).tolist()


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
        counts=jnp.asarray([[0, 2, 1, 0]]),
        in_prompt=jnp.asarray([[True, False, False, False]]),
        bias=jnp.zeros((1, 4)),
    )
    got = apply_penalties(logits, rows(1, repetition=2.0, presence=0.5, frequency=0.25), penalties)
    # token 0: in the prompt, positive -> /2; token 1: generated twice, negative -> *2, -0.5, -2*0.25;
    # token 2: generated once -> /2, -0.5, -0.25; token 3: untouched
    np.testing.assert_allclose(np.asarray(got), [[1.0, -3.0, -0.5, 3.0]], rtol=1e-6)
    untouched = apply_penalties(logits, rows(1), penalties)
    np.testing.assert_allclose(np.asarray(untouched), np.asarray(logits))
    # The bias is added after the penalties.
    biased = apply_penalties(logits, rows(1), penalties._replace(bias=jnp.asarray([[0.0, 5.0, 0.0, -100.0]])))
    np.testing.assert_allclose(np.asarray(biased), [[2.0, 4.0, 0.5, -97.0]], rtol=1e-6)


def test_count_tokens_only_counts_live_rows():
    penalties = Penalties(jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4), bool), jnp.zeros((2, 4)))
    penalties = count_tokens(penalties, jnp.asarray([3, 1]), jnp.asarray([True, False]))
    penalties = count_tokens(penalties, jnp.asarray([3, 1]), jnp.asarray([True, True]))
    assert np.asarray(penalties.counts).tolist() == [[0, 0, 0, 2], [0, 1, 0, 0]]


def test_greedy_with_a_penalty_avoids_the_repeated_token():
    penalties = Penalties(jnp.asarray([[0, 1, 0, 0, 0]]), jnp.zeros((1, 5), bool), jnp.zeros((1, 5)))
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


# --- a vocabulary larger than the sampler's candidates, so both of its paths run ------------------------

BIG_VOCAB = 1000  # > CANDIDATES
BIG_LOGITS = jax.random.normal(jax.random.PRNGKey(11), (1, BIG_VOCAB)) * 1.5


def kept_by_sorting(logits: np.ndarray, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0) -> set[int]:
    """The tokens top-k, top-p and min-p keep, by the textbook definition over a full sort (float64)."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = mass_before < top_p
    if top_k:
        keep &= np.arange(len(order)) < top_k
    keep &= probs[order] >= min_p * probs.max()
    return set(order[keep].tolist())


def draws(n=3000, **settings) -> np.ndarray:
    params = rows(n, **settings)
    logits = jnp.tile(BIG_LOGITS, (n, 1))
    return np.asarray(sample(logits, params, jnp.zeros((n,), jnp.int32)))


def test_the_candidates_come_from_a_partial_sort():
    """XLA's CPU backend sorts the whole vocabulary when later slices of a top-k get folded into it."""
    from jaxserver.model.sampling import _draw

    logits = jnp.tile(BIG_LOGITS, (4, 1))
    hlo = jax.jit(_draw).lower(logits, rows(4, top_p=0.9), jnp.zeros((4,))).compile().as_text()
    assert re.findall(r'custom_call_target="([^"]+)"', hlo) == ["TopK"]
    assert not re.findall(r" sort\(", hlo)


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 40},  # within the candidates
        {"top_p": 0.6},  # a nucleus of some hundred tokens: more than the candidates
        {"top_k": 600},  # top-k beyond the candidates
        {"top_p": 0.97, "top_k": 700, "temperature": 0.7},
        {"min_p": 0.05, "temperature": 2.0},  # min-p keeps more than the candidates
        {"top_p": 0.5, "min_p": 0.3},
    ],
)
def test_filters_keep_what_a_full_sort_keeps(settings):
    kept = kept_by_sorting(np.asarray(BIG_LOGITS[0]), **settings)
    drawn = draws(**settings)
    assert set(drawn.tolist()) <= kept
    # Draws reach deep into the kept set when it is large: the second path ran where it had to.
    ranks = np.argsort(np.argsort(-np.asarray(BIG_LOGITS[0])))
    if len(kept) > 256:
        assert ranks[drawn].max() >= 256, (len(kept), ranks[drawn].max())


def test_unfiltered_and_nucleus_sampling_follow_the_distribution():
    logits = np.asarray(BIG_LOGITS[0]).astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    head = np.argsort(-probs)[:20]
    for settings, support in (({}, probs), ({"top_p": 0.6}, None)):
        if support is None:
            kept = sorted(kept_by_sorting(logits, **settings))
            support = np.zeros_like(probs)
            support[kept] = probs[kept] / probs[kept].sum()
        counts = np.bincount(draws(n=20000, **settings), minlength=BIG_VOCAB) / 20000
        # the 20 likeliest tokens one by one, and the mass of the rest
        np.testing.assert_allclose(counts[head], support[head], atol=0.012)
        np.testing.assert_allclose(1 - counts[head].sum(), 1 - support[head].sum(), atol=0.02)


def test_a_rows_token_does_not_depend_on_its_neighbours_settings():
    """One row needing the whole vocabulary sends the batch down the second path; the others must draw
    what they draw alone."""
    n = 6
    settings = [{"top_k": 40}, {"top_p": 0.6}, {}, {"top_p": 0.9, "top_k": 30}, {"top_k": 600}, {}]
    logits = jax.random.normal(jax.random.PRNGKey(5), (n, BIG_VOCAB)) * 1.5
    positions = jnp.arange(n) * 3
    alone = [
        int(sample(logits[i : i + 1], rows(1, seeds=[9], **settings[i]), positions[i : i + 1])[0])
        for i in range(n)
    ]
    batch = jax.tree.map(
        lambda *columns: jnp.concatenate(columns), *(rows(1, seeds=[9], **s) for s in settings)
    )
    assert np.asarray(sample(logits, batch, positions)).tolist() == alone
