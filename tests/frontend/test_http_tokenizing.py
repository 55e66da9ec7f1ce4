"""Tokenizing at the HTTP boundary, through real frontends on a real engine: text that cannot fit
the context is refused before it is tokenized, a large tokenization does not hold up small
requests, and chat templates sent by clients are refused unless trusted, then bounded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import psutil
import pytest
from frontend_helpers import wait_until
from test_http_tokenizer_bound import lossy_tokenizer_dir

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(240)

MAX_MODEL_LEN = 1024  # e2e_stack.ENGINE_FLAGS
MESSAGES = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def trusting(stack) -> str:
    """A frontend that renders client chat templates (bounded to 3 s each)."""
    port = free_port()
    proc = stack.start_frontend("fe-trusting", "--trust-request-chat-template", "--chat-template-timeout", "3",
                                port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"


def _post(url: str, body: object) -> httpx.Response:
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=120)


def _in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    """Run ``fn`` on a thread; the list gets its response (or its connection error) when done."""
    out: list[httpx.Response | Exception] = []

    def run() -> None:
        try:
            out.append(fn())
        except httpx.HTTPError as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _max_token_bytes(model_tokenizer) -> int:
    return max(len(t.encode()) for t in model_tokenizer.get_vocab())


def test_text_that_cannot_fit_is_refused_before_tokenizing(frontend, model_tokenizer):
    """Past max_model_len tokens' worth of bytes the error says 'at least': no token was counted."""
    too_long = "a" * ((MAX_MODEL_LEN - 1) * _max_token_bytes(model_tokenizer) + 1)
    for path, body, param in (
        ("/v1/completions", {"prompt": too_long, "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", too_long], "max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}, "messages"),
    ):
        resp = _post(f"{frontend}{path}", body)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert (err["param"], err["code"]) == (param, "context_length_exceeded")
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"] and "at least" in err["message"]


def test_text_within_the_byte_bound_is_counted_exactly(frontend, model_tokenizer):
    text = "hello world " * 600  # far fewer bytes than the bound, more tokens than the context
    n_tokens = len(model_tokenizer.encode(text))
    assert n_tokens >= MAX_MODEL_LEN
    resp = _post(f"{frontend}/v1/completions", {"prompt": text, "max_tokens": 1})
    err = resp.json()["error"]
    assert err["code"] == "context_length_exceeded" and f"is {n_tokens} tokens long" in err["message"]
    # /tokenize counts any text, as vLLM's does
    assert _post(f"{frontend}/tokenize", {"prompt": text}).json()["count"] == n_tokens


def test_no_text_is_refused_unread_with_a_tokenizer_that_drops_input(stack, tmp_path):
    """The byte bound holds only for tokenizers that keep their input: with one that drops
    whitespace, 100 kB of spaces is one token, and is served."""
    port = free_port()
    proc = stack.start_frontend("fe-lossy", "--tokenizer", str(lossy_tokenizer_dir(tmp_path)), port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    resp = _post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": " " * 100_000 + "hello", "max_tokens": 1})
    assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == 1, resp.text
    proc.terminate()


def _words(n: int, seed: int = 0) -> str:
    return " ".join(f"w{(i + seed) % 997}x{i % 13}" for i in range(n))


def _wait_out_behind(big_request: Callable[[], httpx.Response], frontend: str) -> httpx.Response:
    """Start ``big_request``, then a small completion while it is tokenized: the small one must
    be answered first. Returns the big one's response."""
    thread, big = _in_background(big_request)
    thread.join(1.0)  # the big one has arrived and is being tokenized
    assert not big
    small = _post(f"{frontend}/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
    assert not big, "the small request waited for the large one"
    thread.join(200)
    return big[0]


def test_a_large_tokenization_does_not_hold_up_small_requests(frontend, model_tokenizer):
    words = _words(300_000)  # ~2.5 MB, seconds of tokenizing
    big = _wait_out_behind(lambda: _post(f"{frontend}/tokenize", {"prompt": words}), frontend)
    assert big.status_code == 200 and big.json()["count"] == len(model_tokenizer.encode(words))


def test_many_prompts_count_as_one_large_request(frontend):
    """64 prompts, each small enough on its own, tokenized as one large job."""
    prompts = [_words(5_000, seed) for seed in range(64)]  # ~40 kB each, each over the context
    big = _wait_out_behind(lambda: _post(f"{frontend}/v1/completions", {"prompt": prompts, "max_tokens": 1}),
                           frontend)
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded"


def test_client_templates_are_refused_unless_trusted(frontend):
    for body in ({"messages": MESSAGES, "chat_template": "{{ 'x' }}"},
                 {"messages": MESSAGES, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}):
        for path in ("/v1/chat/completions", "/tokenize"):
            resp = _post(f"{frontend}{path}", body)
            assert resp.status_code == 400, resp.text
            err = resp.json()["error"]
            assert err["param"] == "chat_template" and "--trust-request-chat-template" in err["message"]
    refused = _post(f"{frontend}/v1/responses", {"input": "hi", "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"


def test_template_kwargs_cannot_steer_the_server(frontend):
    """chat_template_kwargs are template variables; apply_chat_template's own options, and the
    conversation itself (a `messages` kwarg had been a 500), stay ours."""
    plain = _post(f"{frontend}/tokenize", {"messages": MESSAGES}).json()
    odd = {"tokenize": True, "return_dict": True, "return_tensors": "np", "padding": "max_length", "max_length": 3,
           "truncation": True, "messages": 5, "conversations": 5, "tokenizer": 5}
    for path in ("/tokenize", "/v1/chat/completions"):
        steered = _post(f"{frontend}{path}", {"messages": MESSAGES, "chat_template_kwargs": odd, "max_tokens": 1})
        assert steered.status_code == 200, steered.text
    assert _post(f"{frontend}/tokenize", {"messages": MESSAGES, "chat_template_kwargs": odd}).json() == plain


def test_trusted_client_template_renders(trusting, model_tokenizer):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
    want = model_tokenizer.encode(f"[user] hi\n{model_tokenizer.eos_token}", add_special_tokens=False)
    resp = _post(f"{trusting}/tokenize", {"messages": MESSAGES, "chat_template": template})
    assert resp.status_code == 200 and resp.json()["tokens"] == want
    chat = _post(f"{trusting}/v1/chat/completions", {"messages": MESSAGES, "chat_template": template,
                                                       "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    plain = _post(f"{trusting}/v1/completions", {"prompt": want, "max_tokens": 3, "temperature": 0,
                                                 "ignore_eos": True})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(want)
    assert chat.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["text"]
    # the sandbox renders the template alone: apply_chat_template's open last message is not there
    open_last = _post(f"{trusting}/v1/chat/completions", {"messages": MESSAGES, "chat_template": template,
                                                            "continue_final_message": True,
                                                            "add_generation_prompt": False, "max_tokens": 3})
    assert open_last.status_code == 400 and open_last.json()["error"]["param"] == "continue_final_message"


def test_reasoning_effort_reaches_the_template(trusting, model_tokenizer):
    """Chat's reasoning_effort (and a response's reasoning.effort) is a template variable;
    chat_template_kwargs' own reasoning_effort wins."""
    template = "{{ messages[0]['content'] }}|{{ reasoning_effort }}"

    def prompt_tokens(path: str, body: dict) -> int:
        resp = _post(f"{trusting}{path}", {"chat_template": template, "max_tokens": 1, "max_output_tokens": 1} | body)
        assert resp.status_code == 200, resp.text
        return resp.json()["usage"]["prompt_tokens" if path.endswith("completions") else "input_tokens"]

    def count(text: str) -> int:
        return len(model_tokenizer.encode(text, add_special_tokens=False))

    chat = "/v1/chat/completions"
    assert prompt_tokens(chat, {"messages": MESSAGES, "reasoning_effort": "high"}) == count("hi|high")
    assert prompt_tokens(chat, {"messages": MESSAGES}) == count("hi|")
    assert prompt_tokens(chat, {"messages": MESSAGES, "reasoning_effort": "high",
                                "chat_template_kwargs": {"reasoning_effort": "minimal"}}) == count("hi|minimal")
    in_kwargs = {"chat_template_kwargs": {"chat_template": template}}  # the Responses API's way to send one
    assert prompt_tokens("/v1/responses", {"input": "hi", "reasoning": {"effort": "medium"}, **in_kwargs}) == count(
        "hi|medium")
    bad = _post(f"{trusting}{chat}", {"messages": MESSAGES, "reasoning_effort": "extreme"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"


@pytest.mark.parametrize("template", [
    NESTED_LOOPS,
    "{{ 'x' * 500000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 2 ** 99999999 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for m in messages %}",
    "{{ '\\ud800' }}",  # a lone surrogate, which no tokenizer takes (had been a 500)
])
def test_hostile_client_templates_get_400_while_others_are_served(trusting, template):
    thread, bad = _in_background(lambda: _post(f"{trusting}/v1/chat/completions",
                                               {"messages": MESSAGES, "chat_template": template, "max_tokens": 1}))
    small = _post(f"{trusting}/v1/completions", {"prompt": "Hello", "max_tokens": 1})
    assert small.status_code == 200
    thread.join(60)
    assert bad and bad[0].status_code == 400, bad
    assert bad[0].json()["error"]["param"] == "chat_template"
    # the sandbox is back for the next template
    ok = _post(f"{trusting}/tokenize", {"messages": MESSAGES, "chat_template": "{{ messages[0].content }}"})
    assert ok.status_code == 200 and ok.json()["count"] > 0


def test_a_template_that_outruns_its_deadline_does_not_hold_up_others(trusting):
    thread, bad = _in_background(lambda: _post(f"{trusting}/tokenize",
                                               {"messages": MESSAGES, "chat_template": NESTED_LOOPS}))
    thread.join(1.0)  # rendering, with 2 s left
    small = _post(f"{trusting}/tokenize", {"prompt": "Hello"})
    assert small.status_code == 200
    assert not bad, "the small request waited for the template"
    thread.join(60)
    assert bad[0].status_code == 400 and "longer than 3 s" in bad[0].json()["error"]["message"]


def test_a_rendering_template_dies_with_its_frontend(stack):
    """SIGKILL to a frontend whose sandbox is stuck in a template: the sandbox goes too."""
    port = free_port()
    proc = stack.start_frontend("fe-doomed", "--trust-request-chat-template", "--chat-template-timeout", "120",
                                port=port)
    base = f"http://127.0.0.1:{port}"
    wait_until(f"{base}/health", proc, timeout=120)
    _in_background(lambda: _post(f"{base}/tokenize", {"messages": MESSAGES, "chat_template": NESTED_LOOPS}))
    frontend = psutil.Process(proc.popen.pid)
    deadline = time.monotonic() + 60
    while not (children := frontend.children()):
        assert time.monotonic() < deadline, "no sandbox started"
        time.sleep(0.1)
    sandbox = children[0]
    assert not _gone(sandbox)
    proc.popen.kill()
    proc.popen.wait(30)
    deadline = time.monotonic() + 30
    while not _gone(sandbox):
        assert time.monotonic() < deadline, "the sandbox outlived its frontend"
        time.sleep(0.1)


def _gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (a zombie counts: nothing may reap it here)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
