"""Fixtures for the frontend tests: a tokenizer directory (for the in-process tests), and real
stacks (`pagedserve engine` + `pagedserve worker` on the tiny llama checkpoint) with frontend
processes pointed at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from e2e_stack import Stack
from frontend_helpers import GREEDY, make_tokenizer_dir, wait_until

from pagedserve.serve import free_port


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def model_path(model_dirs) -> Path:
    return model_dirs("llama")


@pytest.fixture(scope="session")
def model_tokenizer(model_path: Path):
    """The checkpoint's own tokenizer: the one the frontends load from the path the engine reports."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


StackFactory = Callable[[], Stack]


@pytest.fixture(scope="module")
def make_stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """make_stack() -> a Stack with nothing started (no API key); every process is stopped at module end."""
    stacks: list[Stack] = []

    def make() -> Stack:
        stacks.append(Stack(model_path, tmp_path_factory.mktemp(f"stack-{len(stacks)}-logs")))
        return stacks[-1]

    yield make
    for st in stacks:
        st.close()


@pytest.fixture(scope="session")
def backend(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real engine + worker (ENGINE_FLAGS) for every module that leaves them running: starting
    a worker costs more than the tests of most modules."""
    st = Stack(model_path, tmp_path_factory.mktemp("backend-logs"))
    st.start_worker()
    st.start_engine()
    yield st
    st.close()


@pytest.fixture(scope="module")
def stack(backend: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared engine and worker, with this module's own frontends (stopped at module end)."""
    backend.check_running()  # an earlier module that took it down fails here, not obscurely later
    st = backend.sharing(tmp_path_factory.mktemp("stack-logs"))
    yield st
    st.close()


@pytest.fixture(scope="module")
def frontend(stack: Stack) -> str:
    """Base URL of one frontend serving the module's real engine."""
    proc = stack.start_frontend("fe-main")
    wait_until(f"{stack.base}/health", proc, timeout=120)
    return stack.base


@pytest.fixture(scope="module")
def client(frontend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{frontend}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def greedy(client, model):
    """greedy(prompt, n_tokens) -> the model's greedy completion text (ignoring EOS), asked once."""
    cache: dict[tuple, str] = {}

    def get(prompt: str, n_tokens: int) -> str:
        if (prompt, n_tokens) not in cache:
            out = client.completions.create(model=model, prompt=prompt, max_tokens=n_tokens, **GREEDY)
            assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == n_tokens
            cache[prompt, n_tokens] = out.choices[0].text
        return cache[prompt, n_tokens]

    return get


@pytest.fixture(scope="module")
def tools_base(stack: Stack) -> str:
    """Base URL of a frontend with the hermes tool parser and auto tool choice on."""
    port = free_port()
    proc = stack.start_frontend("fe-tools", "--enable-auto-tool-choice", "--tool-call-parser", "hermes", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"
