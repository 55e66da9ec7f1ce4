"""Multi-LoRA through the real stack (engine, worker and frontend processes, --enable-lora): a
request picks an adapter by `model` and gets the offline engine's tokens for it; /v1/models lists
adapters with their parent; an unknown name is a 404; adapters load and unload at run time
(VLLM_ALLOW_RUNTIME_LORA_UPDATING), a bad one gets a 400 and serving carries on."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_stack import ENGINE_FLAGS
from frontend_helpers import metric_labels

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.test_lora import make_test_adapter, make_test_adapters

LORA_FLAGS = ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16")
PROMPT = "def main(argv):"


@pytest.fixture(scope="module")
def adapters(model_path: Path, tmp_path_factory) -> list[Path]:
    return make_test_adapters(model_path, 2, out_dir=tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def lora_stack(make_stack, adapters):
    stack = make_stack()
    stack.engine_flags = ENGINE_FLAGS + LORA_FLAGS
    previous = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    try:
        stack.start_worker()
        stack.start_engine()
        proc = stack.start_frontend("fe-lora", "--lora-modules", f"ada={adapters[0]}")
    finally:
        if previous is None:
            del os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
        else:
            os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = previous
    stack.wait_frontend_ready("fe-lora", proc)
    return stack


@pytest.fixture(scope="module")
def lora_base(lora_stack) -> str:
    return lora_stack.base


def _complete(base: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def _offline(model_path: Path, adapters: list[Path]) -> list[str]:
    llm = LLM(str(model_path), max_model_len=1024, kv_cache_memory=16 << 20, enable_lora=True, max_loras=2)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    loras = [None] + [LoRARequest(f"x{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    return [o.outputs[0].text for o in llm.generate([PROMPT] * 3, params, use_tqdm=False, lora_request=loras)]


def test_adapters_by_model_name(lora_base, model_path, adapters):
    models = httpx.get(f"{lora_base}/v1/models", timeout=10).json()["data"]
    base_name = models[0]["id"]
    assert [(m["id"], m["parent"]) for m in models] == [(base_name, None), ("ada", base_name)]
    assert models[1]["root"] == str(adapters[0].resolve())
    offline = _offline(model_path, adapters)
    assert _complete(lora_base, base_name).json()["choices"][0]["text"] == offline[0]
    answer = _complete(lora_base, "ada").json()
    assert answer["model"] == "ada" and answer["choices"][0]["text"] == offline[1] != offline[0]
    missing = _complete(lora_base, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    load = httpx.post(f"{lora_base}/v1/load_lora_adapter", json={"lora_name": "adb", "lora_path": str(adapters[1])})
    assert load.status_code == 200, load.text
    assert _complete(lora_base, "adb").json()["choices"][0]["text"] == offline[2]
    assert "adb" in [m["id"] for m in httpx.get(f"{lora_base}/v1/models", timeout=10).json()["data"]]
    again = httpx.post(f"{lora_base}/v1/load_lora_adapter", json={"lora_name": "adb", "lora_path": str(adapters[1])})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert httpx.post(f"{lora_base}/v1/unload_lora_adapter", json={"lora_name": "adb"}).status_code == 200
    assert _complete(lora_base, "adb").status_code == 404
    gone = httpx.post(f"{lora_base}/v1/unload_lora_adapter", json={"lora_name": "adb"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_bad_adapters_get_400_and_serving_carries_on(lora_base, model_path, adapters, tmp_path):
    src = adapters[0]
    rank_64 = make_test_adapter(model_path, tmp_path / "r64", rank=64)
    lacking, corrupt = tmp_path / "lacking", tmp_path / "corrupt"
    shutil.copytree(src, lacking)
    config = json.loads((src / "adapter_config.json").read_text())
    (lacking / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj", "embed_tokens"]}))
    shutil.copytree(src, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    cases = [(rank_64, "max_lora_rank"), (lacking, "embed_tokens"), (corrupt, "corrupt"),
             (tmp_path / "absent", "adapter_config.json")]
    for path, message in cases:
        r = httpx.post(f"{lora_base}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    hostile = httpx.post(f"{lora_base}/v1/load_lora_adapter", json={"lora_name": "", "lora_path": 5})
    assert hostile.status_code == 400
    assert _complete(lora_base, "bad").status_code == 404
    assert _complete(lora_base, "ada").status_code == 200  # still serving


def test_lora_info_gauge_tells_running_and_waiting_adapters(lora_stack, adapters):
    """The gateway's LoRA gauge under a mixed load: max_lora is the engine's --max-loras (2); with
    the base model and three adapters streaming at once, two adapters run, the third waits (and
    does not hold up the base model); when the streams end, none is left running or waiting."""
    base = lora_stack.base
    for name, path in (("mixb", adapters[1]), ("mixc", adapters[0])):  # the same folder under another name
        r = httpx.post(f"{base}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        assert r.status_code == 200, r.text
    models = ["ada", "mixb", "mixc", httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]]
    stop = threading.Event()
    streamed: dict[str, int] = {}

    def stream(model: str) -> None:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as response:
            for _ in response.iter_lines():
                streamed[model] = streamed.get(model, 0) + 1
                if stop.is_set():
                    return  # closing the stream aborts the request

    def gauge() -> tuple[str, list[str], list[str]]:
        info = metric_labels(lora_stack.metrics("fe-lora"), "pagedserve_frontend_lora_requests_info")
        return info["max_lora"], _names(info["running_lora_adapters"]), _names(info["waiting_lora_adapters"])

    seen = []
    with ThreadPoolExecutor(len(models)) as pool:
        futures = [pool.submit(stream, m) for m in models]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (seen and len(seen[-1][1]) == 2 and len(seen[-1][2]) == 1):
            seen.append(gauge())
            time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    max_lora, running, waiting = seen[-1]
    assert max_lora == "2" and len(running) == 2 and len(waiting) == 1, seen
    assert sorted(running + waiting) == ["ada", "mixb", "mixc"]
    assert streamed[models[3]] > 1  # the base model streamed meanwhile
    deadline = time.monotonic() + 30
    while gauge()[1:] != ([], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gauge() == ("2", [], [])
    for name in ("mixb", "mixc"):
        assert httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def _names(label: str) -> list[str]:
    return sorted(n for n in label.split(",") if n)
