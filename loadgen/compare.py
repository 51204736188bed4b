"""Compare routing policies on the same workload: ``loadgen compare --policies a,b,...``.

For each policy a FRESH emulated cluster (``loadgen emulate``) and a FRESH ``blockproxy
serve --policy NAME`` are started, the same trace slice is replayed through the proxy with
the same seed (:func:`loadgen.run.run_benchmark`), the proxy's ``/metrics`` are scraped for
its prediction errors and routing decisions, and both processes are stopped.  Fresh
processes matter: the emulator's prefix cache and the proxy's learned state (calibrated
speeds, output lengths) would otherwise carry over from one policy to the next.

``block*`` is the pseudo-policy ``block`` with the true output length sent to the proxy
in the ``x-blockproxy-output-tokens`` hint header (the oracle upper bound).

``--capacity`` also searches each policy's highest load meeting the SLO
(:func:`loadgen.capacity.find_capacity`); every probe gets its own fresh cluster and
proxy, for the same reason.  ``--seeds 1,2,3`` repeats the whole comparison per seed
(prompts, arrivals of rate-driven runs, emulator noise) and reports per-seed and median
figures.

``--proxies N`` puts N proxies in front of the cluster, gossiping with each other over UDP on
loopback (``--no-gossip``: each blind to the others), and sends requests round-robin across
them, as nginx would.  Each run then also reports the gossip bandwidth per proxy and the
99th percentile propagation delay of gossip datagrams.

Time scale: ``--time-scale S`` slows the emulated GPU S times (arrival gaps are stretched
to match), which keeps a busy cluster faithful on a small machine: one emulator process
sustains about 6 busy instances / ~15k streamed tokens/s at S=1 before its step timing
drifts.  Tables then show real-GPU (unscaled) times, and ``--goodput`` / ``--slo-*`` bounds
are real-GPU ms too.  Every process started is stopped,
also on Ctrl-C or SIGTERM (see :mod:`loadgen.cluster`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from loadgen import __version__, promtext, report
from loadgen.capacity import add_search_arguments, find_capacity, probe_kwargs, slo_check
from loadgen.cluster import (
    EmulatedCluster,
    PeerProcess,
    ProxyProcess,
    get_texts,
    instance_profiles,
)
from loadgen.measure import real_view
from loadgen.peers import PeerMissing, parse_router
from loadgen.procs import free_udp_ports
from loadgen.report import summarize
from loadgen.run import (
    add_workload_arguments,
    benchmark_kwargs,
    run_benchmark,
    specs_from_args,
    timestamped,
    write_json,
)
from loadgen.workload import RequestSpec, prefix_reuse

#: suffix of a policy name that sends the true output length as the proxy's hint
HINT_SUFFIX = "*"
#: per-request fields kept for CDFs (the ITL lists would make the JSON huge)
_PER_REQUEST_KEYS = ("start_s", "success", "error", "prompt_tokens", "output_tokens",
                     "ttft_ms", "e2el_ms", "tpot_ms")

Specs = Sequence[RequestSpec] | Callable[[int], Sequence[RequestSpec]]
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def proxy_policy(name: str) -> tuple[str, bool]:
    """``"block*"`` -> ``("block", True)``: the proxy's policy and whether to send the hint."""
    if name.endswith(HINT_SUFFIX):
        return name[:-len(HINT_SUFFIX)], True
    return name, False


