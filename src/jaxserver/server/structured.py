"""The grammar a request body asks its answer to match: OpenAI's `response_format`, vLLM's
`structured_outputs` and its older `guided_*` fields, as one `Constraint` (or none)."""

from __future__ import annotations

import json
from typing import Any

from jaxserver.engine.constraints import Constraint
from jaxserver.errors import BadRequestError
from jaxserver.server.openai_schemas import OpenAISampling, ResponseFormat, StructuredOutputs

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
    found = _set_fields(
        (so.json_, "json", "structured_outputs.json"),
        (so.regex, "regex", "structured_outputs.regex"),
        (so.choice, "choice", "structured_outputs.choice"),
        (so.grammar, "grammar", "structured_outputs.grammar"),
    )
    if so.json_object:
        found.append(Constraint.json_schema(ANY_JSON_OBJECT, "structured_outputs.json_object"))
    return found


def _guided(body: OpenAISampling) -> list[Constraint]:
    return _set_fields(
        (body.guided_json, "json", "guided_json"),
        (body.guided_regex, "regex", "guided_regex"),
        (body.guided_choice, "choice", "guided_choice"),
        (body.guided_grammar, "grammar", "guided_grammar"),
    )


def _set_fields(*fields: tuple[Any, str, str]) -> list[Constraint]:
    """The constraints of the fields that are set, each given as (value, kind, param)."""
    found = []
    for value, kind, param in fields:
        if value is None:
            continue
        if kind == "json":
            found.append(_schema(value, param))
        elif kind == "choice":
            found.append(Constraint.choice(value, param))
        else:
            found.append(Constraint(kind, value, param))
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
