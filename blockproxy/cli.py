"""Command line: ``blockproxy [serve] --backends FILE``, ``demo``, ``bench``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; dispatching is shared with ``loadgen`` (:func:`loadgen.cli.dispatch`).
Running ``blockproxy`` with flags and no subcommand means ``serve``.
"""

from __future__ import annotations

import sys

from loadgen.cli import dispatch

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("blockproxy.serve", "run the proxy (the default: blockproxy --backends FILE)"),
    "demo": ("blockproxy.demo", "show blockproxy's predictions on an emulated cluster"),
    "bench": ("blockproxy.bench", "micro-benchmarks (bench sim: simulator speed)"),
}


def main(argv: list[str] | None = None) -> int:
    from blockproxy import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version") \
            and "serve" in COMMANDS:
        argv.insert(0, "serve")
    return dispatch("blockproxy", "Predictive reverse proxy for vLLM instances (OpenAI API).",
                    __version__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