def parse_proxy_metrics(text: str) -> dict[str, Any]:
    """Mean prediction errors, decisions per instance, continuations, admission
    outcomes and the predicted prefix-cache hit rate (cached / dispatched prompt tokens)
    from the proxy's ``/metrics``.

    Means are ``_sum / _count`` of the absolute relative error histograms (None before any
    observation).
    """
    sums: dict[tuple[str, str], float] = {}
    decisions: dict[str, float] = {}
    continuations: dict[str, float] = {}
    admission: dict[str, float] = {}
    prompt = cached = 0.0
    for name, labels, value in promtext.samples(text):
        if name == "blockproxy_continuations_total":
            reason = labels.get("reason", "?")
            continuations[reason] = continuations.get(reason, 0) + value
        elif name == "blockproxy_admission_total":
            admission[labels.get("outcome", "?")] = value
        elif name == "blockproxy_slo_ttft_total":
            admission["slo_" + labels.get("outcome", "?")] = value
        elif name == "blockproxy_dispatched_prompt_tokens_total":
            prompt += value
        elif name == "blockproxy_predicted_cached_tokens_total":
            cached += value
        elif name == "blockproxy_decisions_total":
            instance = labels.get("instance", "?")
            decisions[instance] = decisions.get(instance, 0) + value
        elif name.startswith("blockproxy_prediction_abs_relative_error_"):
            key = (labels.get("quantity", "?"), name.rsplit("_", 1)[1])
            sums[key] = sums.get(key, 0.0) + value
        elif name.startswith("blockproxy_prediction_relative_error_"):
            key = ("bias_" + labels.get("quantity", "?"), name.rsplit("_", 1)[1])
            sums[key] = sums.get(key, 0.0) + value
        elif name.startswith("blockproxy_output_length_abs_relative_error_"):
            key = ("output_length", name.rsplit("_", 1)[1])
            sums[key] = sums.get(key, 0.0) + value
    errors: dict[str, float | None] = {}
    for quantity in ("ttft", "e2e", "output_length", "bias_ttft", "bias_e2e"):
        count = sums.get((quantity, "count"), 0.0)
        errors[quantity] = sums[(quantity, "sum")] / count if count else None
    return {"prediction_error": errors,
            "decisions": {k: int(v) for k, v in sorted(decisions.items())},
            "continuations": {k: int(v) for k, v in sorted(continuations.items())},
            # outcomes under a TTFT objective (--slo-ttft-ms): held, released, rejected...,
            # and slo_met / slo_missed of the streams served
            "admission": {k: int(v) for k, v in sorted(admission.items()) if v},
            "predicted_prefix_hit_rate": cached / prompt if prompt else None}


def parse_emulator_metrics(texts: Sequence[str]) -> dict[str, Any]:
    """How faithfully the emulated instances kept time (steps run, the mean wall ms a step
    ended past its deadline, pacing resets: a starved emulator process), the share of
    prompt tokens the instances found in their prefix caches (``vllm:prefix_cache_*``) and
    the prompt tokens they computed (``prefill_tokens``: those not found)."""
    totals = {"emulator:steps_total": 0.0, "emulator:step_lateness_seconds_total": 0.0,
              "emulator:resyncs_total": 0.0, "vllm:prefix_cache_queries_total": 0.0,
              "vllm:prefix_cache_hits_total": 0.0}
    for text in texts:
        for name, _, value in promtext.samples(text):
            if name in totals:
                totals[name] += value
    steps = totals["emulator:steps_total"]
    queries = totals["vllm:prefix_cache_queries_total"]
    return {"steps": int(steps), "resyncs": int(totals["emulator:resyncs_total"]),
            "mean_step_lateness_ms": (totals["emulator:step_lateness_seconds_total"]
                                      / steps * 1000.0 if steps else None),
            "prefix_hit_rate": (totals["vllm:prefix_cache_hits_total"] / queries
                                if queries else None),
            "prefill_tokens": int(queries - totals["vllm:prefix_cache_hits_total"])}


