"""A runner whose tokens can be worked out by hand, and a server over it, for tests of the engine's
scheduling, streaming and the HTTP routes that need no model.

The tokenizer has one token per byte (token id = byte value) plus `<eos>`. After a letter a..y comes the
next letter; after "z" comes `<eos>`; after anything else comes "a". So a prompt ending in "w" is answered
"xyz" (finish reason "stop"), and one ending in a space or a newline the whole alphabet. Sampling settings
change nothing; logprobs say the token was certain.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxserver import JAXServer
from jaxserver.engine.engine import Engine
from jaxserver.engine.request import TokenLogprobs
from jaxserver.engine.scheduler import StepPlan
from jaxserver.model.config import ModelConfig
from jaxserver.model.tokenizer import Tokenizer

EOS = 256
VOCAB = 257
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MODEL = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=16,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=16,
    eos_token_ids=(EOS,),
    architecture="FakeForCausalLM",
)


def next_token(token: int) -> int:
    if ord("a") <= token < ord("z"):
        return token + 1
    return EOS if token == ord("z") else ord("a")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges, each byte its own id."""
    vocab = {char: byte for byte, char in enumerate(_byte_chars())}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", chat_template=CHAT_TEMPLATE)


def _byte_chars() -> list[str]:
    """The characters byte-level BPE stands each byte for (GPT-2's table), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


class FakeRunner:
    """`Runner`'s surface over no model: `step` and `decode` answer by `next_token`, with decode's
    stopping rules (the call ends at the step where a sequence ends)."""

    cache_bytes = 0
    cache_dtype = jnp.dtype(jnp.float32)
    programs_to_compile = 0
    cfg = MODEL

    def __init__(
        self, pages: int, max_num_seqs: int, max_length: int, max_num_batched_tokens: int, decode_steps: int
    ):
        self.pages = pages
        self.max_num_seqs = max_num_seqs
        self.max_length = max_length
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_decode_steps = decode_steps
        self.plans: list[tuple[str, int]] = []  # ("step" | "decode", tokens computed) per call

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens

    def shape(self, plan: StepPlan) -> tuple[int, int]:
        return plan.tokens, min(plan.tokens, self.max_num_seqs)

    def can_decode(self, plan: StepPlan) -> bool:
        return True

    def idle(self) -> None:
        pass

    def step(
        self, plan: StepPlan, allowed: np.ndarray | None = None
    ) -> dict[int, tuple[int, TokenLogprobs | None]]:
        self.plans.append(("step", plan.tokens))
        out = {}
        for i, piece in enumerate(plan.pieces):
            if piece.samples:
                token, top = next_token(piece.seq.tokens[-1]), piece.seq.request.logprobs
                out[i] = (token, None if top is None else TokenLogprobs(token, 0.0, [(token, 0.0)][:top]))
        return out

    def decode(self, plan: StepPlan, steps: int, on_tokens: Callable | None = None) -> dict[int, list[int]]:
        runs = [self._run_alone(piece.seq, min(steps, self.max_decode_steps)) for piece in plan.pieces]
        steps = min(map(len, runs))
        self.plans.append(("decode", steps * len(plan.pieces)))
        return {i: run[:steps] for i, run in enumerate(runs)}

    def _run_alone(self, seq, steps: int) -> list[int]:
        """The tokens a sequence would generate in `steps` steps, up to the one that ends it."""
        request, last, run = seq.request, seq.tokens[-1], []
        left = min(request.max_new_tokens - len(seq.generated), self.max_length - seq.num_tokens)
        while len(run) < min(steps, left):
            last = next_token(last)
            run.append(last)
            if last == EOS and not request.ignore_eos:
                break
        return run


class FakeServer(JAXServer):
    """A `JAXServer` over a `FakeRunner` (through the seed's hook, `configure_generate_functions`)."""

    pages = 64

    def configure_generate_functions(self, model: ModelConfig, tokenizer: Tokenizer) -> None:
        config = self.config
        self.runner = FakeRunner(
            self.pages,
            config.max_num_seqs,
            config.max_length,
            config.max_num_batched_tokens,
            config.max_compile_tokens,
        )
        self.engine = Engine(
            self.runner,
            tokenizer,
            max_waiting=config.max_waiting_requests,
            stall_timeout_s=config.engine_stall_timeout_s,
        )
        self.engine.start()
        self._funcs_generated = True

    @classmethod
    def start(cls, **config) -> FakeServer:
        values = {"max_length": 128, "max_compile_tokens": 4, "warm_up": False, "compilation_cache_dir": None}
        return cls.load_from_params(
            config_model=MODEL, params={}, tokenizer=byte_tokenizer(), config=values | config
        )
