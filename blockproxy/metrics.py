"""Prometheus metrics (prefix ``blockproxy_``), one registry per proxy process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from blockproxy.cluster.autoscale import Autoscaler
    from blockproxy.cluster.view import ClusterView

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
               1.0, 2.5)
DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)
ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)


class _ClusterCollector:
    """Per-instance gauges read from the live view at scrape time."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def collect(self):  # type: ignore[no-untyped-def]
        active = GaugeMetricFamily("blockproxy_instance_active_requests",
                                   "Requests the proxy knows are active on the instance",
                                   labels=["instance"])
        healthy = GaugeMetricFamily("blockproxy_instance_healthy",
                                    "1 if the instance takes traffic (not ejected)",
                                    labels=["instance"])
        speed = GaugeMetricFamily("blockproxy_instance_speed",
                                  "Calibrated step-time multiplier (1 = as the profile)",
                                  labels=["instance"])
        for inst in self.view.instances.values():
            active.add_metric([inst.name], inst.active)
            healthy.add_metric([inst.name], 1.0 if inst.healthy else 0.0)
            speed.add_metric([inst.name], inst.model.speed)
        yield active
        yield healthy
        yield speed


class _AutoscaleCollector:
    """Auto-provisioning's figures per model, read from the autoscaler at scrape time."""

    def __init__(self, autoscaler: Autoscaler) -> None:
        self.autoscaler = autoscaler

    def collect(self):  # type: ignore[no-untyped-def]
        desired = GaugeMetricFamily(
            "blockproxy_desired_instances", "Instances the recent load needs to meet the "
            "objectives (auto-provisioning's decision; feed it to an HPA)", labels=["model"])
        active = GaugeMetricFamily("blockproxy_active_instances",
                                   "Active healthy instances serving the model",
                                   labels=["model"])
        seconds = CounterMetricFamily(
            "blockproxy_instance_seconds", "Seconds of active or draining instances "
            "serving the model, summed over instances", labels=["model"])
        for name, m in sorted(self.autoscaler.models.items()):
            if not m.report:
                continue
            desired.add_metric([name], m.desired)
            active.add_metric([name], len(m.report["active"]))
            seconds.add_metric([name], m.instance_seconds)
        yield desired
        yield active
        yield seconds


