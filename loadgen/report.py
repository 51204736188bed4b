"""Tables and PNG plots from saved results: ``loadgen report RESULT.json ...``.

Reads ``loadgen compare --json`` files (one table per seed, a median table across seeds,
CDFs, percentile bars and capacity curves) and ``loadgen run --json`` files (one row
each; CDFs when saved with ``--detail``).  ``--merge`` joins compare files run in pieces
(other policies, other seeds, same time scale) into one comparison.  Runs that stopped at
their last first token (``--until first-token``) show TTFT figures only.  Time-scaled runs
are shown in real-GPU time (wall-clock divided by the time scale).  Plots use matplotlib's
Agg backend (no display); matplotlib comes with the ``[loadgen]`` extra.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.measure import real_view

COMPARE_KIND = "loadgen-compare"
#: the policy the ratio columns compare against
BASELINE = "round_robin"

# (header, headline key, format): the columns of a comparison table
_COLUMNS = (("done", "completed", "d"), ("cut", "cut", "d"), ("fail", "failed", "d"),
            ("mean TTFT", "mean_ttft_ms", ".0f"), ("p50 TTFT", "median_ttft_ms", ".0f"),
            ("p99 TTFT", "p99_ttft_ms", ".0f"), ("p99 E2EL", "p99_e2el_ms", ".0f"),
            ("mean TPOT", "mean_tpot_ms", ".1f"), ("req/s", "request_throughput", ".2f"),
            ("tok/s", "output_throughput", ".0f"), ("goodput", "request_goodput", ".2f"),
            ("capacity", "capacity", ".3g"), ("prefix hit", "prefix_hit_rate", ".1%"),
            ("predicted hit", "predicted_prefix_hit_rate", ".1%"),
            ("err ttft", "error_ttft", ".2f"),
            ("err e2e", "error_e2e", ".2f"), ("err len", "error_output_length", ".2f"))
_RATIOS = (("p99_ttft", "p99_ttft_ms"), ("p99_e2el", "p99_e2el_ms"))


def headline(entry: dict[str, Any]) -> dict[str, Any]:
    """The figures a table shows for one policy run (real-GPU time)."""
    m = real_view(entry["metrics"])
    errors = entry.get("proxy", {}).get("prediction_error", {})
    cap = entry.get("capacity")
    out = {"completed": m.get("completed"), "cut": m.get("cut"), "failed": m.get("failed"),
           "mean_ttft_ms": m.get("mean_ttft_ms"), "median_ttft_ms": m.get("median_ttft_ms"),
           "p99_ttft_ms": m.get("p99_ttft_ms"), "p99_e2el_ms": m.get("p99_e2el_ms"),
           "mean_tpot_ms": m.get("mean_tpot_ms"),
           "request_throughput": m.get("request_throughput"),
           "output_throughput": m.get("output_throughput"),
           "request_goodput": m.get("request_goodput"),
           "capacity": cap.get("capacity") if cap else None,
           "prefix_hit_rate": entry.get("proxy", {}).get("emulator", {}).get("prefix_hit_rate"),
           "predicted_prefix_hit_rate": entry.get("proxy", {}).get("predicted_prefix_hit_rate"),
           "error_ttft": errors.get("ttft"), "error_e2e": errors.get("e2e"),
           "error_output_length": errors.get("output_length")}
    if not _whole(m):
        # A run cut at its last first token measured TTFTs only: whole-request figures of
        # the requests that happened to finish first would mislead.
        out.update(dict.fromkeys(_WHOLE_RUN_KEYS))
    return out


#: headline figures that only a run waiting for every request to end can give
_WHOLE_RUN_KEYS = ("p99_e2el_ms", "mean_tpot_ms", "request_throughput", "output_throughput",
                   "request_goodput", "error_e2e", "error_output_length")


def _whole(metrics: dict[str, Any]) -> bool:
    """Whether the run waited for every request to end (not a first-token run)."""
    return metrics.get("until", "done") == "done"


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per policy: the headline figures per seed and their median across seeds."""
    out: dict[str, Any] = {}
    for run in runs:
        for policy, entry in run["policies"].items():
            per_seed = out.setdefault(policy, {"per_seed": {}})["per_seed"]
            per_seed[str(run["seed"])] = headline(entry)
    for summary in out.values():
        rows = list(summary["per_seed"].values())
        summary["median"] = {key: (statistics.median(vals) if vals else None)
                             for key in rows[0]
                             for vals in [[r[key] for r in rows if r[key] is not None]]}
    return out


