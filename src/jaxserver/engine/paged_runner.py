"""The device side over a paged KV cache (issue 19; the engine does not use it yet): the pool of pages, and one
compiled ragged step that computes a `StepPlan`'s pieces and samples each finished piece's next token.

A step's flat batch is padded to a token bucket and its sequences to a row bucket, so the compiled shapes
are a few (tokens, rows) pairs whatever mix of prompts and decode tokens arrives. Padding tokens belong to
no sequence: they read and write nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxserver.engine.paged_scheduler import Piece, StepPlan
from jaxserver.engine.runner import bucket, sampling_rows
from jaxserver.model import cpu_kernels, llama, paged
from jaxserver.model.config import ModelConfig
from jaxserver.model.llama import Params
from jaxserver.model.sampling import SamplingArrays, sample

MIN_TOKEN_BUCKET = 8


def _ragged_step(
    params: Params,
    layers: list[Params],
    cache: paged.PagedKVCache,
    tokens: jax.Array,
    positions: jax.Array,
    token_seqs: jax.Array,
    page_table: jax.Array,
    logit_index: jax.Array,
    sampling: SamplingArrays,
    *,
    cfg: ModelConfig,
) -> tuple[jax.Array, paged.PagedKVCache]:
    """The next token [S] of each of the step's sequences (meaningful where its piece reaches its end),
    sampled from the logits after its last token in the batch, and the cache with the pieces written."""
    logits, cache = paged.forward_ragged(
        params, layers, cfg, tokens, positions, token_seqs, page_table, logit_index, cache
    )
    tokens_before_next = positions[logit_index] + 1
    return sample(logits, sampling, positions=tokens_before_next), cache


class PagedRunner:
    """Owns the parameters on device, the pool's pages and the compiled ragged step."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        pages: int,
        max_num_seqs: int,
        max_length: int,
        cache_dtype: jnp.dtype,
        max_num_batched_tokens: int,
    ):
        self.cfg = cfg
        self.params = llama.head_params(params)
        self.layers = llama.layer_params(params, cfg)
        whole_weights = all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(params))
        if whole_weights and cpu_kernels.bf16_gemm_available():
            self.params, self.layers = llama.pack_matmul_weights(self.params, self.layers)
        self.params = llama.embedding_as_bits(self.params)
        self.max_num_seqs = max_num_seqs
        self.max_pages = -(-max_length // paged.PAGE_TOKENS)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cache = paged.init_paged_cache(cfg, pages, cache_dtype)
        self._step = jax.jit(functools.partial(_ragged_step, cfg=cfg), donate_argnums=2)

    def shape(self, plan: StepPlan) -> tuple[int, int]:
        """The compiled (tokens, rows) shape a plan runs in: powers of two."""
        tokens = bucket(plan.tokens, MIN_TOKEN_BUCKET, max(self.max_num_batched_tokens, MIN_TOKEN_BUCKET))
        return tokens, bucket(len(plan.pieces), 1, self.max_num_seqs)

    def step(self, plan: StepPlan) -> dict[int, int]:
        """Compute the plan's pieces; the sampled next token of every piece that reaches its sequence's
        end, by the piece's index in the plan."""
        token_count, rows = self.shape(plan)
        tokens = np.zeros(token_count, np.int32)
        positions = np.zeros(token_count, np.int32)
        token_seqs = np.full(token_count, rows, np.int32)  # padding: a sequence past the table
        page_table = np.zeros((rows, self.max_pages), np.int32)
        logit_index = np.zeros(rows, np.int32)
        at = 0
        for row, piece in enumerate(plan.pieces):
            count = piece.end - piece.start
            tokens[at : at + count] = piece.seq.tokens[piece.start : piece.end]
            positions[at : at + count] = np.arange(piece.start, piece.end)
            token_seqs[at : at + count] = row
            indices = piece.seq.table.indices
            page_table[row, : len(indices)] = indices
            logit_index[row] = at + count - 1
            at += count
        next_tokens, self.cache = self._step(
            self.params,
            self.layers,
            self.cache,
            tokens,
            positions,
            token_seqs,
            page_table,
            logit_index,
            _sampling(plan.pieces, rows),
        )
        next_tokens = np.asarray(next_tokens)
        return {i: int(next_tokens[i]) for i, piece in enumerate(plan.pieces) if piece.samples}


def _sampling(pieces: list[Piece], rows: int) -> SamplingArrays:
    """Each piece's request's sampling settings, one row per piece (idle rows greedy)."""
    per_row = [sampling_rows(1, temperature=1.0, top_p=1.0, top_k=0, greedy=True, seed=0)] * rows
    for row, piece in enumerate(pieces):
        options = piece.seq.request.sampling
        per_row[row] = sampling_rows(
            1,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            greedy=options.greedy,
            seed=options.seed,
            min_p=options.min_p,
        )
    return SamplingArrays(*(np.concatenate(column) for column in zip(*per_row, strict=True)))
