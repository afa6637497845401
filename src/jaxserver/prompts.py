"""How prompts are built from what a client sends: the seed's format strings or the model's chat template.

Pure text: no engine, no device. `/instruct`, `/chat`, `/v1/chat/completions`, `/tokenize` and the web pages
all build their prompts here, so one conversation becomes the same prompt whichever route it takes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jaxserver.config import JAXServerConfig
from jaxserver.errors import BadRequestError, NotReadyError
from jaxserver.model.tokenizer import Tokenizer

History = Sequence[Sequence[str]]  # [(user, assistant), ...]
Message = dict[str, str]  # {"role": ..., "content": ...}


def seed_history(config: JAXServerConfig, history: History) -> str:
    """The seed's chat history: one `chat_format` per (prompt, answer) pair."""
    return "".join(config.chat_format.format(prompt=user, assistant=bot) for user, bot in history)


@dataclass(frozen=True)
class PromptBuilder:
    """Prompts for one config and tokenizer (None before a model is loaded: only the seed's formats then).
    The callables are where one kind of prompt is built from another, so that a `JAXServer` subclass that
    replaces `process_chat_history`, `build_chat_prompt` or `build_messages_prompt` is used throughout:
    `render_history` writes a history in the seed's chat format, `render_chat` a chat turn (default
    `chat`), `render_messages` a conversation (default `messages`)."""

    config: JAXServerConfig
    tokenizer: Tokenizer | None
    render_history: Callable[[History], str]
    render_chat: Callable[[str, History, str | None], str] | None = None
    render_messages: Callable[[Sequence[Message]], str] | None = None

    @property
    def uses_seed_formats(self) -> bool:
        return self.config.uses_seed_formats(bool(self.tokenizer and self.tokenizer.has_chat_template))

    def instruct(self, prompt: str, system: str | None = None) -> str:
        cfg = self.config
        system = cfg.system if system is None else system
        if not cfg.contains_auto_format:
            return prompt
        if self.uses_seed_formats:
            instruct = cfg.prompt_prefix_instruct + prompt + cfg.prompt_postfix_instruct
            return cfg.instruct_format.format(instruct=instruct, system=cfg.system_prefix + system)
        return self._template([], prompt, system)

    def chat(self, prompt: str, history: History = (), system: str | None = None) -> str:
        cfg = self.config
        system = cfg.system if system is None else system
        if self.uses_seed_formats or not cfg.contains_auto_format:
            head = cfg.chat_prefix + (cfg.system_prefix + system if system else "")
            return (
                head
                + self.render_history(history)
                + cfg.prompt_prefix_chat
                + prompt
                + cfg.prompt_postfix_chat
            )
        return self._template(history, prompt, system)

    def messages(self, messages: Sequence[Message]) -> str:
        """An OpenAI-style conversation ending with a user turn: the model's chat template, or the seed's
        chat format when the model has none (or the config asks for it), so that `/chat` and
        `/v1/chat/completions` build the same prompt."""
        if self.uses_seed_formats or not self.config.contains_auto_format:
            return self._seed_messages(messages)
        if self.tokenizer is None:
            raise NotReadyError("the model is still loading")
        try:
            return self.tokenizer.apply_chat_template(messages)
        except Exception as exc:  # jinja raises its own types, including the template's raise_exception
            raise BadRequestError(f"the model's chat template rejected the conversation: {exc}") from exc

    def tool_messages(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]]) -> str | None:
        """A conversation offering tools, rendered by the model's chat template when the template writes
        calls as `<tool_call>` tags; None otherwise (the tools then take the generic format)."""
        if self.uses_seed_formats or not self.config.contains_auto_format:
            return None
        if self.tokenizer is None or not self.tokenizer.writes_tool_call_tags:
            return None
        try:
            return self.tokenizer.apply_chat_template(list(messages), tools=tools)
        except Exception as exc:  # jinja raises its own types, including the template's raise_exception
            raise BadRequestError(f"the model's chat template rejected the conversation: {exc}") from exc

    def _seed_messages(self, messages: Sequence[Message]) -> str:
        """`messages` in the seed's chat format: system turns joined, then (user, assistant) pairs."""
        system = "\n".join(m["content"] for m in messages if m["role"] == "system") or None
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[-1]["role"] != "user":
            raise BadRequestError("the conversation must end with a user message", param="messages")
        history, pending_user = [], None
        for message in turns[:-1]:
            if message["role"] == "user":
                if pending_user is not None:
                    history.append((pending_user, ""))
                pending_user = message["content"]
            else:
                history.append((pending_user or "", message["content"]))
                pending_user = None
        if pending_user is not None:
            history.append((pending_user, ""))
        return (self.render_chat or self.chat)(turns[-1]["content"], history, system)

    def _template(self, history: History, prompt: str, system: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        return (self.render_messages or self.messages)(messages)
