"""Constrained decoding with llguidance: a request's grammar (a JSON schema, a regex, a list of choices or a
Lark / GBNF grammar) becomes, before each of its tokens, a bitmask of the tokens that keep the answer
inside the grammar, which the sampler applies to the logits.

llguidance rather than xgrammar: xgrammar's wheel requires torch, which the server does not run with;
llguidance is one dependency-free wheel, computes a JSON mask for this vocabulary in tens of microseconds
(docs/performance.md), and validates a grammar before anything is generated.
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Literal

import llguidance
import llguidance.numpy
import numpy as np

from jaxserver.errors import BadRequestError
from jaxserver.model.tokenizer import Tokenizer

ConstraintKind = Literal["json_schema", "regex", "choice", "grammar"]
COMPILED_GRAMMARS_KEPT = 256
# JSON may have whitespace between tokens, but a bounded run of it: a small model under a schema otherwise
# tends to emit whitespace until its token budget is gone.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must match. `text`: the JSON schema (serialized), the regex, the choices
    (a JSON list of strings) or the grammar; `param`: the request field it came from, named by errors."""

    kind: ConstraintKind
    text: str
    param: str

    @classmethod
    def json_schema(cls, schema: object, param: str) -> Constraint:
        """A schema's answers, whose objects hold only the properties they list unless the schema sets
        `additionalProperties` (as OpenAI's strict mode and vLLM's default read schemas): a model given
        the freedom adds keys until its budget is gone."""
        if not isinstance(schema, dict | bool):
            raise BadRequestError("a JSON schema must be an object (or true)", param=param)
        return cls("json_schema", json.dumps(closed_objects(schema)), param)  # key order orders the answer

    @classmethod
    def choice(cls, choices: object, param: str) -> Constraint:
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise BadRequestError("choices must be a non-empty list of strings", param=param)
        return cls("choice", json.dumps(choices), param)


VALUE_KEYWORDS = ("const", "enum", "default", "examples")  # their objects are values, not schemas


def closed_objects(schema: object) -> object:
    """`schema` with `additionalProperties: false` in every object schema that lists properties and does
    not say."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in VALUE_KEYWORDS else closed_objects(value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and not {"additionalProperties", "patternProperties"} & set(
        schema
    ):
        closed["additionalProperties"] = False
    return closed


def bitmask_words(vocab_size: int) -> int:
    """32-bit words of a token bitmask over `vocab_size` tokens (bit t & 31 of word t >> 5 is token t)."""
    return -(-vocab_size // 32)


class TokenMatcher:
    """One sequence's place in its grammar: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def fill_mask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 bitmask [rows, words]."""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask, row)

    def advance(self, token: int) -> bool:
        """Take a sampled token; False if the grammar refused it (the mask keeps such tokens out, so the
        request then ends with an error rather than an answer outside its grammar)."""
        return self._matcher.consume_token(token)

    @property
    def error(self) -> str:
        return f"the answer left its grammar: {self._matcher.get_error()}"

    @property
    def complete(self) -> bool:
        """Whether the answer is finished: the grammar allows nothing more (but end-of-sequence)."""
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Checks requests' constraints against one tokenizer and makes each sequence its matcher. Compiled
    grammars are cached by constraint, so a schema sent again costs nothing."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer, self.vocab_size = tokenizer, max(vocab_size, tokenizer.vocab_size)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled = functools.lru_cache(COMPILED_GRAMMARS_KEPT)(self._compile)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built at the first constrained request (a quarter of a second for a 49k vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.hf.backend_tokenizer.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=list(self._tokenizer.eos_token_ids),
                )
            return self._ll_tokenizer

    def check(self, constraint: Constraint) -> None:
        """Raise a `BadRequestError` naming the constraint's field if its grammar cannot be compiled."""
        self._compiled(constraint)

    def matcher(self, constraint: Constraint) -> TokenMatcher:
        return TokenMatcher(llguidance.LLMatcher(self.ll_tokenizer, self._compiled(constraint), log_level=0))

    def _compile(self, constraint: Constraint) -> str:
        try:
            if constraint.kind == "json_schema":
                # A schema's own layout options ("x-guidance") replace the bounded whitespace.
                layout = {} if '"x-guidance"' in constraint.text else {"whitespace_pattern": JSON_WHITESPACE}
                grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.text, defaults=layout)
            else:  # llguidance's "grammar" takes Lark or GBNF
                grammar = llguidance.grammar_from(constraint.kind, constraint.text)
        except ValueError as exc:
            raise BadRequestError(f"invalid {constraint.kind}: {exc}", param=constraint.param) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error:
            raise BadRequestError(f"invalid {constraint.kind}: {error.strip()}", param=constraint.param)
        return grammar
