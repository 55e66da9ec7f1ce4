"""Helpers for the deployment tests: the repository's deployment files and the metrics the
services export, reading Compose files the way `docker compose` does (YAML tags, variable
interpolation, merging an override file), finding the OS binaries the tests drive (nginx,
prometheus, promtool), and the PromQL in the dashboards. Service processes that die with the test
are in deploy_procs.py."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
# The Compose specification's JSON schema sits beside the checkout (CI: ../shared next to the clone).
COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_CPU_FILE = REPO / "docker-compose.cpu.yml"
K8S_DIR = REPO / "deploy" / "k8s"
MONITORING = REPO / "monitoring"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))

# The metrics the services export (every one with a model_name label; worker ones with rank too).
FRONTEND_METRICS = {
    "pagedserve_frontend_requests_total": "counter",
    "pagedserve_frontend_http_responses_total": "counter",
    "pagedserve_frontend_time_to_first_token_seconds": "histogram",
    "pagedserve_frontend_inter_token_latency_seconds": "histogram",
    "pagedserve_frontend_time_per_output_token_seconds": "histogram",
    "pagedserve_frontend_e2e_request_latency_seconds": "histogram",
    "pagedserve_frontend_prompt_tokens": "histogram",
    "pagedserve_frontend_generation_tokens": "histogram",
    "pagedserve_frontend_prompt_tokens_total": "counter",
    "pagedserve_frontend_generation_tokens_total": "counter",
    "pagedserve_frontend_requests_in_flight": "gauge",
    "pagedserve_frontend_replica_up": "gauge",
    "pagedserve_frontend_replica_requests_running": "gauge",
    "pagedserve_frontend_replica_requests_waiting": "gauge",
    "pagedserve_frontend_replica_kv_cache_usage_ratio": "gauge",
    "pagedserve_frontend_replica_routed_requests_total": "counter",
}
ENGINE_METRICS = {
    "pagedserve_engine_requests_running": "gauge",
    "pagedserve_engine_requests_waiting": "gauge",
    "pagedserve_engine_kv_cache_usage_ratio": "gauge",
    "pagedserve_engine_connected_frontends": "gauge",
    "pagedserve_engine_connected_workers": "gauge",
    "pagedserve_engine_prefix_cache_queried_tokens_total": "counter",
    "pagedserve_engine_prefix_cache_hit_tokens_total": "counter",
    "pagedserve_engine_prefix_cache_evictions_total": "counter",
    "pagedserve_engine_preemptions_total": "counter",
    "pagedserve_engine_worker_restarts_total": "counter",
    "pagedserve_engine_worker_wait_seconds_total": "counter",
    "pagedserve_engine_scheduled_tokens_per_step": "histogram",
    "pagedserve_engine_step_duration_seconds": "histogram",
    "pagedserve_engine_scheduling_overhead_seconds": "histogram",
}
WORKER_METRICS = {
    "pagedserve_worker_forward_seconds": "histogram",
    "pagedserve_worker_batch_size": "histogram",
    "pagedserve_worker_tokens_per_step": "histogram",
    "pagedserve_worker_sampling_seconds": "histogram",
    "pagedserve_worker_kv_blocks": "gauge",
    "pagedserve_worker_memory_used_bytes": "gauge",
}
ALL_METRICS = {**FRONTEND_METRICS, **ENGINE_METRICS, **WORKER_METRICS}
# exported by an engine with --speculative-config (the deploy stack runs without)
SPEC_DECODE_METRICS = {
    "pagedserve_engine_spec_decode_num_drafts_total": "counter",
    "pagedserve_engine_spec_decode_num_draft_tokens_total": "counter",
    "pagedserve_engine_spec_decode_num_accepted_tokens_total": "counter",
    "pagedserve_engine_spec_decode_num_accepted_tokens_per_pos_total": "counter",
}

# The CURVE key files each role needs (shared/auth.py), and nothing more.
CURVE_FILES = {
    "engine": {"engine.key_secret", "frontend.key", "worker.key"},
    "frontend": {"engine.key", "frontend.key_secret"},
    "worker": {"engine.key", "worker.key_secret"},
}

# What Grafana substitutes in a dashboard query, as the tests substitute it.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m", "$model": ".*"}


def find_binary(name: str) -> str | None:
    """An OS binary on PATH or in the sbin directories (where Debian puts nginx)."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


