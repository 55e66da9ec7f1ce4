"""deploy/k8s/gateway: replicas behind the Kubernetes inference gateway. Core kinds validate
(strictly) with kubernetes-validate; the InferencePool against the CRD schema in
../shared/schemas/crds/ (jsonschema, unknown fields refused, the CRD's CEL rules checked by hand);
the HTTPRoute by hand (no Python package ships the Gateway API's schemas). The pieces refer to each
other: the pool selects the replica pods on their frontend's port, its picker is the EPP Service,
the EPP reads the pool by name with RBAC for it, its configuration names the metrics a frontend
exports, and every container's environment parses with the real CLI."""

from __future__ import annotations

import pytest
import yaml
from deploy_helpers import REPO
from k8s_checks import check_custom_resource, check_env_parses, container_env, crd_schema, validate_core_kinds

from services.frontend import engine_gauges

pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
jsonschema = pytest.importorskip("jsonschema")

GATEWAY_DIR = REPO / "deploy" / "k8s" / "gateway"
POOL = ("inference.networking.k8s.io/v1", "InferencePool")
ROUTE = ("gateway.networking.k8s.io/v1", "HTTPRoute")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    kustomization = yaml.safe_load((GATEWAY_DIR / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = {p.name for p in GATEWAY_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk), "every manifest listed, once"
    return [d for name in listed for d in yaml.safe_load_all((GATEWAY_DIR / name).read_text()) if d]


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def check_pool_rules(pool: dict) -> None:
    """The InferencePool CRD's CEL rules (x-kubernetes-validations), which jsonschema skips."""
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "port number must be unique"
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref, "port is required when kind is Service"


def test_core_kinds_validate_strictly(docs):
    assert validate_core_kinds([("gateway", d) for d in docs], {POOL, ROUTE}) >= 10


def test_inference_pool_validates_against_its_crd(docs):
    pool = _one(docs, "InferencePool")
    schema = crd_schema("inference.networking.k8s.io_inferencepools.yaml", pool["apiVersion"].split("/")[1])
    check_custom_resource(pool, schema)
    check_pool_rules(pool)
    # The check is not vacuous: a misspelt field, a port out of range, a missing selector all fail.
    for broken in ({"targetPort": [{"number": 8000}]}, {"targetPorts": [{"number": 70000}]}, {"selector": None}):
        bad = yaml.safe_load(yaml.safe_dump(pool))
        bad["spec"].update(broken)
        bad["spec"] = {k: v for k, v in bad["spec"].items() if v is not None}
        with pytest.raises(jsonschema.ValidationError):
            check_custom_resource(bad, schema)


def _pod(docs) -> dict:
    return _one(docs, "Deployment", "pagedserve-replica")["spec"]["template"]


def test_pool_selects_the_replicas_on_their_frontend(docs):
    pool, pod = _one(docs, "InferencePool"), _pod(docs)
    labels = pod["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Nothing else in the namespace carries those labels (the EPP pod in particular).
    others = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "pagedserve-replica"]
    assert not any(pool["spec"]["selector"]["matchLabels"].items() <= o["spec"]["template"]["metadata"]["labels"].items()
                   for o in others)
    front = next(c for c in pod["spec"]["containers"] if c["name"] == "frontend")
    ports = {p["containerPort"] for p in front["ports"]}
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000] and 8000 in ports
    assert front["readinessProbe"]["httpGet"]["path"] == "/health"  # unready replicas leave the pool
    # The three processes of a replica meet on the pod's loopback, never beyond it.
    env = {c["name"]: {e["name"]: e.get("value") for e in c.get("env", [])} for c in pod["spec"]["containers"]}
    assert env["engine"]["PAGEDSERVE_FRONTEND_INPUT"] == env["frontend"]["PAGEDSERVE_ENGINE_INPUT"]
    assert env["engine"]["PAGEDSERVE_FRONTEND_OUTPUT"] == env["frontend"]["PAGEDSERVE_ENGINE_OUTPUT"]
    assert env["engine"]["PAGEDSERVE_WORKER_ADDR"] == env["worker"]["PAGEDSERVE_WORKER_ADDR"]
    for name in ("PAGEDSERVE_FRONTEND_INPUT", "PAGEDSERVE_FRONTEND_OUTPUT", "PAGEDSERVE_WORKER_ADDR"):
        assert env["engine"][name].startswith("tcp://127.0.0.1:"), name
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["spec"]["containers"]]
    assert gpus == [None, 1, None]


