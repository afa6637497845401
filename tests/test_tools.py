"""Tool calling in the generic format, through the `openai` SDK against a tiny random model: a forced call
parses and its arguments validate against the function's parameters (checked by jsonschema-rs), streamed
calls arrive as the SDK's deltas, a two-turn loop runs, and bad tool requests are 400 naming the field."""

import functools
import json
import shutil

import httpx
import jsonschema_rs
import pytest

from jaxserver.errors import BadRequestError
from jaxserver.server.openai_schemas import ChatMessage, Tool
from jaxserver.server.tools import generic_messages, parse_answer, parse_tagged, template_messages, tool_plan
from tests import tiny
from tests.live import sdk_client, serving

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def ask(served_tiny):
    """Chat completions of the ASK conversation offering TOOLS, with the other fields given."""
    client = sdk_client(served_tiny[1])
    return functools.partial(
        client.chat.completions.create, model=served_tiny[0].model_name, messages=ASK, tools=TOOLS
    )


def check_call(name: str, arguments: str, allowed: set[str]) -> dict:
    assert name in allowed
    parsed = json.loads(arguments)
    assert jsonschema_rs.validator_for(PARAMETERS[name]).is_valid(parsed), (name, arguments)
    return parsed


def test_a_forced_call_parses_and_validates(ask):
    for seed in range(3):
        choice = ask(
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            max_tokens=200,
            seed=seed,
        ).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments, {"get_weather"})


def test_required_calls_stream_as_sdk_deltas(ask):
    for seed in range(3):
        stream = ask(tool_choice="required", max_tokens=300, seed=seed, stream=True)
        calls: dict[int, dict] = {}
        reasons = []
        for chunk in stream:
            for choice in chunk.choices:
                reasons += [choice.finish_reason] if choice.finish_reason else []
                assert not choice.delta.content
                for delta in choice.delta.tool_calls or []:
                    call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                    call["id"] = delta.id or call["id"]
                    call["name"] = (delta.function.name if delta.function else None) or call["name"]
                    call["arguments"] += (delta.function.arguments if delta.function else None) or ""
        if reasons == ["length"]:
            continue  # cut short: no call to parse
        assert reasons == ["tool_calls"] and calls
        for call in calls.values():
            assert call["id"].startswith("call_")
            check_call(call["name"], call["arguments"], {"get_weather", "add"})


def test_auto_answers_with_a_call_or_a_reply_then_a_loop_finishes(ask):
    """Two turns: a call, the tool's result, then a plain answer (tool_choice "none")."""
    first = ask(tool_choice="auto", max_tokens=200, seed=1).choices[0]
    assert first.finish_reason in ("tool_calls", "stop", "length")
    if first.finish_reason == "stop":
        assert isinstance(first.message.content, str) and not first.message.tool_calls
    forced = ask(tool_choice="required", max_tokens=200, seed=2).choices[0]
    assert forced.finish_reason == "tool_calls"
    call = forced.message.tool_calls[0]
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"},
    ]
    final = ask(messages=turn, tool_choice="none", max_tokens=8, seed=3).choices[0]
    assert final.message.tool_calls is None and isinstance(final.message.content, str)


def test_history_renders_calls_and_results_in_the_generic_format():
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Add 2 and 3."),
        ChatMessage(
            role="assistant",
            tool_calls=[{"id": "c1", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
        ),
        ChatMessage(role="tool", tool_call_id="c1", content="5"),
    ]
    plan = tool_plan([Tool.model_validate(ADD)], "auto", None)
    rendered = generic_messages(messages, plan)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"].startswith("Be brief.") and '"add"' in rendered[0]["content"]
    assert json.loads(rendered[2]["content"]) == {
        "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    }
    assert "c1" in rendered[3]["content"] and "5" in rendered[3]["content"]
    with pytest.raises(BadRequestError) as caught:
        generic_messages([messages[1], ChatMessage(role="tool", tool_call_id="c9", content="5")], plan)
    assert caught.value.param == "messages.1.tool_call_id"
    content, calls = parse_answer('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}')
    assert content is None and json.loads(calls[0].function.arguments) == {"a": 1, "b": 2}
    assert parse_answer('{"response": "hi"}') == ("hi", None)
    assert parse_answer('{"tool_ca') == ('{"tool_ca', None)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "hi"}]},
            "messages.1.tool_call_id",
        ),
        ({"messages": [*ASK, {"role": "tool", "content": "hi"}]}, "messages.1"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(served_tiny, body, param):
    response = httpx.post(
        f"{served_tiny[1]}/v1/chat/completions", json={"messages": ASK, "max_tokens": 3} | body, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# A template in the manner of Hermes' and Qwen's: tools in the system turn, calls as <tool_call> JSON.
TAGGED_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call them as <tool_call>\n{json}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>\n{{ call.function | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tagged(tiny_llama_dir, tmp_path_factory):
    """The tiny model with a template that writes tool calls, served."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tagged")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TAGGED_TEMPLATE
    tokenizer.save_pretrained(folder)
    with serving(folder, tiny.test_config(max_length=2048, max_batch_size=8)) as served:
        yield served


def test_a_template_that_writes_calls_renders_them_and_its_calls_parse(tagged):
    server, url = tagged
    ask = functools.partial(
        sdk_client(url).chat.completions.create, model=server.model_name, messages=ASK, tools=TOOLS
    )
    for seed in range(2):
        choice = ask(tool_choice="required", max_tokens=200, seed=seed).choices[0]
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            check_call(call.function.name, call.function.arguments, {"get_weather", "add"})
    call = choice.message.tool_calls[0]
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
    ]
    prompt = server.build_tool_prompt(template_messages([ChatMessage(**m) for m in turn]), [WEATHER])
    assert "<tool_response>\nSunny" in prompt and '"get_weather"' in prompt and "<tool_call>" in prompt
    final = ask(messages=turn, tool_choice="auto", max_tokens=6, seed=1).choices[0]
    assert final.finish_reason in ("stop", "length", "tool_calls")


def test_tagged_calls_parse_with_the_text_around_them():
    text = 'Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = parse_tagged(text)
    assert content == "Let me check." and calls[0].function.name == "add"
    assert json.loads(calls[0].function.arguments) == {"a": 1, "b": 2}
    assert parse_tagged("no calls here") == ("no calls here", None)
    assert parse_tagged("<tool_call>\n{broken\n</tool_call>")[1] is None
