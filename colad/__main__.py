"""colad's command line: ``python -m colad <command> ...`` (or ``colad <command> ...``).

The commands live in :mod:`colad.cli`; :mod:`colad.cli.parser` lists them with examples
(``python -m colad --help``). This module runs one and turns bad input into exit status 2.
"""

from __future__ import annotations

import sys

from .cli import build_parser

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from .backbone import WeightsUnavailable
    from .data import DatasetError
    from .engine import CheckpointError, TrainingDiverged

    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (DatasetError, ValueError, CheckpointError, WeightsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
