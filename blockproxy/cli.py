"""Command line: ``blockproxy [serve] --backends FILE``, ``demo``, ``bench``, ``profile``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this module only dispatches.  Running ``blockproxy`` with flags and
no subcommand means ``serve``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("blockproxy.demo", "show the simulator/proxy on an emulated cluster"),
    "bench": ("blockproxy.bench", "micro-benchmarks (bench sim: simulator speed)"),
}


def build_parser() -> argparse.ArgumentParser:
    from blockproxy import __version__

    parser = argparse.ArgumentParser(
        prog="blockproxy",
        description="Predictive reverse proxy for vLLM instances (OpenAI API).")
    parser.add_argument("--version", action="version", version=f"blockproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=module.__doc__,
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version") \
            and "serve" in COMMANDS:
        argv.insert(0, "serve")
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        parser.print_help(sys.stderr)
        print(f"\nblockproxy: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "_module", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