# ----- Compose ----------------------------------------------------------------------------------


class _Reset:
    """Compose's `!reset`: drop the key from the merged result."""

    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class Override:
    """Compose's `!override`: replace instead of merging."""

    def __init__(self, value: Any):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_construct_any(loader, node)))


def load_compose_yaml(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


# $$ | ${NAME} | ${NAME:-default} / -default / :?err / ?err / :+alt / +alt | $NAME
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def variable_references(text: str) -> list[tuple[str, str | None]]:
    """(name, operator) of every ${...}/$NAME in the text; operator None when there is none."""
    refs = []
    for m in _VAR.finditer(text):
        if m.group("escaped"):
            continue
        refs.append((m.group("braced") or m.group("named"), m.group("op")))
    return refs


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Substitute variables in every string of a loaded Compose file, as `docker compose` does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg, val = m.group("op"), m.group("arg") or "", env.get(name)
        if op in (":-", "-"):
            return arg if (val is None or (op == ":-" and val == "")) else val
        if op in (":+", "+"):
            return arg if (val is not None and (op == "+" or val != "")) else ""
        if op in (":?", "?") and (val is None or (op == ":?" and val == "")):
            raise ValueError(f"required variable {name} is missing: {arg}")
        return val or ""

    return _VAR.sub(sub, value)


def merge(base: Any, over: Any) -> Any:
    """Merge an override file into a base file: mappings merge key by key, anything else is
    replaced; `!reset` removes a key and `!override` replaces a whole mapping. (Compose merges a
    few sequences, such as ports, by appending; the override files here do not rely on that.)"""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = strip_tags(value)
        return out
    return strip_tags(over)


def strip_tags(value: Any, reset: Any = None) -> Any:
    """The value with `!override` unwrapped and `!reset` replaced by `reset`."""
    if value is RESET:
        return reset
    if isinstance(value, Override):
        return strip_tags(value.value, reset)
    if isinstance(value, dict):
        return {k: strip_tags(v, reset) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_tags(v, reset) for v in value]
    return value


def load_compose(*paths: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The effective configuration of `docker compose -f A -f B ...` with `env` as the
    environment (only these variables are set, as on a machine without a .env file)."""
    result: dict[str, Any] = {}
    for path in paths:
        result = merge(result, interpolate(load_compose_yaml(path), env or {}))
    return result


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings (Compose accepts a mapping or a list of NAME=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    out = {}
    for key, value in env.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[key] = "" if value is None else str(value)
    return out


def flag_env_names(command: str) -> set[str]:
    """The PAGEDSERVE_* names a `pagedserve COMMAND`'s flags read (--max-num-seqs: PAGEDSERVE_MAX_NUM_SEQS)."""
    import argparse

    from pagedserve.cli import build_parser

    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    names = set()
    for action in sub.choices[command]._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                names.add("PAGEDSERVE_" + opt[2:].replace("-", "_").upper())
    return names


# ----- PromQL in the dashboards -------------------------------------------------------------------


def dashboard_targets(path: Path) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every Prometheus query in a Grafana dashboard, rows included."""
    import json

    out = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"{panel.get('title')} / {target.get('refId')}", target["expr"]))

    walk(json.loads(path.read_text())["panels"])
    return out


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Grafana sends it, with the test's values for its variables."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


_METRIC = re.compile(r"\b(pagedserve_[a-z0-9_]+|up)\b")


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (pagedserve_* and up)."""
    return set(_METRIC.findall(expr))
