"""Incremental detokenization never breaks characters and always adds up to the full decode."""

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserver.model.tokenizer import Tokenizer
from tests import tiny

TOKENIZER = Tokenizer(tiny.make_tokenizer())


def pieces(ids: list[int], chunk: int) -> list[str]:
    detok = TOKENIZER.incremental_decoder()
    out = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return out + [detok.flush()]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), st.integers(1, 4))
def test_streamed_text_equals_full_decode(text, chunk):
    ids = TOKENIZER.encode(text)
    streamed = pieces(ids, chunk)
    assert "".join(streamed) == TOKENIZER.decode(ids)
    assert all("\ufffd" not in p for p in streamed[:-1]) or "\ufffd" in text


def test_emoji_split_across_byte_tokens_is_held_until_complete():
    ids = TOKENIZER.encode("a 😀 b")
    streamed = pieces(ids, 1)
    assert "".join(streamed) == "a 😀 b"
    assert "😀" in streamed[:-1] or any("😀" in p for p in streamed)
    assert not any("\ufffd" in p for p in streamed)