def parse_gossip_metrics(texts: Sequence[str], duration_s: float,
                         requests: int) -> dict[str, Any]:
    """Gossip bandwidth per proxy and propagation percentiles from the proxies' ``/metrics``."""
    out_bytes = in_bytes = 0.0
    datagrams = 0.0
    dropped = 0.0
    buckets: dict[float, float] = {}
    for text in texts:
        for name, labels, value in promtext.samples(text):
            if name == "blockproxy_gossip_bytes_total":
                if labels.get("direction") == "out":
                    out_bytes += value
                else:
                    in_bytes += value
            elif name == "blockproxy_gossip_datagrams_total" and labels.get("direction") == "out":
                datagrams += value
            elif name == "blockproxy_gossip_dropped_total":
                dropped += value
            elif name == "blockproxy_gossip_propagation_seconds_bucket":
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
    n = max(len(texts), 1)
    return {"bytes_out_per_proxy_per_s": out_bytes / n / duration_s if duration_s else None,
            "bytes_out_per_request": out_bytes / requests if requests else None,
            "datagrams_out": int(datagrams), "bytes_in": int(in_bytes),
            "dropped": int(dropped),
            "p50_propagation_ms": _bucket_quantile(buckets, 0.50),
            "p99_propagation_ms": _bucket_quantile(buckets, 0.99)}


