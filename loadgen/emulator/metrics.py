"""vLLM-named Prometheus metrics of one emulated instance, rendered as text.

Hand-written rather than prometheus_client because histograms are observed once per
generated token on the engine's hot path, where a bisect into a list is cheapest.  Gauges
and counters are read from the scheduler at scrape time, so they are always live.
Latencies are wall-clock seconds as a client sees them (so they shrink with time-scale).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadgen.emulator.engine import Engine
    from loadgen.emulator.scheduler import EngineRequest

# Bucket bounds as vLLM's V1 metrics.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class Histogram:
    """A Prometheus histogram with fixed buckets."""

    __slots__ = ("buckets", "count", "counts", "help", "name", "sum")

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, labels: str, out: list[str]) -> None:
        """Append the ``_bucket``/``_sum``/``_count`` lines (``labels`` without braces)."""
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        cumulative += self.counts[-1]
        out.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {cumulative}')
        out.append(f"{self.name}_sum{{{labels}}} {self.sum!r}")
        out.append(f"{self.name}_count{{{labels}}} {self.count}")


class InstanceMetrics:
    """Histograms and finish counters of one instance; everything else is read live."""

    def __init__(self, model_name: str) -> None:
        self.labels = f'engine="0",model_name="{model_name}"'
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.", E2E_BUCKETS)
        self.finished = dict.fromkeys(FINISH_REASONS, 0)

    def on_finished(self, req: EngineRequest, now: float) -> None:
        """Count a request that generated its last token."""
        self.e2e.observe(now - req.arrival_time)
        self.finished[req.finish_reason_if_done] += 1

    def render(self, engine: Engine) -> str:
        """The ``/metrics`` page."""
        sched = engine.scheduler
        labels = self.labels
        out: list[str] = []

        def sample(name: str, kind: str, help_text: str, value: float) -> None:
            base = name[:-6] if kind == "counter" and name.endswith("_total") else name
            out.append(f"# HELP {base} {help_text}")
            out.append(f"# TYPE {base} {kind}")
            out.append(f"{name}{{{labels}}} {value}")

        limits = engine.limits
        # vLLM's CacheConfig as an info gauge (its labels are the config's fields; vLLM's
        # carries no model_name), which `blockproxy profile` reads the KV cache size from.
        out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
        out.append("# TYPE vllm:cache_config_info gauge")
        out.append(f'vllm:cache_config_info{{block_size="{limits.block_size}",'
                   f'cache_dtype="auto",enable_prefix_caching="True",engine="0",'
                   f'num_gpu_blocks="{limits.num_gpu_blocks}"}} 1.0')
        sample("vllm:num_requests_running", "gauge",
               "Number of requests in model execution batches.", len(sched.running))
        sample("vllm:num_requests_waiting", "gauge",
               "Number of requests waiting to be processed.", len(sched.waiting))
        sample("vllm:kv_cache_usage_perc", "gauge",
               "KV-cache usage. 1 means 100 percent usage.", sched.kv.usage())
        sample("vllm:num_preemptions_total", "counter",
               "Cumulative number of preemption from the engine.", sched.num_preemptions)
        sample("vllm:prompt_tokens_total", "counter",
               "Number of prefill tokens processed.", sched.prompt_tokens)
        sample("vllm:generation_tokens_total", "counter",
               "Number of generation tokens processed.", sched.generation_tokens)
        sample("vllm:prefix_cache_queries_total", "counter",
               "Prefix cache queries, in terms of number of queried tokens.",
               sched.prefix_queries)
        sample("vllm:prefix_cache_hits_total", "counter",
               "Prefix cache hits, in terms of number of cached tokens.", sched.prefix_hits)
        out.append("# HELP vllm:request_success Count of successfully processed requests.")
        out.append("# TYPE vllm:request_success counter")
        finished = dict(self.finished, abort=sched.num_aborted)
        for reason in FINISH_REASONS:
            out.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
                       f"{finished[reason]}")
        for hist in (self.ttft, self.itl, self.e2e):
            hist.render(labels, out)
        sample("emulator:steps_total", "counter",
               "Engine steps executed by the emulator.", engine.num_steps)
        # Fidelity: how far steps ended past their deadline (a starved process), and how
        # often the pacing clock gave up catching up.
        sample("emulator:step_lateness_seconds_total", "counter",
               "Wall seconds steps ended past their deadline, summed.", engine.lateness_s)
        sample("emulator:resyncs_total", "counter",
               "Times the engine fell over 0.25 s behind and reset its pacing clock.",
               engine.num_resyncs)
        out.append("")
        return "\n".join(out)
