"""loadgen compare and loadgen.cluster: real runs on loopback, cleanup on SIGINT/SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from loadgen import compare
from loadgen.cluster import (
    EmulatedCluster,
    ProxyProcess,
    engine_limits_from_args,
    instance_profiles,
)
from loadgen.compare import parse_proxy_metrics, proxy_policy, summarize

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "llama-3.1-8b-h100-tp1"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: it has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry.name))
    return out


def _compare(*args: str) -> list[str]:
    return [sys.executable, "-m", "loadgen.cli", "compare", "--trace", "azure-conv",
            "--instances", "2", "--profile", PROFILE, "--emulator-arg=--stall-prob=0", *args]


# --------------------------------------------------------------------------- units


def test_autoscale_timeline_is_integrated_in_real_seconds() -> None:
    samples = [[0.0, 6, 0, 6], [4.0, 6, 0, 7], [8.0, 7, 1, 7], [12.0, 7, 0, 7]]
    signals = [[0.0, 2.5, 3, 6], [4.0, 5.0, 0, 5]]
    out = compare.summarize_timeline(samples, time_scale=4.0, signals=signals)
    # 4 s at 6, 4 s at 6, 4 s at 8 (wall) = 80 instance-seconds wall, 20 real
    assert out["instance_seconds"] == pytest.approx(20.0)
    assert out["mean_instances"] == pytest.approx(80 / 12)
    assert out["max_active"] == 7
    assert out["timeline"][2] == [2.0, 7, 1, 7]
    # the rate in requests per real-GPU second
    assert out["signals"] == [[0.0, 10.0, 3, 6], [1.0, 20.0, 0, 5]]
    assert "proxies_desired" not in out
    # two proxies' desired counts: equal, one apart, two apart
    both = [[0.0, 6, 6], [4.0, 7, 6], [8.0, 9, 7]]
    agree = compare.summarize_timeline(samples, 4.0, desired=both)["proxies_desired"]
    assert agree["samples"] == 3 and agree["max_spread"] == 2
    assert agree["agree_share"] == pytest.approx(1 / 3)
    assert agree["within_one_share"] == pytest.approx(2 / 3)
    assert agree["timeline"][1] == [1.0, 7, 6]


def test_proxy_policy_names_the_hinted_variant():
    assert proxy_policy("block*") == ("block", True)
    assert proxy_policy("round_robin") == ("round_robin", False)


def test_parse_proxy_metrics_means_and_decisions():
    text = "\n".join([
        "# HELP blockproxy_decisions_total Routing decisions",
        'blockproxy_decisions_total{instance="i0",policy="block"} 3.0',
        'blockproxy_decisions_total{instance="i1",policy="block"} 5.0',
        'blockproxy_prediction_abs_relative_error_bucket{le="0.1",quantity="ttft"} 1.0',
        'blockproxy_prediction_abs_relative_error_sum{quantity="ttft"} 2.0',
        'blockproxy_prediction_abs_relative_error_count{quantity="ttft"} 8.0',
        'blockproxy_prediction_abs_relative_error_sum{quantity="e2e"} 0.0',
        'blockproxy_prediction_abs_relative_error_count{quantity="e2e"} 0.0',
        'blockproxy_prediction_relative_error_sum{quantity="ttft"} -1.0',
        'blockproxy_prediction_relative_error_count{quantity="ttft"} 8.0',
        "blockproxy_output_length_abs_relative_error_sum 4.0",
        "blockproxy_output_length_abs_relative_error_count 8.0",
        "blockproxy_dispatched_prompt_tokens_total 4000.0",
        "blockproxy_predicted_cached_tokens_total 1000.0",
        'blockproxy_continuations_total{instance="i0",reason="slice"} 4.0',
        'blockproxy_continuations_total{instance="i1",reason="slice"} 2.0',
        'blockproxy_continuations_total{instance="i1",reason="failure"} 1.0',
        'blockproxy_admission_total{outcome="held"} 5.0',
        'blockproxy_admission_total{outcome="cancelled"} 0.0',
        'blockproxy_slo_ttft_total{outcome="met"} 7.0',
    ])
    parsed = parse_proxy_metrics(text)
    assert parsed["decisions"] == {"i0": 3, "i1": 5}
    assert parsed["continuations"] == {"failure": 1, "slice": 6}
    assert parsed["admission"] == {"held": 5, "slo_met": 7}
    assert parsed["prediction_error"] == {"ttft": 0.25, "e2e": None, "output_length": 0.5,
                                          "bias_ttft": -0.125, "bias_e2e": None}
    assert parsed["predicted_prefix_hit_rate"] == 0.25
    assert parse_proxy_metrics("")["predicted_prefix_hit_rate"] is None


def test_engine_limits_from_emulator_args_reach_the_backends_file():
    args = ["--max-num-seqs=64", "--stall-prob", "0", "--num-gpu-blocks", "1000"]
    assert engine_limits_from_args(args) == {"max_num_seqs": 64, "num_gpu_blocks": 1000}
    with pytest.raises(ValueError):
        engine_limits_from_args(["--block-size=x"])


def test_instance_profiles_one_for_all_a_list_or_repeated_names():
    assert instance_profiles("a", 3) == ["a", "a", "a"]
    assert instance_profiles("a*2,b", 3) == ["a", "a", "b"]
    assert instance_profiles(["x", "y"], 2) == ["x", "y"]
    for bad in ("a*2", "a*x,b", "a*0,b,c", ",a"):
        with pytest.raises(ValueError):
            instance_profiles(bad, 3)


def test_a_mixed_fleet_runs_one_emulator_per_gpu_type_and_can_hide_its_profiles():
    cluster = EmulatedCluster(5, profile="h*2,a*3", instances_per_process=2)
    assert cluster._groups() == [(0, 2), (2, 2), (4, 1)]  # a process never mixes types
    cluster.urls = [f"http://127.0.0.1:{9000 + i}" for i in range(5)]
    assert [e["profile"] for e in cluster.backend_entries()] == ["h", "h", "a", "a", "a"]
    hidden = EmulatedCluster(2, profile="h,a", hide_profiles=True)
    hidden.urls = cluster.urls[:2]
    assert all("profile" not in e for e in hidden.backend_entries())


def test_parse_emulator_metrics_sums_instances():
    page = ('emulator:steps_total{engine="0",model_name="m"} 100\n'
            'emulator:step_lateness_seconds_total{engine="0",model_name="m"} 0.05\n'
            'emulator:resyncs_total{engine="0",model_name="m"} 1\n'
            'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000\n'
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250\n')
    out = compare.parse_emulator_metrics([page, page.replace("100", "300")])
    # queries 1000 + 3000, hits 250 + 250
    assert out == {"steps": 400, "resyncs": 2, "mean_step_lateness_ms": pytest.approx(0.25),
                   "prefix_hit_rate": pytest.approx(500 / 4000), "prefill_tokens": 3500}
    empty = compare.parse_emulator_metrics([""])
    assert empty["mean_step_lateness_ms"] is None and empty["prefix_hit_rate"] is None


def test_summarize_takes_medians_across_seeds():
    def run(seed: int, p99: float) -> dict:
        metrics = {"completed": 10, "failed": 0, "p99_ttft_ms": p99, "p99_e2el_ms": 1.0}
        return {"seed": seed, "policies": {"block": {"metrics": metrics}}}

    summary = summarize([run(1, 10.0), run(2, 30.0), run(3, 20.0)])
    assert summary["block"]["median"]["p99_ttft_ms"] == 20.0
    assert summary["block"]["per_seed"]["2"]["p99_ttft_ms"] == 30.0
    assert summary["block"]["median"]["capacity"] is None


# --------------------------------------------------------------------------- processes


async def test_cluster_over_several_processes_and_proxy_stop_by_pid():
    cluster = EmulatedCluster(3, profile=PROFILE, time_scale=0.5, instances_per_process=2,
                              extra_args=["--max-num-seqs=32"])
    async with cluster:
        assert len(cluster.pids) == 2 and len(cluster.urls) == 3
        ports = [int(u.rsplit(":", 1)[1]) for u in cluster.urls]
        assert ports == list(range(ports[0], ports[0] + 3))
        assert cluster.backend_entries()[2]["max_num_seqs"] == 32
        async with ProxyProcess(cluster.backend_entries(), "least_requests",
                                profile=PROFILE) as proxy:
            assert "blockproxy_decisions_total" in await proxy.get_text("/metrics")
            pids = [*cluster.pids, *proxy.pids]
            assert all(_alive(p) for p in pids)
    assert not any(_alive(p) for p in pids)


async def test_mixed_fleet_instances_run_at_their_own_profile_speed():
    profiles = ["llama-3.1-8b-h100-tp1", "llama-3.1-8b-a100-80gb-tp1"]
    async with EmulatedCluster(2, profile=profiles, extra_args=["--stall-prob=0"]) as cluster:
        assert [c.args[c.args.index("--profile") + 1] for c in cluster.children] == profiles
        async with ProxyProcess(cluster.backend_entries(), "round_robin") as proxy:
            async with aiohttp.ClientSession() as session:
                times = []
                for _ in range(2):  # round robin: one on each
                    t0 = time.perf_counter()
                    async with session.post(proxy.url + "/v1/completions", json={
                            "model": "tiny", "prompt": "hello " * 50, "max_tokens": 40,
                            "ignore_eos": True}) as resp:
                        assert resp.status == 200, await resp.text()
                        await resp.read()
                    times.append(time.perf_counter() - t0)
    # 40 decode steps: H100 ~ 40 x 5.8 ms, A100 ~ 40 x 16.6 ms (2.8x)
    assert max(times) / min(times) > 2.0, times


async def test_proxy_with_bad_flags_fails_fast_and_leaves_nothing():
    proxy = ProxyProcess(["http://127.0.0.1:9"], "no_such_policy")
    with pytest.raises(RuntimeError):
        await proxy.start()
    assert proxy.children == []


def test_compare_run_writes_json_table_and_plot(tmp_path: Path):
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    proc = subprocess.run(
        _compare("--policies", "block,round_robin", "--num-requests", "30",
                 "--rate-multiplier", "8", "--time-scale", "0.5", "--goodput", "ttft:500",
                 "--json", str(out), "--plot", str(png), "--log-dir", str(tmp_path / "logs"),
                 "--proxy-arg=--log-level=debug"),
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "real-GPU times" in proc.stdout and "p99_ttft vs rr" in proc.stdout
    result = json.loads(out.read_text())
    assert result["kind"] == "loadgen-compare" and result["policies"] == ["block",
                                                                         "round_robin"]
    (run,) = result["runs"]
    for policy, entry in run["policies"].items():
        metrics = entry["metrics"]
        assert metrics["completed"] == 30 and metrics["failed"] == 0, policy
        assert len(metrics["per_request"]) == 30
        assert "unscaled" in metrics and "request_goodput" in metrics
        assert sum(entry["proxy"]["decisions"].values()) == 30
        fidelity = entry["proxy"]["emulator"]  # scraped from the emulated instances
        assert fidelity["steps"] > 0 and fidelity["mean_step_lateness_ms"] >= 0
    assert run["policies"]["round_robin"]["proxy"]["decisions"] == {"i0": 15, "i1": 15}
    assert run["policies"]["block"]["proxy"]["prediction_error"]["ttft"] is not None
    assert result["summary"]["round_robin"]["median"]["completed"] == 30
    assert png.stat().st_size > 10_000
    # --log-dir kept each run's logs: the proxy's debug lines are what
    # scripts/replay_served.py reads
    runs = sorted(d.name for d in (tmp_path / "logs").iterdir())
    assert [r.split("-", 2)[::2] for r in runs] == [["001", "block"], ["002", "round_robin"]]
    for folder in runs:
        names = sorted(f.name for f in (tmp_path / "logs" / folder).iterdir())
        assert any(n.startswith("emulator-") for n in names), names
        (proxy_log,) = (tmp_path / "logs" / folder).glob("proxy-*.log")
        spec = importlib.util.spec_from_file_location("replay_served",
                                                      ROOT / "scripts" / "replay_served.py")
        assert spec is not None and spec.loader is not None
        replay_served = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(replay_served)
        served = replay_served.read_log(proxy_log.read_text().splitlines())
        assert len(served) == 30 and {s.instance for s in served} == {"i0", "i1"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_interrupted_compare_stops_every_process_it_started(tmp_path: Path, sig: int):
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        # Slow enough (trace pace, many requests) to still be running when signalled.
        proc = subprocess.Popen(
            _compare("--policies", "round_robin,block", "--num-requests", "400",
                     "--json", str(tmp_path / "never.json")),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True,
            # as from a terminal: a shell's background job (CI under nohup ... &) would
            # hand SIGINT down ignored, and Python then never raises KeyboardInterrupt
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while "proxy pid" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "compare never started its proxy"
            time.sleep(0.05)
        match = re.search(r"emulator pids \[([\d, ]+)\], proxy pid (\d+)", log.read_text())
        assert match
        printed = {int(p) for p in match.group(1).split(",")} | {int(match.group(2))}
        children = _children(proc.pid)
        assert printed <= children
        time.sleep(0.5)  # let requests be in flight
        proc.send_signal(sig)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("compare still running 30 s after the signal; its log:\n"
                        + log.read_text()[-4000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == (130 if sig == signal.SIGINT else 143), log.read_text()
    assert "every process it started is stopped" in log.read_text()
    assert not any(_alive(p) for p in children)
    assert not (tmp_path / "never.json").exists()