class Metrics:
    """All of the proxy's metrics."""

    def __init__(self, view: ClusterView) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("blockproxy_requests_total", "Requests by route, status, policy",
                                ["route", "status", "policy"], registry=r)
        self.ttft = Histogram("blockproxy_time_to_first_token_seconds",
                              "Time to first token seen by the proxy", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("blockproxy_inter_token_latency_seconds",
                             "Mean gap between streamed tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("blockproxy_e2e_request_latency_seconds",
                             "End-to-end latency seen by the proxy", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.decision = Histogram("blockproxy_decision_seconds",
                                  "Time to choose an instance (prediction included)",
                                  ["policy"], buckets=DECISION_BUCKETS, registry=r)
        self.decisions = Counter("blockproxy_decisions_total", "Routing decisions",
                                 ["policy", "instance"], registry=r)
        self.prediction_error = Histogram(
            "blockproxy_prediction_abs_relative_error",
            "|predicted - observed| / observed, per quantity", ["quantity"],
            buckets=ERROR_BUCKETS, registry=r)
        # the request path observes these on every completion: children looked up once
        self.e2e_error = self.prediction_error.labels("e2e")
        self.ttft_error = self.prediction_error.labels("ttft")
        self.prediction_bias = Summary(
            "blockproxy_prediction_relative_error",
            "(predicted - observed) / observed, per quantity: its mean is the bias (< 0: "
            "predictions too low)", ["quantity"], registry=r)
        self.e2e_bias = self.prediction_bias.labels("e2e")
        self.ttft_bias = self.prediction_bias.labels("ttft")
        self.tail_predictions = Counter(
            "blockproxy_prediction_tail_total",
            "Completed requests with a predicted tail E2E (at the length model's high "
            "quantile): outcome=within when the E2E stayed under it, else exceeded",
            ["outcome"], registry=r)
        self.tail_within = self.tail_predictions.labels("within")
        self.tail_exceeded = self.tail_predictions.labels("exceeded")
        self.length_error = Histogram(
            "blockproxy_output_length_abs_relative_error",
            "|predicted - true| / true output tokens", buckets=ERROR_BUCKETS, registry=r)
        self.prompt_tokens = Counter("blockproxy_dispatched_prompt_tokens_total",
                                     "Prompt tokens of dispatched requests (estimated)",
                                     registry=r)
        self.cached_tokens = Counter("blockproxy_predicted_cached_tokens_total",
                                     "Prompt tokens of dispatched requests that the chosen "
                                     "instance was predicted to hold in its prefix cache",
                                     registry=r)
        self.retries = Counter("blockproxy_retries_total", "Requests tried on another "
                               "instance because this one was not reached", ["instance"],
                               registry=r)
        self.connections = Gauge("blockproxy_client_connections", "Open client connections",
                                 registry=r)
        self.rejected_connections = Counter(
            "blockproxy_rejected_connections_total",
            "Client connections refused (503) at the connection cap", registry=r)
        self.client_timeouts = Counter(
            "blockproxy_client_timeouts_total", "Client connections closed for slowness: "
            "headers, body or reading the response", ["kind"], registry=r)
        self.unauthorized = Counter("blockproxy_unauthorized_requests_total",
                                    "Requests refused for a missing or wrong API key",
                                    registry=r)
        self.ejections = Counter("blockproxy_ejections_total", "Instances ejected after "
                                 "repeated failures", ["instance"], registry=r)
        self.cancellations = Counter("blockproxy_cancellations_total",
                                     "Requests cancelled because the client went away",
                                     registry=r)
        self.stream_failures = Counter("blockproxy_stream_failures_total",
                                       "Upstream failures after streaming had started",
                                       ["instance"], registry=r)
        self.continuations = Counter(
            "blockproxy_continuations_total", "Streams continued on another instance, by "
            "the instance they left and why (failure: it failed mid-stream; drain: it was "
            "set to draining or removed)", ["instance", "reason"], registry=r)
        self.continuation_gap = Histogram(
            "blockproxy_continuation_gap_seconds", "From a mid-stream failure to the "
            "continuation's first token", buckets=LATENCY_BUCKETS, registry=r)
        self.admission = Counter(
            "blockproxy_admission_total", "Admission outcomes under a TTFT objective: "
            "admitted (at once), held, released (after holding), rejected_full, "
            "rejected_deadline (both answered 429), cancelled (the client left while held)",
            ["outcome"], registry=r)
        self.admission_depth = Gauge("blockproxy_admission_queue_depth",
                                     "Requests held for admission now", registry=r)
        self.admission_wait = Histogram(
            "blockproxy_admission_wait_seconds", "Time held requests waited before their "
            "release", buckets=LATENCY_BUCKETS, registry=r)
        self.slo = Counter(
            "blockproxy_slo_ttft_total", "Streams whose first token came within the TTFT "
            "objective from their arrival (met) or not (missed)", ["outcome"], registry=r)
        self.in_flight = Gauge("blockproxy_in_flight_requests", "Requests being served",
                               registry=r)
        self.task_restarts = Counter("blockproxy_background_task_restarts_total",
                                     "Background loops restarted after they raised",
                                     ["task"], registry=r)
        self.scale_actions = Counter(
            "blockproxy_scale_actions_total", "Instance state changes made by "
            "auto-provisioning: up (standby to active), down (to draining), standby "
            "(drained)", ["model", "action"], registry=r)
        r.register(_ClusterCollector(view))

    def add_autoscaler(self, autoscaler: Autoscaler) -> None:
        self.registry.register(_AutoscaleCollector(autoscaler))

    def render(self) -> bytes:
        return generate_latest(self.registry)
