"""``parallm``: the command line. Each subcommand lives in ``parallm/commands``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from parallm.commands import bench, export, generate, serve, tiny_model, train
from parallm.process_exit import exit_now

_COMMANDS = [generate, serve, bench, tiny_model, train, export]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default. An unset (None) default is not shown: such options say in
    their help what leaving them unset means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The parser of a subcommand: shows defaults, and reports an unknown flag with its own
    usage line (``usage: parallm serve ...``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # argparse hands a subcommand's leftovers up to the top-level parser, which reports them
        # with its own usage; report them here instead.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallm",
        description="Serve and train large language models fast.",
        formatter_class=HelpFormatter,
    )
    # Subcommands' parsers, and theirs (`bench serve`), are CommandParsers.
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if _torchrun_worker(args):
            from parallm.engine.executor import torchrun_worker_main

            return torchrun_worker_main(args.tensor_parallel_size, args.device)
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"{_prog(args)}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> NoReturn:
    """The ``parallm`` command: :func:`main`, then :func:`~parallm.process_exit.exit_now`.
    Training and tensor-parallel ranks leave gloo process groups behind, whose threads must
    not meet the interpreter's finalization."""
    exit_now(main())


def _torchrun_worker(args: argparse.Namespace) -> bool:
    """Whether this process is rank 1..N-1 of a tensor-parallel torchrun job: every rank runs
    the same command, rank 0 runs it and the others serve its engine's steps."""
    tp = getattr(args, "tensor_parallel_size", 1)
    if tp == 1 or "RANK" not in os.environ:
        return False  # (skips importing torch for the check)
    from parallm.engine.executor import check_torchrun_world, is_torchrun_worker

    check_torchrun_world(tp)  # every rank reports a job of the wrong size
    return is_torchrun_worker(tp)


def _prog(args: argparse.Namespace) -> str:
    """``parallm COMMAND`` (``parallm bench serve`` for a benchmark), as errors name it."""
    bench_kind = getattr(args, "bench", None)
    return f"parallm {args.command}" + (f" {bench_kind}" if bench_kind else "")


if __name__ == "__main__":
    entry()
