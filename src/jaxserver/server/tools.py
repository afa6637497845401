"""Tool calling in a generic format, for models whose chat template knows no tools (SmolLM2's):

- the tools are described in a system message, with the shape the answer must take: a JSON object with
  either `tool_calls` (a list of {"name", "arguments"}) or `response` (a plain reply);
- decoding is constrained to that shape: with `tool_choice` "auto" either form, with "required" a call of
  one of the tools, with a named function a call of that one; arguments always validate against the
  function's `parameters`, so even a small model's call parses;
- earlier calls and tool results in the conversation are written back in the same JSON;
- the answer is parsed into OpenAI's `tool_calls` (arguments as a JSON string) or `content`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from jaxserver.engine.constraints import Constraint
from jaxserver.errors import BadRequestError
from jaxserver.server.schemas import ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall

INSTRUCTIONS = (
    "You can call these tools:\n{tools}\n\n"
    'To call tools, answer only with JSON: {{"tool_calls": [{{"name": <tool name>, "arguments": '
    "<arguments object>}}]}}.{choice}"
)
REPLY_OR_CALL = ' To answer without a tool, answer only with JSON: {"response": <your answer>}.'
TOOL_RESULT = "The tool call {id} ({name}) returned:\n{content}"
# Calls are written on one line with fixed separators (llguidance's options, in the schema): whitespace
# the model may choose is where a small model loses its way.
LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass
class ToolPlan:
    """The tools a chat request offers and how the model must use them."""

    tools: list[Tool]
    choice: str  # "auto", "required", or the one function's name
    parallel: bool

    def constraint(self) -> Constraint:
        """The JSON schema of the answers this plan allows."""
        offered = [t for t in self.tools if self.choice in ("auto", "required", t.function.name)]
        call = {"anyOf": [_call_schema(tool) for tool in offered]}
        calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        calling = _object({"tool_calls": calls})
        if self.choice != "auto":
            return Constraint.json_schema(calling | {"x-guidance": LAYOUT}, "tools")
        reply = _object({"response": {"type": "string"}})
        return Constraint.json_schema({"anyOf": [calling, reply], "x-guidance": LAYOUT}, "tools")

    def system_message(self) -> str:
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in self.tools)
        choice = {"auto": REPLY_OR_CALL, "required": " Call at least one tool."}.get(
            self.choice, f" Call the tool {self.choice}."
        )
        return INSTRUCTIONS.format(tools=described, choice=choice)


def tool_plan(
    tools: list[Tool] | None, choice: str | NamedToolChoice | None, parallel: bool | None
) -> ToolPlan | None:
    """The plan of a request's tools, or None when it offers none (or `tool_choice` is "none")."""
    if choice is not None and not tools:
        raise BadRequestError("tool_choice needs tools", param="tool_choice")
    if not tools or choice == "none":
        return None
    names = [tool.function.name for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequestError("tool names must be unique", param="tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise BadRequestError(
                f"tool_choice names {choice.function.name!r}, which is not among the tools ({', '.join(names)})",
                param="tool_choice",
            )
        choice = choice.function.name
    return ToolPlan(tools, choice or "auto", True if parallel is None else parallel)


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _call_schema(tool: Tool) -> dict[str, Any]:
    parameters = tool.function.parameters or {"type": "object", "properties": {}}
    return _object({"name": {"const": tool.function.name}, "arguments": parameters})


def generic_messages(messages: list[ChatMessage], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The conversation as system / user / assistant messages with text content: the tools' system
    message first (merged into the request's own), earlier calls and tool results written as the model
    is asked to write them. A tool message must answer a call made earlier in the conversation."""
    calls: dict[str, str] = {}  # call id -> function name, of the calls so far
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        text = message.text(i)
        if message.role == "tool":
            if message.tool_call_id not in calls:
                raise BadRequestError(
                    f"messages[{i}] answers tool call {message.tool_call_id!r}, which no earlier assistant "
                    "message made",
                    param=f"messages.{i}.tool_call_id",
                )
            name = calls[message.tool_call_id]
            out.append(
                {
                    "role": "user",
                    "content": TOOL_RESULT.format(id=message.tool_call_id, name=name, content=text),
                }
            )
            continue
        if message.role == "assistant" and message.tool_calls:
            calls.update((call.id, call.function.name) for call in message.tool_calls)
            text = json.dumps({"tool_calls": [_written_call(call, i) for call in message.tool_calls]})
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": text})
    if plan is not None:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{plan.system_message()}"
        else:
            out.insert(0, {"role": "system", "content": plan.system_message()})
    return out


def _written_call(call: ToolCall, index: int) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"the arguments of tool call {call.id!r} are not JSON: {exc}",
            param=f"messages.{index}.tool_calls",
        ) from exc
    return {"name": call.function.name, "arguments": arguments}


def parse_answer(text: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of an answer in the generic format; text that is not (an answer cut short)
    is content as it is."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
        return None, [
            ToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}",
                function=FunctionCall(name=call["name"], arguments=json.dumps(call["arguments"])),
            )
            for call in answer["tool_calls"]
        ]
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return answer["response"], None
    return text, None
