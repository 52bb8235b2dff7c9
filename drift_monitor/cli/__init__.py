"""`drift-monitor` command line. Subcommands stay thin: the work lives in the library.

One module per subcommand (or small group), each with ``add_parser(subparsers)``, which adds
its parser and returns it, and ``run(args) -> int``; :data:`COMMANDS` lists them in the order
``--help`` shows them, so a new subcommand is its module and one entry there. Each module
imports its library code inside ``run``: ``--help`` and a mistyped flag stay fast.

Why errors are caught here, and only ours: a user who mistypes a path should read one line that
names the fix, not a traceback, and the library says so by raising a
:class:`~drift_monitor.errors.DriftMonitorError`. Anything else is a bug of ours, so it keeps
its traceback (and asks for a report) instead of passing for a user error. ``--debug`` shows
the traceback of either.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from .. import __version__
from ..errors import DriftMonitorError
from . import bench, dashboard, demo, diff_dict, export, merge, preflight, probes, replay, runs, scan, train_sae, verify
from .dashboard import dashboard_command, is_loopback

__all__ = ["COMMANDS", "build_parser", "dashboard_command", "is_loopback", "main"]

#: The subcommands, in ``--help`` order: modules with ``add_parser(subparsers)`` and ``run(args)``.
COMMANDS: tuple[ModuleType, ...] = (bench, probes, scan, verify, preflight, diff_dict, train_sae, export, merge,
                                    dashboard, demo, runs, replay)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the global options and every subcommand of :data:`COMMANDS`."""
    p = argparse.ArgumentParser(prog="drift-monitor", description="Watch LLM fine-tuning through a base-model SAE.")
    p.add_argument("--version", action="version", version=f"drift-monitor {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(func=command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("drift-monitor: interrupted; what was stored is whole, and rerunning the same command finishes "
              "the job", file=sys.stderr)
        return 130
    except DriftMonitorError as e:  # ours: the message names the fix (a setting, a path, a file given)
        if args.debug:
            traceback.print_exc()
        message = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
        print(f"drift-monitor: error: {message}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - not ValueError/OSError as "user errors": they hide our bugs
        traceback.print_exc()
        print("drift-monitor: internal error (a bug in drift-monitor, not in your input); please report "
              "this with the traceback above", file=sys.stderr)
        return 1
