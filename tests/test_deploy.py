"""The Kubernetes deployment in ``deploy/kubernetes``: rendered as ``kubectl apply -k``
would (its kustomization's resources, in order), each object validated against the
Kubernetes schemas (``kubernetes-validate``), and checked against blockproxy itself: the
container's arguments and environment are flags ``blockproxy serve`` accepts, the
ConfigMap holds a backends file it loads, the probes, ports and grace period agree."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from blockproxy import serve
from blockproxy.backends import parse_backends
from blockproxy.config import ENV_PREFIX, ProxyConfig

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
#: the oldest Kubernetes release the manifests are validated against (and the newest
#: kubernetes-validate knows)
VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
#: custom resources: no schema in Kubernetes' own; checked by hand below
CUSTOM = {"monitoring.coreos.com/v1"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k directory`` applies: its kustomization's resources,
    each file's documents in order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((directory / resource).read_text())
                    if doc]
    return objects


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(KUBE)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_every_manifest_is_in_the_kustomization_and_renders(
        objects: list[dict[str, Any]]) -> None:
    listed = set(yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    # vllm.yaml is the example engine the backends point at, applied on its own
    assert files - listed <= {"vllm.yaml", "hpa.yaml"}, files - listed
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Service", "Service",
                            "PodDisruptionBudget", "ServiceMonitor"])


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_are_valid_kubernetes(version: str) -> None:
    checked = 0
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc["apiVersion"] in CUSTOM:
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
    assert checked >= 7


def test_service_monitor_scrapes_the_admin_port(objects: list[dict[str, Any]]) -> None:
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (deployment,) = by_kind(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    services = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") != "None"]
    assert any(p["name"] == "admin" for s in services for p in s["spec"]["ports"])


def _serve_args(container: dict[str, Any]) -> argparse.Namespace:
    """The container's arguments, parsed by ``blockproxy serve``'s own parser, with its
    environment in force (as the image's entry point would)."""
    assert container["args"][0] == "serve"
    parser = argparse.ArgumentParser(prog="blockproxy serve", exit_on_error=False)
    env = {e["name"]: e.get("value", "from-a-secret") for e in container.get("env", [])}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        serve.add_arguments(parser)
        return parser.parse_args(container["args"][1:])


def test_the_container_runs_blockproxy_with_flags_it_accepts(
        objects: list[dict[str, Any]]) -> None:
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    known = {ENV_PREFIX + f.name.upper() for f in fields(ProxyConfig)}
    for env in container.get("env", []):
        assert env["name"] in known, env["name"]
    args = _serve_args(container)
    config = ProxyConfig.from_args(args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.port == ports["http"] and config.admin_port == ports["admin"]
    assert config.gossip_bind.endswith(f":{ports['gossip']}") and config.gossip_key_file
    assert config.host == "0.0.0.0"
    # the grace period covers the drain: announce, then let streams finish
    assert pod["terminationGracePeriodSeconds"] >= config.drain_grace + config.drain_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # the files it reads are mounted where it looks for them
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(config.backends).parent) in mounts
    assert str(Path(config.gossip_key_file).parent) in mounts


def test_gossip_seeds_name_the_headless_service(objects: list[dict[str, Any]]) -> None:
    (deployment,) = by_kind(objects, "Deployment")
    config = ProxyConfig.from_args(_serve_args(
        deployment["spec"]["template"]["spec"]["containers"][0]))
    host, port = config.gossip_seeds.rsplit(":", 1)
    (headless,) = [s for s in by_kind(objects, "Service")
                   if s["spec"].get("clusterIP") == "None"]
    assert headless["metadata"]["name"] == host
    assert headless["spec"]["publishNotReadyAddresses"] is True
    (gossip,) = headless["spec"]["ports"]
    assert gossip["port"] == int(port) and gossip["protocol"] == "UDP"


def test_the_configmap_holds_a_backends_file_blockproxy_loads(
        objects: list[dict[str, Any]]) -> None:
    (configmap,) = by_kind(objects, "ConfigMap")
    specs = parse_backends(configmap["data"]["backends.yaml"], "yaml")
    assert len(specs) >= 2 and all(s.url.startswith("http://vllm-") for s in specs)


def test_the_pdb_and_the_selectors_match_the_pods(objects: list[dict[str, Any]]) -> None:
    (deployment,) = by_kind(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in by_kind(objects, "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2  # active-active
