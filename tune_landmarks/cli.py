"""The `tune-landmarks` command line. Run options come from TrainConfig's fields (YAML defaults via
--config, then flags; `--image_size` and `--image-size` both work, as in the workflow being replaced).

Library modules log; this module decides what reaches the console (`-q` warnings only, `-v` everything,
Ray's own lines included). Each subcommand's module keeps its heavy imports (torch, Ray) inside its
functions, so `tune-landmarks --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from . import audit, compare, demo, evaluate, export, import_model, predict, report, stages, sweeps, synth


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune-landmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (debug lines, Ray's own)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        module.register_cli(sub)
    return p


# Every subcommand's module, in the order `--help` lists them; each adds its own with `register_cli(sub)`.
SUBCOMMAND_MODULES = (synth, audit, stages, evaluate, import_model, sweeps, demo, export, predict, report, compare)


class _ConsoleHandler(logging.Handler):
    """Information to stdout as plain lines (it is the program's output); warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: this tool's information; -v: debug lines, Ray's included."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if verbosity <= 0 else "%(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger(__package__)
    pkg.handlers[:] = [handler]
    pkg.setLevel(level)
    pkg.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # DatasetError, CheckpointError, SpaceError too
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
