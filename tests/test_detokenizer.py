"""Incremental detokenization never breaks characters and always adds up to the full decode; a run of tokens
that never forms valid UTF-8 is emitted as it goes, in short decodes."""

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from jaxserver.model.tokenizer import MAX_HELD_TOKENS, Tokenizer
from tests import tiny
from tests.fake_runner import byte_tokenizer

TOKENIZER = Tokenizer(tiny.make_tokenizer())


class CountingTokenizer(Tokenizer):
    """Records how many tokens each decode was given."""

    def __init__(self, hf_tokenizer):
        super().__init__(hf_tokenizer)
        self.windows: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.windows.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's kind: sentencepiece-style words, other characters as `<0xXX>` byte tokens, which decode to
    one U+FFFD per byte of an invalid run (not one per error sequence, as byte-level BPE does)."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    vocab |= {char: len(vocab) + i for i, char in enumerate("▁abcdefghijklmnopqrstuvwxyzö")}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")


BYTES = CountingTokenizer(byte_tokenizer())  # token id = byte value
TINY = CountingTokenizer(tiny.make_tokenizer())
BYTE_FALLBACK = CountingTokenizer(byte_fallback_tokenizer())
KINDS = {"one token per byte": BYTES, "byte-level BPE": TINY, "byte fallback": BYTE_FALLBACK}


def byte_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """`data` as single-byte tokens: byte-level BPE has one for every byte, byte fallback `<0xXX>`."""
    if tokenizer is BYTE_FALLBACK:
        names = [f"<0x{b:02X}>" for b in data]
    else:
        names = BYTES.hf.convert_ids_to_tokens(list(data))
    return tokenizer.hf.convert_tokens_to_ids(names)


def window_bound(chunk: int) -> int:
    """Most tokens a decode may cover: the last piece's (the prefix) and those held back, each at most the
    bound plus one push."""
    return 2 * (MAX_HELD_TOKENS + chunk)


def pieces(ids: list[int], chunk: int, tokenizer: Tokenizer = TOKENIZER) -> list[str]:
    detok = tokenizer.incremental_decoder()
    out = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return out + [detok.flush()]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), st.integers(1, 4))
def test_streamed_text_equals_full_decode(text, chunk):
    ids = TOKENIZER.encode(text)
    streamed = pieces(ids, chunk)
    assert "".join(streamed) == TOKENIZER.decode(ids)
    assert all("\ufffd" not in p for p in streamed[:-1]) or "\ufffd" in text


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["\ufffd", "a", " ", "ö", "中", "😀"]), st.integers(1, 6)), max_size=12
    ),
    st.integers(1, 12),
)
def test_valid_text_streams_as_a_whole_through_the_bounded_path(runs, chunk):
    """Pushes of many tokens that end mid-character, and runs of the (valid) character U+FFFD, go over
    the bound: the bounded path must not split the characters around them either. (Byte fallback decodes
    a held run of byte tokens ending in U+FFFD as all errors, so the character is left out for it.)"""
    text = "".join(char * count for char, count in runs)
    for tokenizer in KINDS.values():
        ids = tokenizer.encode(text.replace("\ufffd", "") if tokenizer is BYTE_FALLBACK else text)
        assert "".join(pieces(ids, chunk, tokenizer)) == tokenizer.decode(ids)


def test_emoji_split_across_byte_tokens_is_held_until_complete():
    ids = TOKENIZER.encode("a 😀 b")
    streamed = pieces(ids, 1)
    assert "".join(streamed) == "a 😀 b"
    assert "😀" in streamed[:-1] or any("😀" in p for p in streamed)
    assert not any("\ufffd" in p for p in streamed)


RUNS = {
    "continuation bytes": bytes(0x80 + i % 64 for i in range(5000)),
    "lone lead bytes": bytes([0xF0, 0xE2, 0xC3, 0xF4] * 1250),
    "never valid bytes": bytes([0xC0, 0xFF, 0xF8] * 1667),
    "lead bytes missing their last": b"\xf0\x9f\x98" * 1667,
}


@pytest.mark.parametrize("tokenizer", KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_invalid_utf8_run_is_emitted_as_it_goes_in_bounded_decodes(tokenizer, run):
    ids = byte_ids(tokenizer, run)
    tokenizer.windows.clear()
    detok = tokenizer.incremental_decoder()
    streamed = [detok.push([i]) for i in ids]
    streamed.append(detok.flush())
    assert max(tokenizer.windows) <= window_bound(1)  # however long the run
    text = "".join(streamed)
    assert text and set(text) == {"\ufffd"}
    text.encode("utf-8")  # a valid str: no lone surrogates
    assert len(streamed[-1]) <= MAX_HELD_TOKENS + 1  # emitted as it went, not all at the end


@pytest.mark.parametrize("tokenizer", KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("tail", [b"", b"\xf0", b"\xf0\x9f", b"\xe2\x82", b"\xbf"])
def test_valid_text_after_a_run_of_garbage_bytes_comes_out_intact(tokenizer, chunk, tail):
    valid = "hello 😀 wörld 中文 ok"
    ids = byte_ids(tokenizer, RUNS["continuation bytes"][:1000] + tail) + tokenizer.encode(valid)
    tokenizer.windows.clear()
    streamed = pieces(ids, chunk, tokenizer)
    assert max(tokenizer.windows) <= window_bound(chunk)
    text = "".join(streamed)
    assert text.endswith(valid) and set(text[: -len(valid)]) <= {"\ufffd", " "}
    assert text == tokenizer.decode(ids)  # here even the count of U+FFFD matches
    assert "".join(streamed[: 900 // chunk])  # the garbage streamed before the valid text came


HIGH_BYTES = st.binary(min_size=1, max_size=80).map(lambda data: bytes(b | 0x80 for b in data))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=8) | HIGH_BYTES, max_size=8).map(b"".join), st.integers(1, 8))
def test_any_bytes_stream_as_the_full_decode_in_bounded_decodes(data, chunk):
    """One token per byte: every cut falls between whole characters or whole error sequences, so even
    invalid UTF-8 streams exactly as it decodes whole."""
    ids = list(data)
    BYTES.windows.clear()
    streamed = pieces(ids, chunk, BYTES)
    assert max(BYTES.windows, default=0) <= window_bound(chunk)
    assert "".join(streamed) == BYTES.decode(ids)
