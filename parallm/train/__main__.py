"""``torchrun --nproc-per-node N -m parallm.train --config FILE [--set k=v ...] [--plot]``."""

from __future__ import annotations

import logging
import sys

from parallm.cli import CommandParser
from parallm.commands.train import add_arguments, run
from parallm.process_exit import exit_now


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m parallm.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ValueError as e:
        print(f"parallm train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    exit_now(main())  # without finalization: the gloo groups' threads may outlive main()