def test_picker_service_rbac_and_pool_name(docs):
    pool, epp = _one(docs, "InferencePool"), _one(docs, "Deployment", "pagedserve-epp")
    ref = pool["spec"]["endpointPickerRef"]
    svc = _one(docs, "Service", ref["name"])
    port = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    spec = epp["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    args = container["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == pool["apiVersion"].split("/")[0]
    # Deprecated metric flags make the picker refuse to start: names go in its configuration.
    assert not any(a.endswith("-metric") or "-metric=" in a for a in args)
    binding = _one(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"]}]
    role = _one(docs, "Role", binding["roleRef"]["name"])
    grants = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              if {"get", "list", "watch"} <= set(rule["verbs"])}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= grants


def _picker_config(docs) -> tuple[dict, dict]:
    epp = _one(docs, "Deployment", "pagedserve-epp")["spec"]["template"]["spec"]
    args = epp["containers"][0]["args"]
    path = args[args.index("--config-file") + 1]
    mount = next(m for m in epp["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in epp["volumes"] if v["name"] == mount["name"])
    cm = _one(docs, "ConfigMap", volume["configMap"]["name"])
    return yaml.safe_load(cm["data"][path.rsplit("/", 1)[1]]), _pod(docs)


def test_picker_reads_pagedserve_metric_names(docs):
    config, pod = _picker_config(docs)
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    params = plugins["core-metrics-extractor"]["parameters"]
    engine = pod["metadata"]["labels"][params["engineLabelKey"]]
    assert engine == params["defaultEngine"]
    names = next(e for e in params["engineConfigs"] if e["name"] == engine)
    g = engine_gauges
    assert names == {"name": engine, "queuedRequestsSpec": g.WAITING[0], "runningRequestsSpec": g.RUNNING[0],
                     "kvUsageSpec": g.KV_USAGE[0], "loraSpec": g.LORA_INFO[0], "cacheInfoSpec": g.CACHE_INFO[0]}
    assert config["dataLayer"]["sources"] == [
        {"pluginRef": "metrics-data-source", "extractors": [{"pluginRef": "core-metrics-extractor"}]}]
    # Every reference names a plugin; the profile scores by queue, KV use, prefix and LoRA affinity.
    (profile,) = config["schedulingProfiles"]
    refs = [p["pluginRef"] for p in profile["plugins"]]
    assert set(refs) <= set(plugins)
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"} <= set(refs)


def test_httproute_sends_everything_to_the_pool(docs):
    route, pool = _one(docs, "HTTPRoute"), _one(docs, "InferencePool")
    assert set(route["spec"]) == {"parentRefs", "rules"}
    assert [(p["group"], p["kind"]) for p in route["spec"]["parentRefs"]] == [("gateway.networking.k8s.io", "Gateway")]
    (rule,) = route["spec"]["rules"]
    assert set(rule) <= {"matches", "backendRefs", "timeouts", "filters", "name", "sessionPersistence"}
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    assert rule["timeouts"]["request"].endswith("s")


def test_replica_environment_parses(docs, model_dirs, monkeypatch):
    """Each container's environment names real flags and parses with `pagedserve <service>`."""
    configs = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for c in _pod(docs)["spec"]["containers"]:
        check_env_parses(c["command"][1], container_env(c, configs), str(model_dirs("llama")), monkeypatch)


# ----- the LeaderWorkerSet variant: multi-node tensor parallelism per replica -----------------------

LWS_FILE = GATEWAY_DIR / "multinode" / "replica-lws.yaml"


@pytest.fixture(scope="module")
def lws() -> dict:
    return yaml.safe_load(LWS_FILE.read_text())


def _lws_pods(lws: dict) -> dict[str, dict]:
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    return {"leader": tmpl["leaderTemplate"], "worker": tmpl["workerTemplate"]}


def test_lws_validates_against_its_crd_and_pods_against_kubernetes(lws):
    schema = crd_schema("leaderworkerset.x-k8s.io_leaderworkersets.yaml", lws["apiVersion"].split("/")[1])
    check_custom_resource(lws, schema)
    bad = yaml.safe_load(yaml.safe_dump(lws))
    bad["spec"]["leaderWorkerTemplate"]["sizes"] = 2
    with pytest.raises(jsonschema.ValidationError):
        check_custom_resource(bad, schema)
    pods = [(role, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"lws-{role}", **t["metadata"]},
                    "spec": t["spec"]}) for role, t in _lws_pods(lws).items()]
    assert validate_core_kinds(pods, set()) == 2


def test_lws_pool_routes_to_leaders_and_ranks_meet_there(docs, lws):
    pool, pods = _one(docs, "InferencePool"), _lws_pods(lws)
    selector = pool["spec"]["selector"]["matchLabels"].items()
    assert selector <= pods["leader"]["metadata"]["labels"].items()
    assert not selector <= pods["worker"]["metadata"]["labels"].items()
    name, size = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]["size"]
    assert size >= 2
    (worker,) = pods["worker"]["spec"]["containers"]
    env = {e["name"]: e for e in worker["env"]}
    leader = f"{name}-$(GROUP_INDEX).{name}"  # the group's leader, by LeaderWorkerSet's DNS name
    assert env["PAGEDSERVE_WORKER_ADDR"]["value"] == f"tcp://{leader}:5572"
    assert env["PAGEDSERVE_DIST_INIT_ADDR"]["value"] == f"{leader}:29500"
    names = [e["name"] for e in worker["env"]]
    assert names.index("GROUP_INDEX") < names.index("PAGEDSERVE_WORKER_ADDR")  # $(...) needs it first
    assert "worker-index" in env["PAGEDSERVE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    for pod in pods.values():  # one rank per pod: as many nodes as pods
        (rank,) = [c for c in pod["spec"]["containers"] if c["name"] == "worker"]
        assert {e["name"]: e.get("value") for e in rank["env"]}["PAGEDSERVE_NNODES"] == str(size)
    leader_ports = {p["containerPort"] for c in pods["leader"]["spec"]["containers"] for p in c.get("ports", [])}
    assert {5572, 29500, 8000} <= leader_ports


def test_lws_links_authenticated_and_environment_parses(docs, lws, model_dirs, monkeypatch):
    configs = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for pod in _lws_pods(lws).values():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for c in pod["spec"]["containers"]:
            env = container_env(c, configs)
            keys = next(m for m in c["volumeMounts"] if m["mountPath"] == env["PAGEDSERVE_CURVE_KEYS_DIR"])
            secret = volumes[keys["name"]]["secret"]
            assert secret["secretName"] == "pagedserve-curve-keys" and not secret.get("optional")
            check_env_parses(c["command"][1], env, str(model_dirs("llama")), monkeypatch)