def merge_results(results: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One comparison from compare results run in pieces: runs joined by seed, policies in
    order of first appearance, medians recomputed.  A (seed, policy) pair in two files, or
    two time scales, is an error."""
    scales = {r.get("time_scale", 1.0) for _, r in results}
    if len(scales) != 1:
        raise ValueError(f"cannot merge results of different time scales: {sorted(scales)}")
    by_seed: dict[Any, dict[str, Any]] = {}
    origin: dict[tuple[Any, str], str] = {}
    policies: list[str] = []
    for path, result in results:
        for run in result["runs"]:
            merged = by_seed.setdefault(run["seed"], {})
            for policy, entry in run["policies"].items():
                if (run["seed"], policy) in origin:
                    raise ValueError(f"seed {run['seed']} of {policy} is in both "
                                     f"{origin[(run['seed'], policy)]} and {path}")
                origin[(run["seed"], policy)] = path
                merged[policy] = entry
                if policy not in policies:
                    policies.append(policy)
    runs = [{"seed": seed, "policies": {p: by_seed[seed][p] for p in policies
                                        if p in by_seed[seed]}}
            for seed in sorted(by_seed)]
    return {"kind": COMPARE_KIND, "policies": policies, "seeds": sorted(by_seed),
            "time_scale": scales.pop(), "runs": runs, "summary": summarize(runs),
            "merged_from": [path for path, _ in results]}


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(int(value) if fmt == "d" else value, fmt)


def format_table(rows: Sequence[tuple[str, dict[str, Any]]], title: str) -> str:
    """One row per (label, headline); ratio columns vs ``round_robin`` when it is a row.

    Columns that are empty in every row (no goodput SLO, no capacity search, a policy
    without predictions) are left out.
    """
    columns = [c for c in _COLUMNS if any(h.get(c[1]) is not None for _, h in rows)]
    base = next((h for label, h in rows if label.split(" ")[0] == BASELINE), None)
    ratios = [r for r in _RATIOS if base and base.get(r[1])] if base else []
    width = max([len("policy"), *(len(label) for label, _ in rows)])
    header = [f"{'policy':<{width}}", *(f"{name:>9}" for name, _, _ in columns),
              *(f"{name + ' vs rr':>14}" for name, _ in ratios)]
    lines = [title, "  ".join(header)]
    for label, h in rows:
        cells = [f"{label:<{width}}", *(f"{_cell(h.get(key), fmt):>9}"
                                        for _, key, fmt in columns)]
        for _, key in ratios:
            assert base is not None  # ratios exist only with a baseline row
            value = h.get(key)
            cells.append(f"{'-' if value is None else f'{value / base[key]:.2f}x':>14}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _units(time_scale: float | None) -> str:
    if time_scale is None:
        return "real-GPU times in ms (mixed time scales)"
    if time_scale == 1:
        return "times in ms"
    return f"real-GPU times in ms (wall-clock / time-scale {time_scale:g})"


def format_compare(result: dict[str, Any], label: str = "") -> str:
    """The tables of a compare result: one per seed, and the median across seeds."""
    units = _units(result.get("time_scale", 1.0))
    prefix = f"{label}: " if label else ""
    blocks = []
    for run in result["runs"]:
        rows = [(policy, headline(entry)) for policy, entry in run["policies"].items()]
        ceiling = run.get("prefix_reuse_ceiling")
        reuse = f" - prefix reuse ceiling {ceiling:.1%}" if ceiling is not None else ""
        blocks.append(format_table(rows, f"{prefix}seed {run['seed']} - {units}{reuse}"))
    if len(result["runs"]) > 1:
        rows = [(policy, s["median"]) for policy, s in result["summary"].items()]
        blocks.append(format_table(rows, f"{prefix}median across seeds "
                                         f"{result.get('seeds')} - {units}"))
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------- loading


def load_result(path: str | Path) -> dict[str, Any]:
    """A saved result as a compare-shaped dict (a ``loadgen run`` file becomes one policy
    named after the file)."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == COMPARE_KIND:
        return data
    if "completed" in data:
        name = Path(path).stem
        return {"kind": "loadgen-run", "policies": [name], "seeds": [data.get("seed", 0)],
                "time_scale": data.get("time_scale", 1.0),
                "runs": [{"seed": data.get("seed", 0),
                          "policies": {name: {"policy": name, "metrics": data}}}]}
    raise ValueError(f"{path}: neither a loadgen compare nor a loadgen run result")


def _series(results: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One plotted series per (file, policy): entries of every seed, and the time scale."""
    out = []
    for label, result in results:
        for policy in result["policies"]:
            entries = [run["policies"][policy] for run in result["runs"]
                       if policy in run["policies"]]
            name = f"{label}: {policy}" if label else policy
            out.append({"label": name, "entries": entries,
                        "time_scale": result.get("time_scale", 1.0)})
    return out


def _values(series: dict[str, Any], key: str) -> list[float]:
    # Pooled over seeds, in real-GPU ms: successful requests, and the TTFTs of requests a
    # first-token run cut after their first token (its other figures are left out).
    scale = series["time_scale"] or 1.0
    out = []
    for entry in series["entries"]:
        if not _whole(entry["metrics"]) and key != "ttft_ms":
            continue
        out += [row[key] / scale for row in entry["metrics"].get("per_request", [])
                if row.get(key) is not None and (row.get("success") or (
                    key == "ttft_ms" and row.get("cut") and row[key] > 0))]
    return out


# --------------------------------------------------------------------------- plots


def plot_results(results: Sequence[dict[str, Any]], out: str | Path,
                 labels: Sequence[str] | None = None) -> Path:
    """Write a PNG: TTFT and E2E latency CDFs, p50/p99 TTFT bars, capacity curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    labels = list(labels) if labels else [""] * len(results)
    series = _series(list(zip(labels, results)))
    scales = {s["time_scale"] for s in series}
    unit = "ms" if scales == {1.0} else "real-GPU ms"
    has_capacity = any(e.get("capacity") for s in series for e in s["entries"])
    # Capacity adds a fourth panel: a 2x2 grid keeps each one readable.
    rows, cols = (2, 2) if has_capacity else (1, 3)
    fig, grid = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.4 * rows), squeeze=False)
    axes = list(grid.flat)
    plain = matplotlib.ticker.FuncFormatter(_log_tick)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "e2el_ms", "E2E latency")):
        drawn = 0
        for i, s in enumerate(series):
            values = np.sort(np.asarray(_values(s, key)))
            if len(values):
                drawn += 1
                ax.plot(values, np.arange(1, len(values) + 1) / len(values),
                        color=colors[i % len(colors)], label=s["label"])
        if not drawn:  # first-token runs only: no whole-request figures to draw
            ax.set_title(f"{title} CDF")
            ax.text(0.5, 0.5, "no whole runs\n(first-token runs measure TTFT only)",
                    ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel(f"{title} ({unit}, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    ax = axes[2]
    x = np.arange(len(series))
    p50 = [_median_headline(s, "median_ttft_ms") for s in series]
    p99 = [_median_headline(s, "p99_ttft_ms") for s in series]
    ax.bar(x - 0.2, p50, 0.4, label="p50 TTFT")
    ax.bar(x + 0.2, p99, 0.4, label="p99 TTFT")
    for xs, ys in ((x - 0.2, p50), (x + 0.2, p99)):
        for xi, yi in zip(xs, ys):
            ax.annotate(f"{yi:.0f}", (xi, yi), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [s["label"] for s in series], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title("TTFT percentiles" + (" (median of seeds)" if _multi_seed(series) else ""))
    ax.legend(fontsize=8)

    if has_capacity:
        _plot_capacity(axes[3], series, colors, unit)
        for axis in (axes[3].xaxis, axes[3].yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_tick(value: float, _pos: object = None) -> str:
    # Plain numbers at 1, 2 and 5 x 10^k: readable when a log axis spans under a decade.
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if round(mantissa, 6) in (1.0, 2.0, 5.0) else ""


def _multi_seed(series: Sequence[dict[str, Any]]) -> bool:
    return any(len(s["entries"]) > 1 for s in series)


def _median_headline(series: dict[str, Any], key: str) -> float:
    import numpy as np

    values = [headline(e)[key] for e in series["entries"]]
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else 0.0


def _plot_capacity(ax: Any, series: Sequence[dict[str, Any]], colors: Sequence[str],
                   unit: str) -> None:
    slo = None
    knob = "load"
    for i, s in enumerate(series):
        for j, entry in enumerate(s["entries"]):
            cap = entry.get("capacity")
            if not cap:
                continue
            slo = cap.get("slo_ttft_p99_ms") or slo
            knob = cap.get("knob", knob)
            points = [p for p in cap["curve"] if p.get("p99_ttft_ms") is not None]
            ax.plot([p["value"] for p in points], [p["p99_ttft_ms"] for p in points],
                    marker="o", color=colors[i % len(colors)],
                    label=s["label"] if j == 0 else None)
    if slo:
        ax.axhline(slo, color="black", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(knob)
    ax.set_ylabel(f"p99 TTFT ({unit})")
    ax.set_title("Capacity curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``loadgen report``."""
    parser.add_argument("results", nargs="+", metavar="RESULT.json",
                        help="loadgen compare or loadgen run JSON files")
    parser.add_argument("--plot", metavar="OUT.png", help="draw the plots here")
    parser.add_argument("--table", action="store_true",
                        help="print the tables (the default when --plot is not given)")
    parser.add_argument("--merge", action="store_true",
                        help="join the compare files into one comparison (runs by seed)")
    parser.add_argument("--json", metavar="OUT", help="with --merge: write the merged result")


def run(args: argparse.Namespace) -> int:
    """``loadgen report``: tables on stdout, plots to ``--plot``."""
    try:
        results = [load_result(p) for p in args.results]
    except (OSError, ValueError) as exc:
        print(f"loadgen report: {exc}", file=sys.stderr)
        return 2
    compares = [(p, r) for p, r in zip(args.results, results) if r["kind"] == COMPARE_KIND]
    singles = [(p, r) for p, r in zip(args.results, results) if r["kind"] != COMPARE_KIND]
    if args.merge:
        if singles or not compares:
            print("loadgen report: --merge takes loadgen compare files only", file=sys.stderr)
            return 2
        try:
            merged = merge_results(compares)
        except ValueError as exc:
            print(f"loadgen report: {exc}", file=sys.stderr)
            return 2
        if args.json:
            from loadgen.run import write_json
            write_json(args.json, merged)
        compares, results = [("merged", merged)], [merged]
        args.results = ["merged"]
    if args.table or not args.plot:
        blocks = [format_compare(r, Path(p).name if len(compares) > 1 else "")
                  for p, r in compares]
        if singles:
            rows = [(name, headline(run_["policies"][name]))
                    for _, r in singles for run_ in r["runs"] for name in run_["policies"]]
            scales = {r.get("time_scale", 1.0) for _, r in singles}
            blocks.append(format_table(rows, "loadgen run results - " + _units(
                scales.pop() if len(scales) == 1 else None)))
        print("\n\n".join(blocks))
    if args.plot:
        labels = [Path(p).stem if len(results) > 1 and r["kind"] == COMPARE_KIND else ""
                  for p, r in zip(args.results, results)]
        plot_results(results, args.plot, labels)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
