"""Postprocessing, the engine loop's last stage: new tokens of a sequence become the text of its next chunk,
and whether it ended (EOS, its grammar, a stop string, its budget or the context)."""

from __future__ import annotations

import logging

from jaxserver.engine.request import FinishReason, GenerationChunk, TokenLogprobs
from jaxserver.engine.scheduler import Sequence

log = logging.getLogger(__name__)


def take_tokens(
    seq: Sequence,
    new_tokens: list[int],
    logprobs: list[TokenLogprobs] | None,
    eos_ids: tuple[int, ...],
    max_length: int,
) -> GenerationChunk:
    """Detokenize new tokens and apply stop conditions: the chunk to send, with a finish reason if the
    request ended (its tokens cut there). Tokens are taken one at a time, so a stop string ends the answer
    at the token that completed it, even inside a multi-step decode call's tokens."""
    reason, text = None, seq.detokenizer.text
    for kept, token in enumerate(new_tokens, start=1):
        seq.generated.append(token)
        seq.detokenizer.push([token])
        reason = end_reason(seq, token, eos_ids, max_length)
        if reason:
            seq.detokenizer.flush()
        text = seq.detokenizer.text
        stop_at = stop_string_at(seq, text)
        if stop_at is not None:
            text, reason = text[:stop_at], "stop"
        if reason:
            new_tokens, logprobs = new_tokens[:kept], logprobs and logprobs[:kept]
            break
    # Text that could be the start of a stop string waits for the next tokens.
    held_back = 0 if reason or not seq.request.stop else max(map(len, seq.request.stop)) - 1
    end = max(seq.emitted_chars, len(text) - held_back)
    delta, seq.emitted_chars = text[seq.emitted_chars : end], end
    error = seq.matcher.error if reason == "error" and seq.matcher else None
    return GenerationChunk(delta, new_tokens, len(seq.generated), reason, error, logprobs)


def end_reason(seq: Sequence, token: int, eos_ids: tuple[int, ...], max_length: int) -> FinishReason | None:
    """Whether `token`, just generated, ends the sequence: EOS or the end of its grammar ("stop"), a token
    its grammar refused ("error"), its budget or the context ("length")."""
    request = seq.request
    if not request.ignore_eos and token in eos_ids:
        return "stop"
    if seq.matcher is not None:
        if not seq.matcher.advance(token):
            log.error("request %s: %s", request.request_id, seq.matcher.error)
            return "error"
        if seq.matcher.complete:
            return "stop"
    if len(seq.generated) >= request.max_new_tokens or seq.num_tokens >= max_length:
        return "length"
    return None


def stop_string_at(seq: Sequence, text: str) -> int | None:
    """Where the first of the request's stop strings starts in `text`, searching only where one could have
    been completed since the text last sent; None if none is there."""
    if not seq.request.stop:
        return None
    search_from = max(0, seq.emitted_chars - max(map(len, seq.request.stop)) + 1)
    hits = [i for i in (text.find(stop, search_from) for stop in seq.request.stop) if i >= 0]
    return min(hits) if hits else None
