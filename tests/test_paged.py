"""The decoder over a paged KV cache: the CPU kernel against the XLA reference, and a ragged batch of prompt
pieces and decode tokens against the unpaged forward pass of each sequence alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver.model import cpu_kernels, llama, paged, serving_layout
from jaxserver.model.loader import load_model
from tests.test_model import full_logits

T = paged.PAGE_TOKENS
needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the CPU kernels could not be built here"
)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    cfg, params, _ = load_model(tiny_llama_dir)
    return cfg, jax.tree.map(jnp.asarray, params)


def random_pages(rng, layers: int, pages: int, kv_heads: int, hd: int, dtype) -> tuple[jax.Array, jax.Array]:
    storage = llama.cache_storage_dtype(dtype)
    k = rng.standard_normal((layers, pages, kv_heads, hd, T))
    v = rng.standard_normal((layers, pages, kv_heads, T, hd))
    return tuple(llama.to_cache(jnp.asarray(a, jnp.float32), storage) for a in (k, v))


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=["f32", "f16", "bf16"])
def test_the_kernel_writes_and_attends_as_the_reference(dtype):
    """A mixed batch: a prompt piece (positions 5..24 of sequence 0), decode tokens at the first, a
    page-crossing and a later position, and padding; pages in scattered order; the second of two layers'
    pages (the first left as it was)."""
    rng = np.random.default_rng(0)
    kv_heads, group, hd, pages = 2, 3, 32, 24
    k_pages, v_pages = random_pages(rng, 2, pages, kv_heads, hd, dtype)
    page_table = jnp.asarray(rng.permutation(pages)[:20].reshape(4, 5), jnp.int32)
    token_seqs = jnp.asarray([0] * 20 + [1, 2, 3, -1, 9], jnp.int32)
    positions = jnp.asarray([*range(5, 25), 0, 16, 79, 3, 0], jnp.int32)
    n = len(token_seqs)
    q = jnp.asarray(rng.standard_normal((n, kv_heads, group, hd)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.standard_normal((n, kv_heads, hd)), jnp.float32) for _ in range(2))
    args = (q, k_new, v_new, k_pages, v_pages, jnp.int32(1), page_table, token_seqs, positions)
    by_kernel = jax.jit(cpu_kernels.paged_attention)(*args)
    by_xla = jax.jit(paged.attention_reference)(*args)
    np.testing.assert_allclose(by_kernel[0], by_xla[0], rtol=2e-5, atol=2e-6)
    for got, want, before in zip(by_kernel[1:], by_xla[1:], (k_pages, v_pages), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(before[0]))
    assert not np.asarray(by_kernel[0][-2:]).any()  # the padding tokens get zeros


def ragged_logits(cfg, params, batches, attention=None, pack=False, pages: int = 32, max_pages: int = 8):
    """Run `batches` of (sequence, first position, tokens) pieces through forward_ragged, one call per
    batch, on one cache; sequence s holds pages s * max_pages ... in its table (with `pack`, bf16 weights
    go through the matmul kernel). Returns, per batch, the logits of each piece's last token."""
    cache = paged.init_paged_cache(cfg, pages, jnp.float32)
    head, layers = llama.head_params(params), llama.layer_params(params, cfg)
    if pack:
        head, layers = serving_layout.pack_matmul_weights(head, layers)
    head |= llama.rotary_tables(cfg, max_pages * paged.PAGE_TOKENS)  # as the runner serves it
    seqs = 1 + max(seq for batch in batches for seq, _, _ in batch)
    table = jnp.asarray(np.arange(seqs * max_pages).reshape(seqs, max_pages) % pages, jnp.int32)

    @jax.jit
    def step(head, layers, **inputs):
        hidden, cache = paged.forward_ragged(head, layers, cfg, attention=attention, **inputs)
        return paged.output_logits(head, hidden), cache

    results = []
    for batch in batches:
        tokens, positions, token_seqs, last = [], [], [], []
        for seq, first, piece in batch:
            tokens += piece
            positions += range(first, first + len(piece))
            token_seqs += [seq] * len(piece)
            last.append(len(tokens) - 1)
        logits, cache = step(
            head,
            layers,
            tokens=jnp.asarray(tokens, jnp.int32),
            positions=jnp.asarray(positions, jnp.int32),
            token_seqs=jnp.asarray(token_seqs, jnp.int32),
            page_table=table,
            logit_index=jnp.asarray(last, jnp.int32),
            cache=cache,
        )
        results.append(np.asarray(logits))
    return results


@pytest.mark.parametrize(
    "attention", [None, paged.attention_reference], ids=["default-attention", "xla-attention"]
)
def test_a_ragged_batch_gives_each_sequence_its_unpaged_logits(tiny_model, attention):
    """Prompts prefilled in pieces beside other sequences' decode tokens: each piece's last logits equal the
    unpaged forward pass over that sequence's tokens so far."""
    cfg, params = tiny_model
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(3, cfg.vocab_size, n).tolist() for n in (40, 7, 23))
    batches = [
        [(0, 0, a[:20]), (1, 0, b[:6])],
        [(0, 20, a[20:39]), (1, 6, b[6:7]), (2, 0, c[:17])],
        [(0, 39, a[39:40]), (2, 17, c[17:23])],
    ]
    got = ragged_logits(cfg, params, batches, attention=attention)
    expected = {
        (0, 0): a[:20], (0, 1): b[:6],
        (1, 0): a[:39], (1, 1): b[:7], (1, 2): c[:17],
        (2, 0): a[:40], (2, 1): c[:23],
    }  # fmt: skip
    for (batch, index), prefix in expected.items():
        want = full_logits(cfg, params, np.asarray([prefix]))[0, -1]
        np.testing.assert_allclose(got[batch][index], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_kernel
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(tiny_model):
    """With the kernels, a sequence's logits do not depend on what else is in the flat batch."""
    cfg, params = tiny_model
    pack = cpu_kernels.bf16_gemm_available()
    if pack:
        params = llama.cast_params(params, jnp.bfloat16)
    rng = np.random.default_rng(2)
    a, b = (rng.integers(3, cfg.vocab_size, n).tolist() for n in (30, 12))
    alone = ragged_logits(cfg, params, [[(0, 0, a[:20])], [(0, 20, a[20:])]], pack=pack)
    batches = [[(1, 0, b), (0, 0, a[:20])], [(0, 20, a[20:]), (1, 12, b[:1])]]
    beside = ragged_logits(cfg, params, batches, pack=pack)
    np.testing.assert_array_equal(alone[0][0], beside[0][1])
    np.testing.assert_array_equal(alone[1][0], beside[1][0])


def test_the_rotary_tables_hold_the_rotation_angles(tiny_model):
    """The tables the step reads hold cos and sin of position x frequency: against the angles computed in
    float32 in the step, which round the angle itself (1.2e-4 at position 2047), hence the tolerance."""
    cfg, _ = tiny_model
    positions = np.arange(2048)
    tables = llama.rotary_tables(cfg, len(positions))
    cos, sin = llama.rotary(jnp.asarray(positions[None, :]), cfg)
    np.testing.assert_allclose(tables["rotary_cos"], np.asarray(cos)[0, :, 0], atol=3e-4)
    np.testing.assert_allclose(tables["rotary_sin"], np.asarray(sin)[0, :, 0], atol=3e-4)
    np.testing.assert_allclose(tables["rotary_cos"][1:4, 0], np.cos([1.0, 2.0, 3.0]), rtol=1e-7)
