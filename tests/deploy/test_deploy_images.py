"""deploy/docker: what each image carries, checked without building it. The frontend and engine
images install the package with --no-deps plus a requirements file; here those requirement sets
are resolved against the installed distributions' metadata (no torch may be reachable), and the
service is imported by a Python that sees only those distributions and the repository, as the
image's Python would."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from deploy_helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKER = REPO / "deploy" / "docker"
TORCH_LIKE = re.compile(r"^(torch|triton|nvidia-.*|pytorch-.*)$")


def _requirements(path: Path) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def _closure(requirements: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions a requirement set pulls in, transitively (markers evaluated)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [(r, set(r.extras)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is required but not installed in this environment")
        seen[name] = dist
        for dep in dist.requires or []:
            dep_req = Requirement(dep)
            if dep_req.marker is None or any(dep_req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((dep_req, set(dep_req.extras)))
    return seen


def _sandbox(dists: dict[str, metadata.Distribution], root: Path) -> Path:
    """A directory holding links to exactly these distributions' top-level files."""
    site = root / "site"
    site.mkdir()
    for dist in dists.values():
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (site / top).exists():
                (site / top).symlink_to(target)
    return site


def _run_isolated(site: Path, code: str) -> subprocess.CompletedProcess:
    # -S: no site-packages; -s: no user site. Only the stdlib, the sandbox and the repository.
    env = {"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-S", "-s", "-c", textwrap.dedent(code)], check=False, capture_output=True,
                          text=True, env=env, cwd=site, timeout=120)


def _dockerfile(name: str) -> str:
    return (DOCKER / f"{name}.Dockerfile").read_text()


@pytest.mark.parametrize("role", ["frontend", "engine"])
def test_torch_free_images_install_the_package_without_dependencies(role):
    text = _dockerfile(role)
    assert re.search(r"pip install --no-deps \.", text), f"{role}: install the package with --no-deps"
    assert f"deploy/docker/requirements-{role}.txt" in text
    names = {canonicalize_name(r.name) for r in _requirements(DOCKER / f"requirements-{role}.txt")}
    assert not {n for n in names if TORCH_LIKE.match(n)}, names
    assert re.search(r"^CMD \[\"pagedserve\", \"" + role + r"\"\]", text, re.MULTILINE)


@pytest.mark.parametrize("role", ["frontend", "engine"])
def test_requirements_reach_no_torch(role):
    closure = _closure(_requirements(DOCKER / f"requirements-{role}.txt"))
    torchy = sorted(n for n in closure if TORCH_LIKE.match(n))
    assert not torchy, f"the {role} image would pull in {torchy}"


def test_frontend_requirements_are_the_package_dependencies():
    """--no-deps means the requirements file is the whole list: it must name every dependency."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    have = {canonicalize_name(r.name) for r in _requirements(DOCKER / "requirements-frontend.txt")}
    assert wanted == have, f"missing {sorted(wanted - have)}, extra {sorted(have - wanted)}"
    engine = {canonicalize_name(r.name) for r in _requirements(DOCKER / "requirements-engine.txt")}
    assert engine <= wanted


def test_engine_runs_on_its_requirements_alone(model_dirs, tmp_path):
    site = _sandbox(_closure(_requirements(DOCKER / "requirements-engine.txt")), tmp_path)
    proc = _run_isolated(site, f"""
        import sys
        from pagedserve.cli import build_parser
        from shared.engine_args import engine_config_from_args
        import services.engine.service
        args = build_parser("engine").parse_args(["engine", "--model", {str(model_dirs("llama"))!r}])
        config = engine_config_from_args(args)
        assert config.model.architecture, config
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "fastapi"))
        assert not bad, bad
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_frontend_runs_on_its_requirements_alone(model_dirs, tmp_path):
    site = _sandbox(_closure(_requirements(DOCKER / "requirements-frontend.txt")), tmp_path)
    proc = _run_isolated(site, f"""
        import sys
        from pagedserve.cli import build_parser
        from services.frontend.app import build_app
        from services.frontend.state import FrontendConfig
        from shared.processor.tokenizer import load_tokenizer
        build_parser("frontend").parse_args(["frontend"])
        build_app(FrontendConfig(engine_inputs=("tcp://127.0.0.1:1",), engine_outputs=("tcp://127.0.0.1:2",)))
        tok = load_tokenizer({str(model_dirs("llama"))!r})
        assert tok.encode("hello world")
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_worker_image_is_on_a_cuda_pytorch_base():
    text = _dockerfile("worker")
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.MULTILINE)
    # The pinned torch the tests run against, kept in step with the base image's tag.
    makefile_torch = re.search(r"torch==([\d.]+)", (REPO / "Makefile").read_text()).group(1)
    assert base.split(":")[1].startswith(makefile_torch + "-")
    assert re.search(r'^CMD \["pagedserve", "worker"\]', text, re.MULTILINE)


def test_build_context_leaves_out_local_state():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "tests"} <= ignored
    for name in ("frontend", "engine", "worker"):
        for src in re.findall(r"^COPY (\S+)", _dockerfile(name), re.MULTILINE):
            assert (REPO / src).exists(), (name, src)
            assert src.split("/")[0] not in ignored, (name, src)
