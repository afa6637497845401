"""Constrained decoding over a tiny random model: answers that end with "stop" match their schema, regex,
choices or grammar (checked by jsonschema-rs and `re`, not by the grammar engine that constrained them),
constrained rows beside plain ones change nothing for the plain ones, and bad constraints are 400 naming
their field, before anything runs."""

import json
import re
from typing import Literal

import httpx
import jsonschema_rs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from jaxserver.engine.constraints import Constraint
from jaxserver.errors import BadRequestError
from jaxserver.model.sampling import apply_token_mask
from tests.live import sdk_client

HELLO = [{"role": "user", "content": "Tell me about yourself."}]


@pytest.fixture(scope="module")
def client(served_tiny):
    return sdk_client(served_tiny[1])


def answers(server, constraint: Constraint, seeds, max_new_tokens: int = 80) -> list[tuple[str, str]]:
    """(text, finish reason) of one sampled request per seed, run together."""
    requests = [
        server.prepare("Hello", False, max_new_tokens, seed=seed, temperature=1.0, constraint=constraint)
        for seed in seeds
    ]
    streams = [server.submit(request) for request in requests]
    results = []
    for stream in streams:
        chunks = list(stream)
        results.append(("".join(c.text for c in chunks), chunks[-1].finish_reason))
    return results


def test_token_mask_keeps_exactly_the_set_bits():
    rng = np.random.default_rng(0)
    vocab = 70  # not a multiple of 32: the last word's high bits lie past the vocabulary
    mask = rng.integers(-(2**31), 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    masked = np.asarray(apply_token_mask(logits, mask))
    for row in range(3):
        for token in range(vocab):
            allowed = (int(mask[row, token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else -np.inf)


LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-50, 50).map(lambda low: {"type": "integer", "minimum": low, "maximum": low + 20}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.sampled_from(["a", "b c", "d"]), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
)
NAMES = st.sampled_from(["id", "name", "tags", "x", "value"])


def _object(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


SCHEMAS = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        _object(children), children.map(lambda item: {"type": "array", "items": item, "maxItems": 3})
    ),
    max_leaves=6,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, seed=st.integers(0, 2**31 - 1))
def test_json_schema_answers_that_stop_validate(tiny_server, schema, seed):
    validator = jsonschema_rs.validator_for(schema)
    for text, reason in answers(tiny_server, Constraint.json_schema(schema, "schema"), [seed, seed + 1]):
        assert reason in ("stop", "length")
        if reason == "stop":
            assert validator.is_valid(json.loads(text)), (schema, text)


def test_regex_choice_and_grammar_answers_match(tiny_server):
    for text, reason in answers(tiny_server, Constraint("regex", r"[a-c]{2}-\d{1,3}", "regex"), range(4)):
        assert reason == "stop" and re.fullmatch(r"[a-c]{2}-\d{1,3}", text), text
    for text, reason in answers(tiny_server, Constraint.choice(["red", "green", "a b"], "choice"), range(4)):
        assert reason == "stop" and text in ("red", "green", "a b")
    gbnf = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    for text, reason in answers(tiny_server, Constraint("grammar", gbnf, "grammar"), range(4), 30):
        assert reason == "length" or re.fullmatch(r"\(\d(\+\d)*\)", text), text


def test_constrained_rows_leave_plain_rows_unchanged(tiny_server):
    """A greedy plain answer is the same alone and beside constrained requests in the same steps."""
    plain = tiny_server.prepare("Once upon a time", True, 40, ignore_eos=True)
    alone = "".join(c.text for c in tiny_server.stream(plain))
    constraint = Constraint.json_schema({"type": "array", "items": {"type": "integer"}}, "schema")
    beside = [
        tiny_server.prepare("Hello", False, 40, seed=s, temperature=1.0, constraint=constraint)
        for s in range(3)
    ]
    streams = [tiny_server.submit(r) for r in [*beside[:2], plain, beside[2]]]
    texts = ["".join(c.text for c in stream) for stream in streams]
    assert texts[2] == alone


def test_objects_hold_only_their_properties_unless_the_schema_says():
    """Without additionalProperties an object takes only its listed keys (at any depth); a schema that
    allows more keeps that, and values of const and enum stay as given."""
    open_inner = {"type": "object", "properties": {"b": {"type": "integer"}}, "additionalProperties": True}
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"x": {"const": {"properties": {}}}}},
            "o": open_inner,
        },
    }
    closed = json.loads(Constraint.json_schema(schema, "schema").text)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["o"]["additionalProperties"] is True
    assert closed["properties"]["a"]["properties"]["x"] == {"const": {"properties": {}}}


def test_an_open_schema_answer_holds_only_its_keys(tiny_server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}}
    for text, reason in answers(tiny_server, Constraint.json_schema(schema, "schema"), range(4)):
        assert reason == "length" or set(json.loads(text)) <= {"name"}, text


def test_a_bad_constraint_is_refused_before_it_runs(tiny_server):
    for constraint in (
        Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}, "response_format"),
        Constraint("regex", "a(b", "guided_regex"),
        Constraint("grammar", "root ::= missing", "guided_grammar"),
    ):
        with pytest.raises(BadRequestError) as caught:
            tiny_server.prepare("Hello", constraint=constraint)
        assert caught.value.param == constraint.param
    with pytest.raises(BadRequestError):
        Constraint.choice([], "guided_choice")


class Verdict(BaseModel):
    verdict: Literal["yes", "no"]
    score: int


def test_sdk_parse_returns_the_model(client, served_tiny):
    """`parse()` sends the pydantic model's strict schema and parses the answer back."""
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=served_tiny[0].model_name,
            messages=HELLO,
            response_format=Verdict,
            max_tokens=120,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict)
        assert choice.message.parsed == Verdict.model_validate_json(choice.message.content)


def test_json_object_streamed_and_vllm_fields_on_both_routes(client, served_tiny):
    model = served_tiny[0].model_name
    chunks = client.chat.completions.create(
        model=model,
        messages=HELLO,
        response_format={"type": "json_object"},
        max_tokens=100,
        seed=3,
        stream=True,
    )
    pieces, reasons = [], []
    for chunk in chunks:
        pieces += [c.delta.content or "" for c in chunk.choices]
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
    if reasons == ["stop"]:
        assert isinstance(json.loads("".join(pieces)), dict)
    else:
        assert reasons == ["length"]
    completion = client.completions.create(
        model=model, prompt="x", max_tokens=10, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}}
    )
    assert re.fullmatch("[0-9]{3}", completion.choices[0].text)
    completion = client.completions.create(
        model=model, prompt="x", max_tokens=10, extra_body={"guided_choice": ["left", "right"]}
    )
    assert completion.choices[0].text in ("left", "right")
    chat = client.chat.completions.create(
        model=model,
        messages=HELLO,
        max_tokens=40,
        extra_body={"structured_outputs": {"json": json.dumps({"enum": [1, 2, 3]})}},
    )
    assert json.loads(chat.choices[0].message.content) in (1, 2, 3)


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_regex": "a(", "max_tokens": 3}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"yaml": "a"}}, "structured_outputs.yaml"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(served_tiny, body, param):
    _, url = served_tiny
    before = served_tiny[0].engine.stats()["tokens_generated"]
    response = httpx.post(
        f"{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3} | body, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert served_tiny[0].engine.stats()["tokens_generated"] == before
