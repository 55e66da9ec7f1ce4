"""docker-compose.yml and docker-compose.cpu.yml, without a Docker engine: both validate against
the Compose specification's JSON schema, work without a .env file, and wire the services the way
the services read their settings (every PAGEDSERVE_* variable is a real flag of that service)."""

from __future__ import annotations

import json
import re

import pytest
from deploy_helpers import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    COMPOSE_SCHEMA,
    CURVE_FILES,
    REPO,
    load_compose,
    load_compose_yaml,
    service_environment,
    strip_tags,
    variable_references,
)
from k8s_checks import check_env_parses

SERVICES = {"frontend", "nginx", "engine", "worker", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"the Compose JSON schema is not at {COMPOSE_SCHEMA} (../shared/schemas beside the checkout)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The spec declares draft-07 (by a URL spelling jsonschema does not recognise).
    draft7 = "draft-07" in schema.get("$schema", "")
    cls = jsonschema.Draft7Validator if draft7 else jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    return load_compose(COMPOSE_FILE, COMPOSE_CPU_FILE)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_files_validate_against_the_compose_schema(validator, compose, compose_cpu):
    assert not _errors(validator, compose), _errors(validator, compose)
    override = strip_tags(load_compose_yaml(COMPOSE_CPU_FILE))  # the override file on its own
    assert not _errors(validator, override), _errors(validator, override)
    assert not _errors(validator, compose_cpu), _errors(validator, compose_cpu)


def test_the_schema_check_is_not_vacuous(validator, compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["frontend"]["healthcheck"]["intervall"] = "5s"
    assert _errors(validator, broken)


def test_every_variable_has_a_default_and_is_documented_in_env_example():
    """Compose must work without a .env: every ${VAR} carries a default; .env.example lists them."""
    example = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    for path in (COMPOSE_FILE, COMPOSE_CPU_FILE):
        for name, op in variable_references(path.read_text()):
            assert op in (":-", "-"), f"{path.name}: ${{{name}}} has no default"
            assert name in documented, f"{path.name}: {name} is not in .env.example"


def test_services_and_scaling(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    front = services["frontend"]
    # `docker compose up --scale frontend=3`: no fixed name, no host port to clash on.
    assert "container_name" not in front and "ports" not in front
    assert services["nginx"]["ports"] == ["8000:8000"]
    for name, svc in services.items():
        assert svc.get("restart") in ("always", "unless-stopped"), name
    for name in ("frontend", "engine", "worker"):
        assert services[name]["command"][0] == "pagedserve" and services[name]["command"][1] == name
        assert (REPO / services[name]["build"]["dockerfile"]).is_file()


def test_addresses(compose):
    env = {name: service_environment(compose["services"][name]) for name in ("frontend", "engine", "worker")}
    assert env["frontend"]["PAGEDSERVE_ENGINE_INPUT"] == "tcp://engine:5570"
    assert env["frontend"]["PAGEDSERVE_ENGINE_OUTPUT"] == "tcp://engine:5571"
    assert (env["frontend"]["PAGEDSERVE_HOST"], env["frontend"]["PAGEDSERVE_PORT"]) == ("0.0.0.0", "8000")
    assert env["engine"]["PAGEDSERVE_FRONTEND_INPUT"] == "tcp://0.0.0.0:5570"
    assert env["engine"]["PAGEDSERVE_FRONTEND_OUTPUT"] == "tcp://0.0.0.0:5571"
    assert env["engine"]["PAGEDSERVE_WORKER_ADDR"] == "tcp://0.0.0.0:5572"
    assert env["worker"]["PAGEDSERVE_WORKER_ADDR"] == "tcp://engine:5572"
    assert env["engine"]["PAGEDSERVE_MODEL"] == env["worker"]["PAGEDSERVE_MODEL"]


def test_healthchecks_probe_the_real_endpoints(compose):
    expect = {"frontend": ":8000/health", "engine": ":8001/metrics", "worker": ":8002/metrics"}
    for name, endpoint in expect.items():
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and endpoint in " ".join(test), (name, test)
    assert service_environment(compose["services"]["engine"])["PAGEDSERVE_METRICS_PORT"] == "8001"
    assert service_environment(compose["services"]["worker"])["PAGEDSERVE_METRICS_PORT"] == "8002"


def test_gpu_reservation_and_cpu_variant(compose, compose_cpu):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    worker = compose_cpu["services"]["worker"]
    assert "deploy" not in worker, "the CPU variant must not reserve a GPU"
    env = service_environment(worker)
    assert env["PAGEDSERVE_DEVICE"] == "cpu" and env["PAGEDSERVE_DTYPE"] == "float32"
    assert env["PAGEDSERVE_MODEL"] == service_environment(compose["services"]["worker"])["PAGEDSERVE_MODEL"]
    assert "pytorch" not in worker["build"]["args"]["BASE_IMAGE"]


def test_model_cache_volume(compose):
    assert "model-cache" in compose["volumes"]
    for name in ("frontend", "engine", "worker"):
        svc = compose["services"][name]
        hf_home = service_environment(svc)["HF_HOME"]
        # The same path everywhere: frontends open the directory the engine reports.
        assert f"model-cache:{hf_home}" in svc["volumes"], name


def test_bind_mounts_exist_in_the_repo(compose):
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_monitoring_wiring(compose):
    services = compose["services"]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./monitoring/prometheus.yml"
    assert prom_mounts["/etc/prometheus/alerts.yml"] == "./monitoring/alerts.yml"
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    import yaml

    providers = yaml.safe_load((REPO / "monitoring/grafana/provisioning/dashboards/pagedserve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert grafana_mounts[path] == "./monitoring/grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    datasources = yaml.safe_load((REPO / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_nginx_renders_from_the_compose_environment(compose):
    nginx = compose["services"]["nginx"]
    env = service_environment(nginx)
    assert "./deploy/nginx/nginx.conf:/etc/nginx/templates/nginx.conf.template:ro" in nginx["volumes"]
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    template = (REPO / "deploy/nginx/nginx.conf").read_text()
    used = set(re.findall(r"\$\{(NGINX_[A-Z_]+)\}", template))
    assert used and used <= set(env), used - set(env)
    assert "resolve" in env["NGINX_UPSTREAM_SERVERS"] and "frontend:8000" in env["NGINX_UPSTREAM_SERVERS"]


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_environment_parses_with_the_services_own_flags(variant, compose, compose_cpu, model_dirs, monkeypatch):
    """Every PAGEDSERVE_* variable a service gets is one of its flags, and its value parses."""
    config = compose if variant == "gpu" else compose_cpu
    for name in ("engine", "worker", "frontend"):
        env = service_environment(config["services"][name])
        args = check_env_parses(name, env, str(model_dirs("llama")), monkeypatch)
        if name in ("engine", "worker"):
            from shared.engine_args import engine_config_from_args

            cfg = engine_config_from_args(args)
            assert cfg.scheduler.max_num_seqs == int(env["PAGEDSERVE_MAX_NUM_SEQS"])
            assert cfg.cache.enable_prefix_caching is True


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_curve_is_on_and_each_service_gets_only_its_keys(variant, compose, compose_cpu):
    config = compose if variant == "gpu" else compose_cpu
    secrets = config["secrets"]
    for name, files in CURVE_FILES.items():
        svc = config["services"][name]
        keys_dir = service_environment(svc)["PAGEDSERVE_CURVE_KEYS_DIR"]
        mounted = {}
        for ref in svc["secrets"]:
            target = ref["target"]
            assert target.startswith(keys_dir + "/"), (name, target)
            mounted[target[len(keys_dir) + 1:]] = secrets[ref["source"]]["file"]
        assert set(mounted) == files, name
        for filename, source in mounted.items():  # the file of that name from `pagedserve keys`
            assert source == f"./deploy/keys/{filename}", (name, source)
    assert ".env" in (REPO / ".gitignore").read_text() and "/deploy/keys/" in (REPO / ".gitignore").read_text()


def test_metrics_listen_beyond_loopback_only_where_prometheus_scrapes(compose, monkeypatch):
    """The services default to 127.0.0.1; compose opens /metrics on its network for Prometheus."""
    from pagedserve.cli import build_parser

    monkeypatch.delenv("PAGEDSERVE_METRICS_HOST", raising=False)
    for name in ("engine", "worker"):
        assert build_parser(name).parse_args([name]).metrics_host == "127.0.0.1"
        assert service_environment(compose["services"][name])["PAGEDSERVE_METRICS_HOST"] == "0.0.0.0"
        assert "ports" not in compose["services"][name]  # never published on the host
