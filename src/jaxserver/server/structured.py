"""The grammar a request body asks its answer to match: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields, as one `Constraint` (or none)."""

from __future__ import annotations

import json
from typing import Any

from jaxserver.engine.constraints import Constraint
from jaxserver.errors import BadRequestError
from jaxserver.server.schemas import OpenAISampling, ResponseFormat, StructuredOutputs

ANY_JSON_OBJECT = {"type": "object"}


def body_constraint(body: OpenAISampling) -> Constraint | None:
    """The body's one constraint; a 400 naming the field when it sets more than one or one is malformed."""
    found = [
        *_structured_outputs(body.structured_outputs),
        *_guided(body),
        *_response_format(getattr(body, "response_format", None)),
    ]
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise BadRequestError(
            f"set one constraint on the answer, not several ({names})", param=found[1].param
        )
    return found[0] if found else None


def _schema(value: dict[str, Any] | str, param: str) -> Constraint:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"the JSON schema is not valid JSON: {exc}", param=param) from exc
    return Constraint.json_schema(value, param)


def _structured_outputs(so: StructuredOutputs | None) -> list[Constraint]:
    if so is None:
        return []
    found = []
    if so.json_ is not None:
        found.append(_schema(so.json_, "structured_outputs.json"))
    if so.regex is not None:
        found.append(Constraint("regex", so.regex, "structured_outputs.regex"))
    if so.choice is not None:
        found.append(Constraint.choice(so.choice, "structured_outputs.choice"))
    if so.grammar is not None:
        found.append(Constraint("grammar", so.grammar, "structured_outputs.grammar"))
    if so.json_object:
        found.append(Constraint.json_schema(ANY_JSON_OBJECT, "structured_outputs.json_object"))
    return found


def _guided(body: OpenAISampling) -> list[Constraint]:
    found = []
    if body.guided_json is not None:
        found.append(_schema(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        found.append(Constraint("regex", body.guided_regex, "guided_regex"))
    if body.guided_choice is not None:
        found.append(Constraint.choice(body.guided_choice, "guided_choice"))
    if body.guided_grammar is not None:
        found.append(Constraint("grammar", body.guided_grammar, "guided_grammar"))
    return found


def _response_format(form: ResponseFormat | None) -> list[Constraint]:
    if form is None or form.type == "text":
        return []
    if form.type == "json_object":
        return [Constraint.json_schema(ANY_JSON_OBJECT, "response_format")]
    if form.json_schema is None:
        raise BadRequestError(
            'response_format of type "json_schema" needs a json_schema object ({"name", "schema"})',
            param="response_format.json_schema",
        )
    schema = {} if form.json_schema.schema_ is None else form.json_schema.schema_
    return [Constraint.json_schema(schema, "response_format.json_schema.schema")]
