"""Fixtures for the frontend tests: a tokenizer directory, a scripted engine, and frontend
processes pointed at it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from frontend_helpers import Proc, free_port, frontend_args, make_tokenizer_dir, wait_until

SCRIPT_TEXT = " one two three four five six seven eight nine ten. Hello world!"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def fake_engine(tokenizer_dir: Path, tokenizer) -> Iterator[FakeEngine]:
    script = tokenizer.encode(SCRIPT_TEXT)
    with FakeEngine(str(tokenizer_dir), script, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id) as eng:
        yield eng


ProcFactory = Callable[..., Proc]


@pytest.fixture(scope="module")
def start_frontend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcFactory]:
    """start_frontend(port, engine, *flags) -> Proc; every process is stopped at module end."""
    procs: list[Proc] = []
    logs = tmp_path_factory.mktemp("frontend-logs")

    def start(port: int, engine: FakeEngine, *extra: str, env: dict[str, str] | None = None) -> Proc:
        log = logs / f"frontend-{len(procs)}.log"
        proc = Proc(frontend_args(port, engine.input_addr, engine.output_addr, *extra), log, env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()


@pytest.fixture(scope="module")
def frontend(fake_engine: FakeEngine, start_frontend: ProcFactory) -> str:
    """Base URL of one frontend serving the scripted engine."""
    port = free_port()
    proc = start_frontend(port, fake_engine)
    base = f"http://127.0.0.1:{port}"
    wait_until(f"{base}/health", proc)
    return base
