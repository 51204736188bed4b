"""Command line: ``blockproxy [serve] --backends FILE``, ``demo``, ``bench``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; only the module of the command being run is imported, so ``serve``
never loads what ``demo`` and ``bench`` need (the load generator, matplotlib).  Running
``blockproxy`` with flags and no subcommand means ``serve``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("blockproxy.serve", "run the proxy (the default: blockproxy --backends FILE)"),
    "demo": ("blockproxy.demo", "show blockproxy's predictions on an emulated cluster"),
    "bench": ("blockproxy.bench", "micro-benchmarks (bench sim: simulator speed)"),
    "profile": ("blockproxy.profiler", "fit a step-time profile against a live vLLM instance"),
    "train-lengths": ("blockproxy.train_lengths",
                      "train the output-length model offline from a request log"),
    "train-router": ("blockproxy.train_router",
                     "train the learned Intelligent Router offline on a model of the cluster"),
}


def require_extra(command: str, *modules: str) -> None:
    """Exit with a clear message when ``modules`` (the ``[loadgen]`` extra) are missing."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(
                f"blockproxy {command} needs the load generator and its plots ({exc}); "
                "install them with: pip install 'blockproxy[loadgen]' "
                "(from a checkout: pip install '.[loadgen]')") from None


def _usage(version: str) -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="blockproxy", description="Predictive reverse proxy for vLLM instances "
        "(OpenAI API).", epilog=f"commands:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blockproxy {version}")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    from blockproxy import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    if not argv or argv[0] not in COMMANDS:
        usage = _usage(__version__)
        usage.parse_known_args(argv[:1])  # --version / --help exit here
        usage.print_help(sys.stderr)
        if argv:
            print(f"\nblockproxy: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"blockproxy {argv[0]}",
                                     description=module.__doc__ or help_text,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
