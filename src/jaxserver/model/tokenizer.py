"""Tokenizer wrapper, chat templates and incremental detokenization.

The wrapped object is a `transformers.PreTrainedTokenizerFast` (tokenizers and chat templates only; no
torch). It comes from a Hugging Face folder, or is rebuilt from GGUF metadata by `from_gguf_fields`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# GGUF token types (llama.cpp's llama_token_type): control and user-defined tokens are special.
GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4

# llama.cpp pre-tokenizer names -> splits applied before byte-level BPE. Entries give a regex that is
# applied first (None: plain GPT-2 byte-level splitting).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if regex is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_bpe_from_gguf(
    tokens: Sequence[str],
    token_types: Sequence[int],
    merges: Sequence[str],
    pre: str,
    special_ids: dict[str, int | None],
    chat_template: str | None,
) -> PreTrainedTokenizerFast:
    """Rebuild a GPT-2 style (byte-level BPE) tokenizer from GGUF `tokenizer.ggml.*` metadata."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    raw.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    raw.decoder = decoders.ByteLevel()
    specials = [
        tokens[i]
        for i, kind in enumerate(token_types)
        if kind in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)
    ]
    names = {name: tokens[i] for name, i in special_ids.items() if i is not None and 0 <= i < len(tokens)}
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=names.get("bos"),
        eos_token=names.get("eos"),
        unk_token=names.get("unk"),
        pad_token=names.get("pad", names.get("eos")),
        additional_special_tokens=[t for t in specials if t not in names.values()],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )


class Tokenizer:
    """What the engine and server need from a tokenizer, over a transformers fast tokenizer."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, extra_eos_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, *extra_eos_ids]))
        if not self.eos_token_ids:
            raise ValueError("the tokenizer defines no end-of-sequence token")

    @classmethod
    def wrap(
        cls, tokenizer: Tokenizer | PreTrainedTokenizerBase, extra_eos_ids: Sequence[int] = ()
    ) -> Tokenizer:
        """`tokenizer` itself if it is ours, else ours over the transformers one."""
        return tokenizer if isinstance(tokenizer, Tokenizer) else cls(tokenizer, extra_eos_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def pad_token_id(self) -> int:
        pad = self.hf.pad_token_id
        return self.eos_token_ids[0] if pad is None else pad

    @functools.cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters of text one token stands for: the longest token's string
        (byte-level and SentencePiece strings are at least as long as their text), doubled for
        normalizers that fold two characters into one. A text longer than this times a context cannot
        fit in it, whatever it holds."""
        return 2 * max(map(len, self.hf.get_vocab()), default=1)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it parsed, without adding BOS/EOS around it."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    @property
    def writes_tool_call_tags(self) -> bool:
        """Whether the chat template renders tools and the model's calls as `<tool_call>` JSON (Hermes'
        format, which Qwen's templates use too)."""
        template = getattr(self.hf, "chat_template", None) or ""
        return isinstance(template, str) and "tools" in template and "<tool_call>" in template

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
        )

    def save(self, directory: str) -> None:
        self.hf.save_pretrained(directory)

    def incremental_decoder(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


# Tokens held back at most while the text ends in U+FFFD: a character's bytes span at most 4 tokens, and
# twice that leaves room for tokens that carry the end of one character and the start of the next.
MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces without splitting multi-byte characters.

    Each call decodes only a short window: from `prefix_offset` (a few tokens already emitted, so that
    tokenizers which add spaces between tokens decode in context) to the end. Text is held back while it
    ends in U+FFFD, the mark of an incomplete UTF-8 sequence, but for no more than `MAX_HELD_TOKENS`: a run
    that never becomes valid UTF-8 is emitted as it decodes, replacement characters and all, so the window
    stays short. Valid text streams exactly as it decodes whole (but for a run of the character U+FFFD
    itself in more byte-fallback tokens than the bound: such a decode looks like an error's); so does any
    byte string when each token is one byte.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that became final (possibly empty)."""
        self.ids.extend(int(i) for i in new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            return self._emit(full[len(prefix) :], len(self.ids))
        if len(self.ids) - self.read_offset <= MAX_HELD_TOKENS:
            return ""
        end, head = self._cut()
        return self._emit(head[len(prefix) :], end)

    def _cut(self) -> tuple[int, str]:
        """Where a stuck run's piece ends, and the window's text up to there. An incomplete character is at
        most 3 bytes, so it starts within the last three tokens: of the boundaries before each of them, the
        latest after which the text is whole characters, else the earliest (cutting through an error
        sequence there loses nothing: the next piece, decoded in context, starts after it)."""
        for end in range(len(self.ids) - 1, len(self.ids) - 4, -1):
            head = self.tokenizer.decode(self.ids[self.prefix_offset : end])
            if not head.endswith("\ufffd"):
                break
        return end, head

    def _emit(self, piece: str, end: int) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, end
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (an incomplete character stays U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        piece = full[len(prefix) :] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += piece
        return piece
