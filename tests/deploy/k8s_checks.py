"""Checks the Kubernetes manifest tests share: core kinds against kubernetes-validate's schemas,
custom resources against the CRDs in ../shared/schemas/crds/, and a container's environment parsed
by the real `pagedserve <service>` command line."""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest
import yaml
from deploy_helpers import REPO, flag_env_names

CRD_DIR = REPO.parent / "shared" / "schemas" / "crds"
GLOBAL_ENV = {"PAGEDSERVE_LOG_LEVEL"}  # read by every service, not by a flag


def validate_core_kinds(docs: list[tuple[str, dict]], skip: set[tuple[str, str]]) -> int:
    """Validate every (file, doc) strictly against the newest Kubernetes schema kubernetes-validate
    ships, except the (apiVersion, kind) pairs in ``skip``; the number checked."""
    import kubernetes_validate.utils as kv

    version, checked = kv.latest_version(), 0
    for name, doc in docs:
        if (doc["apiVersion"], doc["kind"]) in skip:
            continue
        try:
            kv.validate(doc, version, True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: {exc}")
        checked += 1
    return checked


def crd_schema(file_name: str, version: str) -> dict:
    """The openAPIV3Schema of one version of a CRD in ../shared/schemas/crds/."""
    crd = yaml.safe_load((CRD_DIR / file_name).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def unknown_fields(doc: Any, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server would prune them: a typo, silently lost)."""
    if isinstance(doc, dict) and "properties" in schema:
        out = []
        for key, value in doc.items():
            if key in schema["properties"]:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not (path == "" and key in ("apiVersion", "kind", "metadata")):
                out.append(f"{path}.{key}")
        return out
    if isinstance(doc, list) and "items" in schema:
        return [u for i, item in enumerate(doc) for u in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def check_custom_resource(doc: dict, schema: dict) -> None:
    """Raises jsonschema.ValidationError unless ``doc`` validates and declares no unknown field
    (the x-kubernetes-* keys are annotations to jsonschema)."""
    import jsonschema

    jsonschema.validate(doc, schema)
    extra = unknown_fields(doc, schema)
    if extra:
        raise jsonschema.ValidationError(f"unknown fields {extra}")


def container_env(container: dict, configs: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment: its envFrom ConfigMaps, then its env (ConfigMap keys resolved,
    a downward-API field taken as "0", the pod index)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configs[source["configMapRef"]["name"]])
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("configMapKeyRef")
        if ref:
            assert ref["key"] in configs[ref["name"]], e
            env[e["name"]] = configs[ref["name"]][ref["key"]]
        elif "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "0"
    return env


def check_env_parses(
    service: str, env: dict[str, str], model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace:
    """Every PAGEDSERVE_* variable of ``env`` names a flag of ``service``, and `pagedserve
    <service>` parses with that environment alone (``model_dir`` standing in for the model the
    environment names); the parsed flags."""
    from pagedserve.cli import build_parser

    unknown = {k for k in env if k.startswith("PAGEDSERVE_")} - flag_env_names(service) - GLOBAL_ENV
    assert not unknown, f"{service}: no flag reads {sorted(unknown)}"
    for key in [k for k in os.environ if k.startswith("PAGEDSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "PAGEDSERVE_MODEL" in env:
        monkeypatch.setenv("PAGEDSERVE_MODEL", model_dir)
    return build_parser(service).parse_args([service])