def _bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Quantile (ms) of a cumulative Prometheus histogram, linear within a bucket."""
    bounds = sorted(buckets)
    if not bounds or not buckets[bounds[-1]]:
        return None
    target = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= target:
            if math.isinf(bound):
                return prev_bound * 1000
            frac = (target - prev_count) / (count - prev_count) if count > prev_count else 1
            return (prev_bound + frac * (bound - prev_bound)) * 1000
        prev_bound, prev_count = bound, count
    return None


def _compact(metrics: dict[str, Any]) -> dict[str, Any]:
    if "per_request" in metrics:
        metrics["per_request"] = [{k: row.get(k) for k in _PER_REQUEST_KEYS}
                                  for row in metrics["per_request"]]
    return metrics


class AutoscaleSampler:
    """Reads the proxies' ``/autoscale`` every ``interval`` seconds while a run lasts: the
    first one's active, draining and desired instances over time (nothing when it has no
    autoscaler) and what its decision saw (:attr:`signals`: arrival rate, waiting
    requests, instances needed); with several proxies, each one's desired count
    (:attr:`desired`: ``[t, first, second, ...]``), to see whether they agree."""

    def __init__(self, urls: Sequence[str], interval: float = 0.5) -> None:
        self.urls = [u + "/autoscale" for u in urls]
        self.interval = interval
        self.samples: list[list[float]] = []
        self.signals: list[list[float]] = []
        self.desired: list[list[float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        start = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while True:
                everyone = []
                for url in self.urls:
                    try:
                        async with session.get(url) as resp:
                            body = await resp.json()
                    except (aiohttp.ClientError, ValueError):
                        body = {}
                    everyone.append(body.get("models") or {})
                now = time.monotonic() - start
                models = everyone[0]
                if models:
                    active = sum(len(m["active"]) for m in models.values())
                    draining = sum(len(m["draining"]) for m in models.values())
                    desired = sum(m["desired"] for m in models.values())
                    self.samples.append([now, active, draining, desired])
                    self.signals.append([now, *(sum(float(m.get(key) or 0) for m in
                                                   models.values()) for key in
                                               ("arrival_rate_per_s", "waiting", "needed"))])
                if len(everyone) > 1 and all(everyone):
                    self.desired.append([now, *(sum(m["desired"] for m in ms.values())
                                                for ms in everyone)])
                await asyncio.sleep(self.interval)

    async def stop(self) -> list[list[float]]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.samples


def summarize_timeline(samples: Sequence[Sequence[float]], time_scale: float,
                       signals: Sequence[Sequence[float]] = (),
                       desired: Sequence[Sequence[float]] = ()) -> dict[str, Any]:
    """Instance-seconds (active + draining, integrated over the run) and the timeline, in
    real-GPU seconds (wall / time scale); with ``signals``, what the decisions saw
    (``[t, arrival rate per real-GPU second, waiting, needed]``); with ``desired`` (several
    proxies' desired counts over time), how far apart they were."""
    seconds = 0.0
    for (t0, a0, d0, _), (t1, _, _, _) in zip(samples, samples[1:]):
        seconds += (t1 - t0) * (a0 + d0)
    timeline = [[round(t / time_scale, 3), int(a), int(d), int(w)] for t, a, d, w in samples]
    out: dict[str, Any] = {
        "instance_seconds": seconds / time_scale,
        "mean_instances": seconds / (samples[-1][0] - samples[0][0])
        if len(samples) > 1 and samples[-1][0] > samples[0][0] else None,
        "max_active": max((int(s[1]) for s in samples), default=0),
        "timeline": timeline,
        "signals": [[round(t / time_scale, 3), round(r * time_scale, 2), int(w), int(n)]
                    for t, r, w, n in signals]}
    if desired:
        spread = [max(d[1:]) - min(d[1:]) for d in desired]
        out["proxies_desired"] = {
            "samples": len(desired), "agree_share": spread.count(0) / len(spread),
            "within_one_share": sum(1 for x in spread if x <= 1) / len(spread),
            "max_spread": max(spread),
            "timeline": [[round(d[0] / time_scale, 3), *map(int, d[1:])] for d in desired]}
    return out


class Lab:
    """How to build one fresh cluster + proxy, and run a benchmark through them."""

    def __init__(self, *, instances: int, profile: str | Sequence[str],
                 time_scale: float = 1.0, speed_factors: Sequence[float] | None = None,
                 emulator_args: Sequence[str] = (), proxy_args: Sequence[str] = (),
                 proxies: int = 1, gossip: bool = True, peer_args: Sequence[str] = (),
                 kv_events: bool = False, hide_profiles: bool = False,
                 standby: int = 0, log: Log = _stderr,
                 log_dir: str | Path | None = None) -> None:
        if not 0 <= standby < instances:
            raise ValueError(f"--standby must be in [0, {instances - 1}], got {standby}")
        self.instances, self.time_scale = instances, time_scale
        #: the last ``standby`` instances start as standby in the proxy's backends file
        self.standby = standby
        self.profiles = instance_profiles(profile, instances)
        self.hide_profiles = hide_profiles
        self.kv_events = kv_events
        self.proxies, self.gossip = proxies, gossip
        self.speed_factors = speed_factors
        self.emulator_args, self.proxy_args = list(emulator_args), list(proxy_args)
        self.peer_args = list(peer_args)
        self.log = log
        #: where each run's process logs are kept (a folder per run), if anywhere
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._runs = 0

    def _proxy_args(self) -> list[str]:
        # The proxy is told the emulator's time scale (``--speed``), as an operator knows
        # its GPU; calibration only refines it.  An explicit --proxy-arg=--speed wins.
        if any(a.split("=")[0] == "--speed" for a in self.proxy_args):
            return self.proxy_args
        return ["--speed", repr(self.time_scale), *self.proxy_args]

    async def run(self, policy: str, specs: Sequence[RequestSpec], seed: int,
                  run_kwargs: dict[str, Any], detail: bool) -> dict[str, Any]:
        """One benchmark of ``policy`` (a router spec: a blockproxy policy or
        ``PEER:POLICY``) on a fresh cluster and router; both stopped after."""
        peer, name = parse_router(policy)
        hint = False
        if peer is None:
            name, hint = proxy_policy(policy)
        elif self.proxies > 1:
            raise ValueError(f"--proxies {self.proxies} runs blockproxy only, not {policy}")
        run_dir = Path(tempfile.mkdtemp(prefix="loadgen-run-"))
        truth = run_dir / "truth.json"  # written by run_benchmark before its first send
        self._runs += 1
        logs = None if self.log_dir is None else self.log_dir / "{:03d}-seed{}-{}".format(
            self._runs, seed, "".join(c if c.isalnum() or c in "-_." else "_"
                                      for c in policy))
        cluster = EmulatedCluster(self.instances, profile=self.profiles,
                                  time_scale=self.time_scale, speed_factors=self.speed_factors,
                                  seed=seed, extra_args=[*self.emulator_args,
                                                         "--truth", str(truth)],
                                  kv_events=self.kv_events and peer is None,
                                  hide_profiles=self.hide_profiles, log_dir=logs)
        async with cluster, contextlib.AsyncExitStack() as stack:
            stack.callback(shutil.rmtree, run_dir, True)
            procs: list[ProxyProcess | PeerProcess]
            if peer is None:
                # One GPU type: the proxy's --profile too; several: the backends file
                # names each; hidden: neither (the proxy's default profile, calibrated).
                single = len(set(self.profiles)) == 1 and not self.hide_profiles
                entries = cluster.backend_entries()
                for entry in entries[len(entries) - self.standby:] if self.standby else []:
                    entry["state"] = "standby"
                procs = [ProxyProcess(entries, name, args,
                                      profile=self.profiles[0] if single else None,
                                      log_dir=logs)
                         for args in self._all_proxy_args(run_dir)]
            else:
                procs = [PeerProcess(peer, name, cluster.urls, logs or run_dir,
                                     self.peer_args)]
            for proc in procs:
                await stack.enter_async_context(proc)
            router = procs[0].version if isinstance(procs[0], PeerProcess) else \
                f"blockproxy {__version__} {name}"
            if len(procs) == 1:
                self.log(f"  {policy}: emulator pids {cluster.pids}, proxy pid "
                         f"{procs[0].pids[0]} at {procs[0].url}")
            else:
                self.log(f"  {policy}: emulator pids {cluster.pids}, proxy pids "
                         f"{[p.pids[0] for p in procs]} at {[p.url for p in procs]}")
            kwargs = {**run_kwargs, "hint": hint or run_kwargs.get("hint", False),
                      "time_scale": self.time_scale, "seed": seed, "truth": str(truth)}
            targets = [p.url for p in procs]
            sampler = AutoscaleSampler([p.url for p in procs]) if peer is None else None
            if sampler is not None:
                sampler.start()
            try:
                metrics = await run_benchmark(targets[0] if len(targets) == 1 else targets,
                                              specs, detail=detail, **kwargs)
            finally:
                timeline = await sampler.stop() if sampler is not None else None
                signals = sampler.signals if sampler is not None else []
                desired = sampler.desired if sampler is not None else []
            texts = await get_texts([p.url + "/metrics" for p in procs]) if peer is None \
                else []
            emulator = parse_emulator_metrics(
                await get_texts([url + "/metrics" for url in cluster.urls]))
        scraped = parse_proxy_metrics("\n".join(texts))
        scraped["emulator"] = emulator
        if timeline:
            scraped["autoscale"] = summarize_timeline(timeline, self.time_scale, signals,
                                                      desired)
        self.log(f"  emulator fidelity: {emulator}")
        if self.proxies > 1 and self.gossip:
            scraped["gossip"] = parse_gossip_metrics(texts, metrics["duration"],
                                                     metrics["completed"])
            self.log(f"  gossip: {scraped['gossip']}")
        return {"policy": name, "hint": kwargs["hint"], "metrics": _compact(metrics),
                "proxy": scraped, "proxies": self.proxies,
                "gossip": self.proxies > 1 and self.gossip,
                "router": router}

    def _all_proxy_args(self, key_dir: Path) -> list[list[str]]:
        """Arguments of each proxy: with gossip between them when there are several."""
        base = self._proxy_args()
        if self.proxies == 1 or not self.gossip:
            return [base] * self.proxies
        key_file = key_dir / "gossip.key"
        key_file.write_bytes(os.urandom(32).hex().encode())
        ports = free_udp_ports(self.proxies)
        out = []
        for port in ports:
            seeds = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
            out.append([*base, "--gossip-bind", f"127.0.0.1:{port}", "--gossip-seeds", seeds,
                        "--gossip-key-file", str(key_file)])
        return out


async def _capacity(lab: Lab, policy: str, specs: Sequence[RequestSpec], seed: int,
                    run_kwargs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    knob = "rate_multiplier" if run_kwargs.get("use_trace_arrivals") else "request_rate"
    check = slo_check(cfg.get("slo_ttft_p99_ms"), cfg.get("min_goodput_ratio"),
                      cfg.get("max_failed", 0))

    def meets(metrics: dict) -> bool:
        # The SLO is in real-GPU time.
        return check(real_view(metrics))

    async def run_once(value: float) -> dict:
        entry = await lab.run(policy, specs, seed, {**run_kwargs, **cfg.get("probe", {}),
                                                    knob: value}, detail=False)
        metrics = entry["metrics"]
        lab.log(f"  {policy} capacity probe {knob}={value:.4g}: p99 TTFT "
                f"{real_view(metrics)['p99_ttft_ms']:.0f} ms, failed "
                f"{metrics['failed']}, cut {metrics.get('cut', 0)} -> "
                f"{'pass' if meets(metrics) else 'FAIL'}"
                + (f" (aborted: {metrics['aborted']})" if metrics.get("aborted") else ""))
        return metrics

    result = await find_capacity(run_once, cfg["lo"], cfg["hi"], cfg["iterations"], meets)
    result.update({"knob": knob, **{k: cfg.get(k) for k in (
        "slo_ttft_p99_ms", "min_goodput_ratio", "max_failed")}})
    return result


async def compare_policies(policies: Sequence[str], specs: Sequence[RequestSpec], *,
                           instances: int, profile: str | Sequence[str],
                           time_scale: float = 1.0, hide_profiles: bool = False,
                           speed_factors: Sequence[float] | None = None,
                           emulator_args: Sequence[str] = (), proxy_args: Sequence[str] = (),
                           seed: int = 0, capacity: dict[str, Any] | None = None,
                           proxies: int = 1, gossip: bool = True,
                           peer_args: Sequence[str] = (), kv_events: bool = False,
                           standby: int = 0, log: Log = _stderr,
                           log_dir: str | Path | None = None,
                           **run_kwargs: Any) -> dict[str, Any]:
    """Run every policy on a fresh cluster + proxy with the same specs and seed.

    ``run_kwargs`` go to :func:`run_benchmark` (``rate_multiplier``, ``request_rate``,
    ``use_trace_arrivals``, ``hint``, ``goodput``, ``percentiles``, ...).  ``capacity``
    (``lo``, ``hi``, ``iterations``, ``slo_ttft_p99_ms``, optional ``min_goodput_ratio``,
    ``max_failed``) adds a capacity search per policy.  Returns ``{"seed", "policies":
    {name: {"policy", "hint", "metrics" (with per_request), "proxy": {"prediction_error",
    "decisions"}, ["capacity"]}}}``.
    """
    lab = Lab(instances=instances, profile=profile, time_scale=time_scale,
              speed_factors=speed_factors, emulator_args=emulator_args,
              proxy_args=proxy_args, proxies=proxies, gossip=gossip, peer_args=peer_args,
              kv_events=kv_events, hide_profiles=hide_profiles, standby=standby, log=log,
              log_dir=log_dir)
    results: dict[str, Any] = {}
    for policy in policies:
        log(f"[seed {seed}] {policy}")
        entry = await lab.run(policy, specs, seed, run_kwargs, detail=True)
        m = real_view(entry["metrics"])
        errors = [r["error"] for r in m.get("per_request", [])
                  if not r["success"] and not r.get("cut")]
        log(f"  {policy}: completed {m['completed']}, failed {m['failed']}, "
            f"p99 TTFT {m['p99_ttft_ms']:.0f} ms"
            + (f"; first error: {errors[0][:300]}" if errors else ""))
        if capacity:
            entry["capacity"] = await _capacity(lab, policy, specs, seed, run_kwargs, capacity)
        results[policy] = entry
    return {"seed": seed, "policies": results, "prefix_reuse_ceiling": prefix_reuse(specs)}


async def compare_seeds(policies: Sequence[str], specs: Specs, seeds: Sequence[int],
                        **kwargs: Any) -> dict[str, Any]:
    """:func:`compare_policies` once per seed (``specs`` may be a function of the seed),
    with a :func:`summarize` block; the layout ``loadgen report`` reads."""
    runs = []
    for seed in seeds:
        seed_specs = specs(seed) if callable(specs) else specs
        runs.append(await compare_policies(policies, seed_specs, seed=seed, **kwargs))
    return {"kind": report.COMPARE_KIND, "policies": list(policies), "seeds": list(seeds),
            "time_scale": kwargs.get("time_scale", 1.0), "runs": runs,
            "summary": summarize(runs)}


# --------------------------------------------------------------------------- CLI


def _csv(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [convert(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad list: {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``loadgen compare`` (the workload flags are ``loadgen run``'s)."""
    add_workload_arguments(parser)
    # The target is the proxy this command starts, so --target is not a flag here.
    for action in parser._actions:
        if action.dest == "target":
            action.required, action.help, action.default = False, argparse.SUPPRESS, None
    parser.add_argument("--policies", type=_csv(str), default=["block", "round_robin"],
                        help="comma-separated routers: a blockproxy policy ('block*' = block "
                             "with the true output length as the proxy's hint) or a peer as "
                             "PEER:POLICY (sglang:cache_aware, vllm-router:round_robin, "
                             "nginx:least_conn, ...; see loadgen.peers)")
    parser.add_argument("--instances", type=int, default=2, help="emulated instances")
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1",
                        help="profile of the emulated instances, named in the backends file: "
                             "one for all, or one per instance, comma-separated, NAME*COUNT "
                             "repeating (llama-3.1-8b-h100-tp1*4,llama-3.1-8b-a100-80gb-tp1*4)")
    parser.add_argument("--hide-profiles", action="store_true",
                        help="the backends file names no profile: the proxy starts from its "
                             "default profile and has only its calibration to go on")
    parser.add_argument("--speed-factors", type=_csv(float),
                        help="emulator step-time multiplier per instance (hidden from proxy)")
    parser.add_argument("--seeds", type=_csv(int),
                        help="repeat the comparison per seed (default: --seed)")
    parser.add_argument("--proxy-arg", action="append", default=[], metavar="ARG",
                        help="passed to blockproxy serve, e.g. --proxy-arg=--tie-tolerance=0.02 "
                             "(repeatable)")
    parser.add_argument("--emulator-arg", action="append", default=[], metavar="ARG",
                        help="passed to loadgen emulate, e.g. --emulator-arg=--max-num-seqs=64 "
                             "(repeatable)")
    parser.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                        help="passed to every peer router, e.g. --peer-arg=--max-tree-size "
                             "--peer-arg=1000000 (repeatable)")
    parser.add_argument("--proxies", type=int, default=1,
                        help="proxies in front of the cluster, gossiping over UDP; requests go "
                             "round-robin across them")
    parser.add_argument("--no-gossip", action="store_true",
                        help="with --proxies N: no gossip, each proxy blind to the others")
    parser.add_argument("--standby", type=int, default=0, metavar="K",
                        help="the last K instances are standby in the proxy's backends file "
                             "(for --proxy-arg=--autoscale=act); every run then reports the "
                             "active instances over time and the instance-seconds used")
    parser.add_argument("--kv-events", action="store_true",
                        help="the emulators publish KV events and the proxies follow them, "
                             "with the emulator's tokenizer (exact mode); peers are not told")
    parser.add_argument("--capacity", action="store_true",
                        help="also search each policy's capacity (fresh cluster per probe)")
    add_search_arguments(parser, rate_lo=1.0, iterations=5)
    parser.add_argument("--json", metavar="OUT", help="write every result here (for "
                                                      "loadgen report)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="keep every run's process logs here, a folder per run "
                             "(NNN-seedS-POLICY: the emulators', the proxy's or the peer's); "
                             "by default they go with the run's temporary folder")
    parser.add_argument("--plot", metavar="OUT.png", help="draw CDFs and bars here")


def _config(args: argparse.Namespace, kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("trace", "format", "start", "duration", "num_requests", "clip_context",
            "instances", "profile", "hide_profiles", "speed_factors", "proxy_arg",
            "emulator_arg", "proxies", "no_gossip", "kv_events", "standby")
    cfg = {k: getattr(args, k) for k in keys}
    cfg.update({k: v for k, v in kwargs.items() if k != "progress"})
    cfg["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return cfg


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validate flags; returns (run_benchmark kwargs, capacity config or None)."""
    if args.instances < 1:
        raise ValueError("--instances must be at least 1")
    instance_profiles(args.profile, args.instances)  # fail early on a bad list
    if args.proxies < 1:
        raise ValueError("--proxies must be at least 1")
    if not args.use_trace_timestamps and math.isinf(args.request_rate) \
            and timestamped(args):
        args.use_trace_timestamps = True  # default for traces with their own times
    if args.proxies > 1 and any(parse_router(p)[0] for p in args.policies):
        raise ValueError("--proxies runs several blockproxy processes; peers run alone")
    for policy in args.policies:  # fail early on an unknown or missing router
        peer, _ = parse_router(policy)
        if peer is not None:
            peer.executable()
    specs_from_args(args)  # fail early on an empty or unreadable workload
    kwargs = benchmark_kwargs(args)
    if 99.0 not in kwargs["percentiles"]:
        kwargs["percentiles"] = [*kwargs["percentiles"], 99.0]  # the table needs p99
    for key in ("time_scale", "seed"):
        kwargs.pop(key)
    kwargs["progress"] = False  # per-policy lines on stderr instead of a bar
    capacity = None
    if args.capacity:
        if not 0 < args.rate_lo <= args.rate_hi or args.iterations < 1:
            raise ValueError("need 0 < --rate-lo <= --rate-hi and --iterations >= 1")
        if args.min_goodput_ratio is not None and not kwargs["goodput"]:
            raise ValueError("--min-goodput-ratio needs --goodput")
        capacity = {"lo": args.rate_lo, "hi": args.rate_hi, "iterations": args.iterations,
                    "slo_ttft_p99_ms": args.slo_ttft_p99_ms,
                    "min_goodput_ratio": args.min_goodput_ratio, "max_failed": args.max_failed,
                    "probe": probe_kwargs(args)}
    return kwargs, capacity


async def _main(args: argparse.Namespace, kwargs: dict[str, Any],
                capacity: dict[str, Any] | None) -> dict[str, Any]:
    # SIGTERM cancels the run like Ctrl-C does, so every ``finally`` stops its processes.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    def specs_for(seed: int) -> Sequence[RequestSpec]:
        args.seed = seed  # synthetic lengths and rate-cut slices depend on the seed
        return specs_from_args(args)

    result = await compare_seeds(
        args.policies, specs_for, args.seeds or [args.seed], instances=args.instances,
        profile=args.profile, time_scale=args.time_scale, speed_factors=args.speed_factors,
        emulator_args=args.emulator_arg, proxy_args=args.proxy_arg, capacity=capacity,
        proxies=args.proxies, gossip=not args.no_gossip, peer_args=args.peer_arg,
        kv_events=args.kv_events, hide_profiles=args.hide_profiles, standby=args.standby,
        log_dir=args.log_dir, **kwargs)
    result["config"] = _config(args, kwargs)
    return result


def run(args: argparse.Namespace) -> int:
    """``loadgen compare``: the table on stdout, JSON to ``--json``, PNG to ``--plot``."""
    try:
        kwargs, capacity = _prepare(args)
    except (ValueError, FileNotFoundError, PeerMissing) as exc:
        print(f"loadgen compare: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_main(args, kwargs, capacity))
    except KeyboardInterrupt:
        print("loadgen compare: interrupted; every process it started is stopped",
              file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("loadgen compare: terminated; every process it started is stopped",
              file=sys.stderr)
        return 143
    print(report.format_compare(result))
    if args.json:
        write_json(args.json, result)
    if args.plot:
        report.plot_results([result], args.plot)
    ok = all(entry["metrics"]["completed"] > 0
             for run_ in result["runs"] for entry in run_["policies"].values())
    return 0 if ok else 1
