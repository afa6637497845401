"""Tool calling. A model whose chat template writes calls as `<tool_call>` JSON tags (Hermes', Qwen's) gets
the tools and the conversation rendered by that template, answers constrained to such calls for
`tool_choice` "required" or a named function, and its calls parsed from the tags. Any other model (SmolLM2)
gets a generic format:

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
import re
import uuid
from dataclasses import dataclass
from typing import Any

from jaxserver.engine.constraints import Constraint, closed_objects
from jaxserver.errors import BadRequestError
from jaxserver.server.openai_schemas import ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall

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
# Parallel calls in one generic answer at most: a small model, free to, repeats its call until its budget
# is gone.
MAX_CALLS = 5


@dataclass
class ToolPlan:
    """The tools a chat request offers and how the model must use them."""

    tools: list[Tool]
    choice: str  # "auto", "required", or the one function's name
    parallel: bool
    tagged: bool = False  # the model's template writes the calls, as <tool_call> tags

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def constraint(self) -> Constraint | None:
        """What this plan's answers must match: the generic format's JSON schema; for tagged calls a
        grammar of calls where a call is required, else nothing."""
        offered = [t for t in self.tools if self.choice in ("auto", "required", t.function.name)]
        call = {"anyOf": [_call_schema(tool) for tool in offered]}
        if self.tagged:
            return (
                None
                if self.choice == "auto"
                else _tagged_grammar(call | {"x-guidance": LAYOUT}, self.parallel)
            )
        calls = {"type": "array", "items": call, "minItems": 1, "maxItems": MAX_CALLS if self.parallel else 1}
        calling = _object({"tool_calls": calls})
        if self.choice != "auto":
            return Constraint.json_schema(calling | {"x-guidance": LAYOUT}, "tools")
        reply = _object({"response": {"type": "string"}})
        return Constraint.json_schema({"anyOf": [calling, reply], "x-guidance": LAYOUT}, "tools")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """(content, tool calls) of a finished answer."""
        return parse_tagged(text) if self.tagged else parse_answer(text)

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


def _tagged_grammar(call: dict[str, Any], parallel: bool) -> Constraint:
    calls = 'call ("\\n" call)*' if parallel else "call"
    body = json.dumps(closed_objects(call))  # read strictly, as Constraint.json_schema reads schemas
    lark = f'start: {calls}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {body}\n'
    return Constraint("grammar", lark, "tools")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as chat templates take it: calls with their arguments as objects, tool messages
    with the id of the earlier call they answer."""
    called: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
        entry["content"] = message.text(i)
        if message.role == "tool":
            _check_answers(message, i, called)
            entry["tool_call_id"] = message.tool_call_id
        if message.role == "assistant" and message.tool_calls:
            called.update(call.id for call in message.tool_calls)
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": _written_call(c, i)} for c in message.tool_calls
            ]
        out.append(entry)
    return out


def _check_answers(message: ChatMessage, index: int, called: set[str] | dict[str, str]) -> None:
    if message.tool_call_id not in called:
        raise BadRequestError(
            f"messages[{index}] answers tool call {message.tool_call_id!r}, which no earlier assistant "
            "message made",
            param=f"messages.{index}.tool_call_id",
        )


def generic_messages(messages: list[ChatMessage], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """The conversation as system / user / assistant messages with text content: the tools' system
    message first (merged into the request's own), earlier calls and tool results written as the model
    is asked to write them. A tool message must answer a call made earlier in the conversation."""
    calls: dict[str, str] = {}  # call id -> function name, of the calls so far
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        text = message.text(i)
        if message.role == "tool":
            _check_answers(message, i, calls)
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
        return None, [_tool_call(call["name"], call["arguments"]) for call in answer["tool_calls"]]
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return answer["response"], None
    return text, None


TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tagged(text: str) -> tuple[str | None, list[ToolCall] | None]:
    """(content, tool calls) of an answer that may hold `<tool_call>` tags: the text around them is the
    content; a tag whose JSON does not parse stays in the content."""
    calls, kept = [], []
    for match in TAGGED_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
            calls.append(_tool_call(call["name"], call.get("arguments", call.get("parameters", {}))))
        except (json.JSONDecodeError, KeyError, TypeError):
            kept.append(match.group(0))
    content = (TAGGED_CALL.sub("", text).strip() + "".join(kept)) or None
    return (content, calls) if calls else (text, None)


def _tool_call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=json.dumps(arguments))
    )
