"""The JAX decoder against Hugging Face transformers (PyTorch, CPU) on the same tiny random weights,
and the KV-cached decode path against recomputing the whole sequence.

Tolerance: float32 logits agree to 1e-4 absolute (their magnitude here is ~1-10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.engine.runner import Runner, idle_state, sampling_rows
from jaxserver.model import llama
from jaxserver.model.loader import load_model
from tests import tiny

ATOL = 1e-4


def reference_logits(folder, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def full_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    """Logits at every position, computed from scratch in one pass."""
    batch, seq = ids.shape
    cache = llama.init_cache(cfg, batch, seq, jnp.float32)
    zeros = jnp.zeros((batch,), jnp.int32)
    logits, _ = llama.forward(params, cfg, jnp.asarray(ids), cache, zeros, zeros, attn_len=seq)
    return np.asarray(logits)


@pytest.mark.parametrize("kind", ["llama", "llama3-tied", "qwen2"])
def test_logits_match_transformers(tmp_path, kind):
    folder = tiny.make_hf_model(tmp_path, kind)
    cfg, params, _ = load_model(folder)
    # 100 positions: past llama3's original context (64) so the scaled frequencies matter.
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 100))
    expected = reference_logits(folder, ids)
    got = full_logits(cfg, jax.tree.map(jnp.asarray, params), ids)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-4)


def test_config_reads_family_traits(tmp_path):
    cfg, params, _ = load_model(tiny.make_hf_model(tmp_path, "qwen2"))
    assert cfg.attention_bias and cfg.architecture == "Qwen2ForCausalLM" and cfg.rope_theta == 1e6
    assert "bq" in params["layers"] and "lm_head" in params


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    cfg, params, tokenizer = load_model(tiny_llama_dir)
    return cfg, jax.tree.map(jnp.asarray, params), tokenizer


def test_cached_decode_equals_recompute(tiny_model):
    """Feeding tokens one by one through the cache gives the logits of a full recomputation."""
    cfg, params, _ = tiny_model
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 24))
    expected = full_logits(cfg, params, ids)[0]
    cache = llama.init_cache(cfg, 1, 32, jnp.float32)
    zero = jnp.zeros((1,), jnp.int32)
    for pos in range(ids.shape[1]):
        logits, cache = llama.forward(
            params,
            cfg,
            jnp.asarray(ids[:, pos : pos + 1]),
            cache,
            jnp.full((1,), pos),
            zero,
            attn_len=32,
            logit_index=zero,
        )
        np.testing.assert_allclose(np.asarray(logits)[0], expected[pos], atol=ATOL, rtol=1e-4)


def greedy_by_recompute(cfg, params, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(full_logits(cfg, params, np.asarray([ids]))[0, -1])))
    return ids[len(prompt) :]


def runner_greedy(cfg, params, prompt: list[int], n: int, left_pad: bool, slots: int = 1) -> list[int]:
    runner = Runner(
        cfg, params, slots=slots, cache_len=64, steps_per_call=5, eos_ids=(-1,), cache_dtype=jnp.float32
    )
    greedy = sampling_rows(1, temperature=0.0, top_p=1.0, top_k=0, greedy=True, seed=0)
    slot = slots - 1
    first, start = runner.prefill(slot, prompt, greedy, n, left_pad=left_pad, pad_id=0)
    state = idle_state(slots)
    state = state._replace(
        tokens=state.tokens.at[slot].set(first),
        lengths=state.lengths.at[slot].set(start + len(prompt)),
        starts=state.starts.at[slot].set(start),
        remaining=state.remaining.at[slot].set(n - 1),
        active=state.active.at[slot].set(True),
    )
    out = [first]
    while len(out) < n:
        tokens, emitted, state = runner.decode(state, longest=int(state.lengths.max()))
        out += [int(t) for t, e in zip(tokens[slot], emitted[slot]) if e]
    return out


@pytest.mark.parametrize("left_pad", [False, True])
def test_runner_greedy_equals_recompute(tiny_model, left_pad):
    """Prefill into a padded bucket, then chunked decode (several chunks), equals step-by-step argmax."""
    cfg, params, _ = tiny_model
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64]  # 9 tokens: padded to the 16-token bucket
    expected = greedy_by_recompute(cfg, params, prompt, 12)
    assert runner_greedy(cfg, params, prompt, 12, left_pad=left_pad, slots=3) == expected
