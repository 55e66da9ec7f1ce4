"""deploy/k8s: every manifest the kustomization lists exists and validates (strictly) against the
newest Kubernetes schema kubernetes-validate ships; the ServiceMonitor (a CRD, no schema there) is
checked by hand; and the pieces refer to each other correctly (selectors, named ports in probes,
ConfigMap keys, the HPA/PDB targets, the environment the services read)."""

from __future__ import annotations

import pytest
import yaml
from deploy_helpers import CURVE_FILES, K8S_DIR
from k8s_checks import check_env_parses, container_env, validate_core_kinds

kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")

CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def resources(kustomization) -> list[tuple[str, dict]]:
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S_DIR / name).read_text()):
            if doc:
                docs.append((name, doc))
    return docs


def _by_kind(resources, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in resources if d["kind"] == kind}


def _workloads(resources) -> dict[str, dict]:
    return {**_by_kind(resources, "Deployment"), **_by_kind(resources, "StatefulSet")}


def test_kustomization_lists_existing_files(kustomization):
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S_DIR / name).is_file(), name
    # Nothing left out: every manifest beside it is listed.
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed)


def test_manifests_validate_against_kubernetes(resources):
    checked = validate_core_kinds(resources, CRDS)
    assert checked >= 11


def test_validation_is_strict(resources):
    """The validator rejects an unknown field (so the check above is not vacuous)."""
    doc = yaml.safe_load(yaml.safe_dump(_by_kind(resources, "Deployment")["pagedserve-frontend"]))
    doc["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, kv.latest_version(), True)


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_and_services(resources):
    workloads = _workloads(resources)
    for name, w in workloads.items():
        assert _matches(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]), name
    for name, svc in _by_kind(resources, "Service").items():
        pods = [w for w in workloads.values() if _matches(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(pods) == 1, f"Service {name} selects {len(pods)} workloads"
        ports = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
    sts = _by_kind(resources, "StatefulSet")["pagedserve-worker"]
    assert _by_kind(resources, "Service")[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"


def _containers(resources):
    for name, w in _workloads(resources).items():
        for c in w["spec"]["template"]["spec"]["containers"]:
            yield name, w, c


def test_probes_use_the_real_health_endpoints(resources):
    expect = {"frontend": {"readinessProbe": "/health"}, "engine": {}, "worker": {}}
    for name, _, c in _containers(resources):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, (name, probe)
            get = c[probe]["httpGet"]
            assert get["port"] in ports, (name, probe)
            if c["name"] in ("engine", "worker"):
                assert get["path"] == "/metrics" and ports[get["port"]] == {"engine": 8001, "worker": 8002}[c["name"]]
            want = expect[c["name"]].get(probe)
            if want:
                assert get["path"] == want, (name, probe)


def test_gpu_requests_and_graceful_termination(resources):
    workloads = _workloads(resources)
    worker = workloads["pagedserve-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    front = workloads["pagedserve-frontend"]["spec"]["template"]["spec"]
    pre_stop = front["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = _by_kind(resources, "ConfigMap")["pagedserve-frontend-config"]["data"]["PAGEDSERVE_SHUTDOWN_TIMEOUT"]
    # The grace period covers the preStop pause and the frontend's own drain timeout.
    assert front["terminationGracePeriodSeconds"] > pre_stop + float(drain)
    for w in workloads.values():
        assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    assert workloads["pagedserve-engine"]["spec"]["strategy"]["type"] == "Recreate"


def test_hpa_and_pdb_target_the_frontend(resources):
    hpa = next(iter(_by_kind(resources, "HorizontalPodAutoscaler").values()))
    assert hpa["spec"]["scaleTargetRef"]["name"] == "pagedserve-frontend"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    front = _workloads(resources)["pagedserve-frontend"]
    assert all("cpu" in c["resources"]["requests"] for c in front["spec"]["template"]["spec"]["containers"])
    pdb = next(iter(_by_kind(resources, "PodDisruptionBudget").values()))
    assert _matches(pdb["spec"]["selector"]["matchLabels"], front["spec"]["template"]["metadata"]["labels"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_servicemonitor_structure(resources):
    monitors = [d for _, d in resources if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    sm = monitors[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["name"]
    spec = sm["spec"]
    services = [s for s in _by_kind(resources, "Service").values()
                if _matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
    # Job names as the alert rules and dashboards use them.
    assert {s["metadata"]["labels"][spec["jobLabel"]] for s in services} == {"frontend", "engine", "worker"}
    assert spec["endpoints"]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                           "metricRelabelings"}, ep
        assert ep["path"] == "/metrics" and ep["interval"].endswith("s")
        assert any(ep["port"] == p["name"] for s in services for p in s["spec"]["ports"]), ep
    scraped = {s["metadata"]["labels"][spec["jobLabel"]] for s in services
               for p in s["spec"]["ports"] if any(ep["port"] == p["name"] for ep in spec["endpoints"])}
    assert scraped == {"frontend", "engine", "worker"}


def test_configmap_refs_and_environment_parse(resources, model_dirs, monkeypatch):
    """Each container's environment (ConfigMap + its own env) names real flags and parses."""
    configs = {name: cm["data"] for name, cm in _by_kind(resources, "ConfigMap").items()}
    assert all(isinstance(v, str) for data in configs.values() for v in data.values())
    for _, _, c in _containers(resources):
        service = c["command"][1]
        assert c["command"][0] == "pagedserve" and service in ("frontend", "engine", "worker")
        check_env_parses(service, container_env(c, configs), str(model_dirs("llama")), monkeypatch)


def _env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_curve_keys_mounted_from_the_secret_per_role(resources):
    """Every service reads its CURVE keys from the pagedserve-curve-keys Secret (required, not
    optional), and each mounts only the files of its role."""
    for name, w, c in _containers(resources):
        role = c["command"][1]
        keys_dir = _env_values(c)["PAGEDSERVE_CURVE_KEYS_DIR"]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == keys_dir)
        assert mount.get("readOnly") is True, name
        volume = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        secret = volume["secret"]
        assert secret["secretName"] == "pagedserve-curve-keys" and not secret.get("optional"), name
        assert secret["defaultMode"] & 0o007 == 0, f"{name}: keys readable by others"
        assert all(i["key"] == i["path"] for i in secret["items"]), name
        assert {i["key"] for i in secret["items"]} == CURVE_FILES[role], name
        if role != "frontend":  # /metrics opened for Prometheus (the services default to loopback)
            assert _env_values(c)["PAGEDSERVE_METRICS_HOST"] == "0.0.0.0", name


def _admits(policy: dict, labels: dict, port: int, same_namespace: bool = True) -> bool:
    """Whether an ingress NetworkPolicy lets a pod with `labels` connect to `port`."""
    for rule in policy["spec"]["ingress"]:
        if rule.get("ports") and not any(p["port"] == port for p in rule["ports"]):
            continue
        for peer in rule.get("from", []):
            if not same_namespace and "namespaceSelector" not in peer:
                continue
            if _matches(peer.get("podSelector", {}).get("matchLabels", {}), labels):
                return True
    return False


def test_network_policies_admit_only_the_stack(resources):
    policies = _by_kind(resources, "NetworkPolicy")
    workloads = _workloads(resources)
    pods = {role: workloads[f"pagedserve-{role}"]["spec"]["template"]["metadata"]["labels"]
            for role in ("engine", "frontend", "worker")}
    prometheus, stranger = {"app.kubernetes.io/name": "prometheus"}, {"app.kubernetes.io/name": "other"}
    expected = {  # policy -> port -> the sources admitted
        "pagedserve-engine": {5570: {"frontend"}, 5571: {"frontend"}, 5572: {"worker"}, 8001: {"prometheus"}},
        "pagedserve-worker": {29500: {"worker"}, 8002: {"prometheus", "worker"}},  # ranks: every port
    }
    for name, ports in expected.items():
        policy = policies[name]
        target = name.removeprefix("pagedserve-")
        assert _matches(policy["spec"]["podSelector"]["matchLabels"], pods[target])
        assert "Ingress" in policy["spec"]["policyTypes"]
        container_ports = {p["containerPort"] for c in workloads[name]["spec"]["template"]["spec"]["containers"]
                           for p in c["ports"]}
        assert container_ports == set(ports), f"{name}: a port the policy test does not cover"
        for port, allowed in ports.items():
            admitted = {role for role, labels in pods.items() if _admits(policy, labels, port)}
            if _admits(policy, prometheus, port, same_namespace=False):
                admitted.add("prometheus")
            assert admitted == allowed, (name, port, admitted)
            assert not _admits(policy, stranger, port), (name, port)
