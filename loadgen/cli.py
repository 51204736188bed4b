"""Command line of the load generator: ``loadgen COMMAND ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``.  :func:`dispatch` imports only the module of the command being run
(so one command's dependencies never break another) and is shared with ``blockproxy``'s
command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "emulate": ("loadgen.emulate", "start emulated vLLM instances (no GPU needed)"),
    "run": ("loadgen.run", "one benchmark run against an OpenAI-compatible endpoint"),
    "capacity": ("loadgen.capacity", "highest request rate that meets an SLO"),
    "compare": ("loadgen.compare", "routing policies side by side on fresh emulated clusters"),
    "report": ("loadgen.report", "tables and PNG plots from saved results"),
    "workload": ("loadgen.dump", "write a workload's requests (arrivals, sizes) to a file"),
}


def dispatch(prog: str, description: str, version: str,
             commands: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Run ``argv[0]``'s module; print help and return 2 for a missing/unknown command."""
    if argv and argv[0] in commands:
        module_name, help_text = commands[argv[0]]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(
            prog=f"{prog} {argv[0]}", description=module.__doc__ or help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(argv[1:])) or 0)
    listing = "\n".join(f"  {name:<10} {help_text}" for name, (_, help_text) in commands.items())
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=f"commands:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(commands))
    args, _ = parser.parse_known_args(argv)
    parser.print_help(sys.stderr)
    if args.command is not None:
        print(f"\n{prog}: unknown command {args.command!r}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from loadgen import __version__

    return dispatch("loadgen", "Load generator and emulated vLLM backends for blockproxy.",
                    __version__, COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
