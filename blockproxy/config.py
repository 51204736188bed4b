"""Proxy configuration: one dataclass; every field is a CLI flag and a ``BLOCKPROXY_*`` variable.

Precedence: command-line flag > environment variable > default.  The field's metadata holds
its help text; :func:`add_config_arguments` turns the fields into argparse flags (``--field-name``)
whose defaults come from the environment, so ``--help`` shows the value in force.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

ENV_PREFIX = "BLOCKPROXY_"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ProxyConfig:
    """Everything ``blockproxy serve`` can be told."""

    backends: str = _opt("", "backends file (YAML, TOML or one URL per line)")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    policy: str = _opt("block", "routing policy (block, block_ttft, round_robin, random, "
                                "least_requests, power_of_two, least_tokens, llumnix, "
                                "lmetric, prefix_affinity, intelligent_router)")
    sample_k: int = _opt(0, "block: simulate only k randomly sampled instances (0 = all)")
    tie_tolerance: float = _opt(0.02, "block: predictions within this fraction of the best "
                                      "are ties, broken at random (herding control)")
    delay_weight: float = _opt(0.0, "block: weight of the latency a request is predicted to "
                                    "add to the others on an instance (those expected to "
                                    "arrive included), added to its own (0 = its own only, "
                                    "as in the Block paper)")
    delay_slack: float = _opt(0.2, "block: with --delay-weight or --prefill-stall, how much "
                                   "longer (a fraction) a request's own predicted latency "
                                   "may be than its best, to spare the others (inf = no "
                                   "limit)")
    delay_decodes: float = _opt(-1.0, "block: with --delay-weight, how much a request's "
                                      "delay to another already past its first token "
                                      "counts against one to a first token still to come, "
                                      "in [0, 1] (1 = the end-to-end delay; negative = the "
                                      "policy's own: 1 for block, 0 for block_ttft)")
    prefill_stall: float = _opt(0.0, "block: weight of the time the request's prefill "
                                     "holds up the requests running on an instance (its "
                                     "prefill time times how many run there), added to its "
                                     "score; the simulations then include the expected "
                                     "arrivals (0 = off)")
    balance_abs: int = _opt(32, "prefix_affinity: route to the least loaded when the most and "
                                "least loaded differ by more than this many requests ...")
    balance_rel: float = _opt(1.5, "prefix_affinity: ... and by more than this factor")
    cache_threshold: float = _opt(0.5, "prefix_affinity: the longest cached prefix wins if it "
                                       "covers at least this share of the prompt")
    mixing_weight: float = _opt(1.0, "intelligent_router: weight of the latency a request "
                                     "adds to those already on an instance (the mixing "
                                     "penalty) against its own")
    router_weights: str = _opt("", "intelligent_router: the learned policy's weights "
                                   "(blockproxy train-router); empty: the heuristic")
    profile: str = _opt("llama-3.1-8b-h100-tp1", "default step-time profile (name or file)")
    speed: float = _opt(1.0, "step-time multiplier applied to every profile, e.g. the "
                             "--time-scale of emulated instances; calibration refines it per "
                             "instance")
    length_quantile: float = _opt(0.5, "quantile of observed output lengths used as the "
                                       "prediction")
    default_output_tokens: int = _opt(256, "predicted output length before anything is learned")
    length_model: str = _opt("", "output-length model trained offline (blockproxy "
                                 "train-lengths); it goes on learning online")
    length_warmup: int = _opt(64, "requests of a model the length model learns from before it "
                                  "predicts (a loaded model predicts at once)")
    length_tail_quantile: float = _opt(0.9, "quantile of a request's output length its tail "
                                            "E2E is predicted at")
    length_tail_every: int = _opt(1000, "predict the tail E2E for one request in this many "
                                       "(the prediction_tail_total metric; each costs a "
                                       "simulation of a long answer; 0 = none)")
    past_prediction_tokens: int = _opt(16, "simulator: tokens still expected from a request "
                                           "already past its predicted length")
    calibrate: bool = _opt(True, "learn each instance's true speed from observed token timings")
    learn_overhead: bool = _opt(True, "learn each instance's per-request overhead (time "
                                      "before its engine queues a request) from observed "
                                      "first tokens")
    future_arrivals: int = _opt(256, "simulator: requests expected to arrive at an instance "
                                     "while the new one runs, at most (its recent arrival "
                                     "rate and mean sizes; 0 = none)")
    arrival_window: float = _opt(30.0, "seconds over which an instance's recent arrivals are "
                                       "averaged (exponential decay)")
    max_body_bytes: int = _opt(4 * 1024 * 1024, "largest request body accepted (413 above)")
    max_retries: int = _opt(2, "other instances tried when one fails before the first byte")
    max_continuations: int = _opt(2, "times a stream whose instance fails mid-stream is "
                                     "continued on another instance (0 = end it with an "
                                     "error event)")
    handoff_tokens: int = _opt(64, "an instance set to draining (or removed) hands a stream "
                                   "over to another instance by continuation unless it is "
                                   "predicted to end within this many tokens (0 = never: "
                                   "streams finish where they are)")
    slice_tokens: int = _opt(0, "SCLS slice mode: streams are generated in slices of this "
                                "many tokens, each placed anew by the policy and spliced into "
                                "one stream (0 = off; the x-blockproxy-slice-tokens header "
                                "sets it per request)")
    slo_ttft_ms: float = _opt(0.0, "time-to-first-token objective (ms) from a request's "
                                   "arrival: with admission on, requests no instance is "
                                   "predicted to start within it are held, and refused "
                                   "(429) when they cannot be (0 = no objective)")
    admission: bool = _opt(True, "hold requests predicted to miss --slo-ttft-ms until an "
                                 "instance is predicted in time (off: dispatch them anyway)")
    admission_queue: int = _opt(1024, "requests held for admission at most; beyond, the "
                                      "tenant holding the most gives up its latest (429)")
    slo_e2e_ms: float = _opt(0.0, "end-to-end latency objective (ms): auto-provisioning "
                                  "aims at it too (0 = none)")
    autoscale: str = _opt("advise", "auto-provisioning: off, advise (compute the instances "
                                    "the load needs: the blockproxy_desired_instances gauge "
                                    "and /autoscale) or act (also activate standby "
                                    "instances and drain surplus ones); needs an objective")
    autoscale_signal: str = _opt("predicted", "what auto-provisioning scales on: predicted "
                                              "(the simulator against the objectives) or "
                                              "queue (waiting requests per instance, as a "
                                              "Kubernetes HPA on vllm:num_requests_waiting)")
    autoscale_interval: float = _opt(2.0, "seconds between auto-provisioning decisions")
    scale_up_cooldown: float = _opt(10.0, "seconds after one scale-up before another")
    scale_down_after: float = _opt(60.0, "seconds one fewer instance must look enough (and "
                                         "no action come) before scaling down")
    scale_down_step: float = _opt(15.0, "seconds between two scale-down steps of one "
                                        "instance each, while fewer still look enough")
    scale_down_margin: float = _opt(0.6, "scale down only if one fewer instance is "
                                         "predicted within this fraction of the objectives")
    scale_headroom: float = _opt(1.1, "auto-provisioning plans for the recent arrival rate "
                                      "times this (Poisson bursts beyond the simulated "
                                      "steady stream)")
    scale_queue_target: float = _opt(4.0, "waiting requests per instance aimed at by the "
                                          "queue signal")
    min_instances: int = _opt(1, "auto-provisioning never goes below this many active "
                                 "instances per model")
    scale_command: str = _opt("", "command run (sh -c) when a model's desired instance "
                                  "count changes, with BLOCKPROXY_MODEL, "
                                  "BLOCKPROXY_DESIRED_INSTANCES and "
                                  "BLOCKPROXY_ACTIVE_INSTANCES in its environment")
    stall_timeout: float = _opt(30.0, "seconds a started stream that can be continued may "
                                      "go silent before it is continued elsewhere")
    connect_timeout: float = _opt(5.0, "seconds to connect to an instance")
    read_timeout: float = _opt(600.0, "seconds of upstream silence before a stream (or the "
                                      "wait for its headers) is given up")
    unary_timeout: float = _opt(1800.0, "seconds a non-streaming request may take in all "
                                        "(vLLM answers it only when it is done); 504 after")
    max_upstream_connections: int = _opt(1024, "open connections per instance at most "
                                               "(0 = no cap); beyond, a request waits up to "
                                               "the connect timeout for one")
    eject_after: int = _opt(3, "consecutive failures that eject an instance")
    max_ejected_percent: float = _opt(50.0, "at most this share of the active instances is "
                                            "ejected at once (at least one may be); when all "
                                            "serving a model are out, all are used (panic)")
    probe_interval: float = _opt(1.0, "seconds between /health probes of ejected instances "
                                      "(doubles per failure, up to 30 s)")
    reload_interval: float = _opt(1.0, "seconds between checks of the backends file")
    drain_grace: float = _opt(5.0, "SIGTERM: seconds to keep accepting (with /ready 503 and "
                                   "Connection: close) so load balancers stop routing here")
    drain_timeout: float = _opt(20.0, "SIGTERM: then seconds to let in-flight requests finish "
                                      "(grace + drain fit Kubernetes' default 30 s)")
    header_timeout: float = _opt(60.0, "seconds for a request's headers to arrive, from its "
                                       "first byte or the connection's opening (408 after)")
    body_timeout: float = _opt(60.0, "seconds for a request's body to arrive (408 after)")
    send_timeout: float = _opt(60.0, "seconds a client may read nothing of a response before "
                                     "its connection is closed (its generation aborted)")
    keepalive_timeout: float = _opt(75.0, "seconds an idle client connection is kept open")
    send_buffer_bytes: int = _opt(0, "kernel send buffer of client connections (SO_SNDBUF, "
                                     "as nginx's listen sndbuf=; 0 = the kernel's default): "
                                     "what a client that stops reading can hold")
    max_connections: int = _opt(0, "open client connections at most; one more gets a 503 "
                                   "(0 = fit the open-files limit: (limit - 256) / 2)")
    max_in_flight: int = _opt(0, "requests served at once at most; one more gets a 503 "
                                 "(0 = no cap beyond the connection cap)")
    api_key: str = _opt("", "require Authorization: Bearer <key> (comma-separated keys; "
                            "/health, /ready and /metrics stay open)")
    access_log: str = _opt("", "write an access log (combined format, request time and "
                               "X-Request-Id) to this file, '-' for stdout (off when empty)")
    admin_port: int = _opt(0, "serve /metrics and /debug/* on this port only, not on the "
                              "main one (0 = on the main port)")
    log_level: str = _opt("info", "logging level")
    gossip_bind: str = _opt("", "UDP HOST:PORT for gossip with other proxies (off when empty)")
    gossip_seeds: str = _opt("", "comma-separated HOST:PORT of other proxies; a name may "
                                 "resolve to many (re-resolved periodically)")
    gossip_key_file: str = _opt("", "file holding the shared gossip HMAC key (required "
                                    "with --gossip-bind)")
    gossip_insecure: bool = _opt(False, "testing only: gossip without a key (an all-zero "
                                        "one): anyone who reaches the port can add load")
    gossip_id: str = _opt("", "this proxy's gossip origin id (integer or name; random when "
                              "empty)")
    gossip_interval: float = _opt(0.005, "seconds between gossip delta batches")
    gossip_snapshot_interval: float = _opt(0.5, "seconds between full gossip snapshots")
    gossip_expiry: float = _opt(2.0, "seconds of silence after which a peer's entries expire")
    gossip_window: float = _opt(10.0, "gossip timestamps further than this from now (s) are "
                                      "rejected")
    gossip_progress_tokens: int = _opt(8, "gossip a request's progress every N tokens")
    gossip_loss: float = _opt(0.0, "testing: drop this fraction of sent gossip datagrams")
    scrape_interval: float = _opt(2.0, "seconds between scrapes of each instance's /metrics "
                                       "for load that bypasses the proxies (0 = off)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProxyConfig:
        """Build from parsed arguments (flags were defaulted from the environment)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`ProxyConfig` field, defaulted from ``BLOCKPROXY_<FIELD>``."""
    for f in fields(ProxyConfig):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not MISSING else None
        kind: Any = type(default)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                parser.error(f"{env}={raw!r}: {exc}")
        help_text = f"{f.metadata['help']} [env {env}]"
        if kind is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text,
                                metavar=f.name.upper())
