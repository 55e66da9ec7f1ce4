"""vLLM's request extras echo (chat), add_special_tokens, return_token_ids, documents (chat) and
request_id on /v1/completions and /v1/chat/completions, through frontends against the real engine
and worker (the tiny llama checkpoint): each field's effect, whole and streamed alike, and hostile
values as a 400 naming the field, the service answering after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from frontend_helpers import wait_until

from pagedserve.serve import free_port

pytestmark = pytest.mark.timeout(120)

PROMPT = "Hello there, my friend"
MESSAGES = [{"role": "user", "content": PROMPT}]
GREEDY = {"temperature": 0.0, "ignore_eos": True}
# the server's template on the `bos` frontend: documents first, then the messages
DOC_TEMPLATE = ("{% for d in documents or [] %}[{{ d['title'] }}] {{ d['text'] }}\n{% endfor %}"
                "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")
DOCUMENTS = [{"title": "Pages", "text": "KV blocks are pages."}, {"title": "Fox", "text": "It jumps."}]


def _post(base: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=60)


def _chunks(base: str, path: str, body: dict, headers: dict | None = None) -> list[dict]:
    """A streamed answer's chunks (its data events before [DONE])."""
    resp = _post(base, path, {**body, "stream": True}, headers)
    assert resp.status_code == 200, resp.text
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _chat_text(chunks: list[dict], index: int = 0) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"] and c["choices"][0]["index"] == index)


def _rendered(documents: list[dict[str, str]] | tuple = ()) -> str:
    """MESSAGES (and documents) as DOC_TEMPLATE renders them, with a generation prompt."""
    return "".join(f"[{d['title']}] {d['text']}\n" for d in documents) + f"<user> {PROMPT}\n<assistant> "


@pytest.fixture(scope="module")
def bos_tokenizer_dir(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint's tokenizer, but one that puts <|endoftext|> in front of every text it
    encodes with special tokens (as a BOS): add_special_tokens then shows in the counts."""
    from tokenizers import Tokenizer, processors

    out = tmp_path_factory.mktemp("bos-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_path / name).is_file():
            shutil.copy(model_path / name, out / name)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def bos_tokenizer(bos_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_tokenizer_dir)


@pytest.fixture(scope="module")
def bos(stack, bos_tokenizer_dir: Path) -> str:
    """A frontend with the BOS-adding tokenizer, a server template that reads `documents`, and
    client templates trusted."""
    port = free_port()
    proc = stack.start_frontend("fe-bos", "--tokenizer", str(bos_tokenizer_dir), "--chat-template", DOC_TEMPLATE,
                                "--trust-request-chat-template", "--chat-template-timeout", "3", port=port)
    wait_until(f"http://127.0.0.1:{port}/health", proc, timeout=120)
    return f"http://127.0.0.1:{port}"


# ----- echo (chat) ---------------------------------------------------------------------------


def test_chat_echo_starts_with_the_last_message_of_the_answers_role(frontend):
    """vLLM's rule: the answer's role is the server's with a generation prompt, else the last
    message's; echo puts the last message's content first when the roles match."""
    prefix = "Sure, here it is:"
    open_last = {"messages": [*MESSAGES, {"role": "assistant", "content": prefix}], "max_tokens": 6, **GREEDY,
                 "add_generation_prompt": False, "continue_final_message": True}
    plain = _post(frontend, "/v1/chat/completions", open_last).json()["choices"][0]["message"]
    echoed = _post(frontend, "/v1/chat/completions", {**open_last, "echo": True}).json()["choices"][0]["message"]
    assert echoed == {**plain, "content": prefix + plain["content"]}
    chunks = _chunks(frontend, "/v1/chat/completions", {**open_last, "echo": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": prefix}
    assert _chat_text(chunks) == echoed["content"]
    # with a generation prompt the answer is the assistant's: a user's last message is not echoed
    asked = {"messages": MESSAGES, "max_tokens": 4, **GREEDY}
    answer = _post(frontend, "/v1/chat/completions", asked).json()["choices"][0]["message"]
    assert _post(frontend, "/v1/chat/completions", {**asked, "echo": True}).json()["choices"][0]["message"] == answer
    assert _chat_text(_chunks(frontend, "/v1/chat/completions", {**asked, "echo": True})) == answer["content"]
    # without one, the answer goes on in the last message's role, and echo repeats that message
    on = {**asked, "add_generation_prompt": False, "echo": True, "n": 2}
    whole = _post(frontend, "/v1/chat/completions", on).json()["choices"]
    assert [c["message"]["role"] for c in whole] == ["user", "user"]
    assert all(c["message"]["content"].startswith(PROMPT) for c in whole)
    streamed = _chunks(frontend, "/v1/chat/completions", on)
    assert [_chat_text(streamed, i) for i in (0, 1)] == [c["message"]["content"] for c in whole]


# ----- add_special_tokens --------------------------------------------------------------------


def test_add_special_tokens(bos, bos_tokenizer):
    with_bos, without = bos_tokenizer.encode(PROMPT), bos_tokenizer.encode(PROMPT, add_special_tokens=False)
    assert len(with_bos) == len(without) + 1
    body = {"prompt": PROMPT, "max_tokens": 1}
    counts = [_post(bos, "/v1/completions", {**body, **extra}).json()["usage"]["prompt_tokens"]
              for extra in ({}, {"add_special_tokens": True}, {"add_special_tokens": False})]
    assert counts == [len(with_bos), len(with_bos), len(without)]
    ids_prompt = _post(bos, "/v1/completions", {**body, "prompt": without, "add_special_tokens": True}).json()
    assert ids_prompt["usage"]["prompt_tokens"] == len(without)  # token ids are taken as they are
    # chat: the template's text alone by default; with add_special_tokens the tokenizer's BOS too
    text = _rendered()  # the frontend's template
    chat = {"messages": MESSAGES, "max_tokens": 1}
    counts = [_post(bos, "/v1/chat/completions", {**chat, **extra}).json()["usage"]["prompt_tokens"]
              for extra in ({}, {"add_special_tokens": False}, {"add_special_tokens": True})]
    plain = len(bos_tokenizer.encode(text, add_special_tokens=False))
    assert counts == [plain, plain, len(bos_tokenizer.encode(text))] and counts[2] == plain + 1


# ----- return_token_ids ----------------------------------------------------------------------


def test_completions_return_token_ids(frontend, model_tokenizer):
    prompts = [PROMPT, "Once upon a time"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 5, **GREEDY, "return_token_ids": True}
    whole = _post(frontend, "/v1/completions", body).json()
    for choice in whole["choices"]:
        assert choice["prompt_token_ids"] == model_tokenizer.encode(prompts[choice["index"] // 2])
        assert len(choice["token_ids"]) == 5 and model_tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    streamed: dict[int, list[int]] = {}
    for chunk in _chunks(frontend, "/v1/completions", body):
        (choice,) = chunk["choices"]
        i = choice["index"]
        assert ("prompt_token_ids" in choice) == (i not in streamed)  # the choice's first chunk only
        if i not in streamed:
            assert choice["prompt_token_ids"] == whole["choices"][i]["prompt_token_ids"]
        streamed.setdefault(i, []).extend(choice["token_ids"])
    assert streamed == {c["index"]: c["token_ids"] for c in whole["choices"]}
    # echo streams the prompt first: its chunk carries the prompt's ids
    echoed = _chunks(frontend, "/v1/completions", {**body, "prompt": PROMPT, "n": 1, "echo": True})
    assert echoed[0]["choices"][0]["text"] == PROMPT
    assert echoed[0]["choices"][0]["prompt_token_ids"] == model_tokenizer.encode(PROMPT)
    off = _post(frontend, "/v1/completions", {**body, "return_token_ids": False}).json()["choices"][0]
    assert off["prompt_token_ids"] is None and off["token_ids"] is None
    assert all("token_ids" not in c["choices"][0] for c in _chunks(frontend, "/v1/completions", {
        **body, "return_token_ids": None}) if c["choices"])


def test_chat_return_token_ids(frontend, model_tokenizer):
    body = {"messages": MESSAGES, "max_tokens": 5, **GREEDY, "return_token_ids": True}
    text = model_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    whole = _post(frontend, "/v1/chat/completions", body).json()
    assert whole["prompt_token_ids"] == model_tokenizer.encode(text, add_special_tokens=False)
    (choice,) = whole["choices"]
    assert len(choice["token_ids"]) == 5
    assert model_tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["message"]["content"]
    chunks = _chunks(frontend, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]  # beside the choices, in the role chunk
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == choice["token_ids"]
    assert _chat_text(chunks) == choice["message"]["content"]
    off = _post(frontend, "/v1/chat/completions", {**body, "return_token_ids": False}).json()
    assert off["prompt_token_ids"] is None and off["choices"][0]["token_ids"] is None


# ----- documents (chat) ----------------------------------------------------------------------


def test_documents_reach_the_template(bos, bos_tokenizer):
    body = {"messages": MESSAGES, "max_tokens": 2, "documents": DOCUMENTS, "return_token_ids": True}
    want = bos_tokenizer.encode(_rendered(DOCUMENTS), add_special_tokens=False)
    server = _post(bos, "/v1/chat/completions", body).json()  # the server's template (apply_chat_template)
    assert server["prompt_token_ids"] == want
    client = _post(bos, "/v1/chat/completions", {**body, "chat_template": DOC_TEMPLATE}).json()  # the sandbox
    assert client["prompt_token_ids"] == want
    none = _post(bos, "/v1/chat/completions", {**body, "documents": None}).json()
    assert none["prompt_token_ids"] == bos_tokenizer.encode(_rendered(), add_special_tokens=False)
    # chat_template_kwargs' own documents win, as in vLLM
    kwargs = _post(bos, "/v1/chat/completions", {**body, "chat_template_kwargs": {"documents": []}}).json()
    assert kwargs["prompt_token_ids"] == none["prompt_token_ids"]


# ----- request_id ----------------------------------------------------------------------------


def test_request_id_is_the_answers_id(frontend):
    for path, prefix, body in (("/v1/completions", "cmpl", {"prompt": PROMPT}),
                               ("/v1/chat/completions", "chatcmpl", {"messages": MESSAGES})):
        body = {**body, "max_tokens": 2, "request_id": "job-7"}
        assert _post(frontend, path, body).json()["id"] == f"{prefix}-job-7"
        assert {c["id"] for c in _chunks(frontend, path, body)} == {f"{prefix}-job-7"}
        # vLLM's rule: an X-Request-Id header comes first
        assert _post(frontend, path, body, {"X-Request-Id": "trace-9"}).json()["id"] == f"{prefix}-trace-9"
        fresh = _post(frontend, path, {**body, "request_id": None}).json()["id"]
        assert fresh.startswith(f"{prefix}-") and len(fresh) == len(prefix) + 33


# ----- hostile values ------------------------------------------------------------------------

BOTH = [
    ("request_id", 7),
    ("request_id", ["a"]),
    ("request_id", "x" * 100_000),
    ("return_token_ids", "yes"),
    ("return_token_ids", 1),
    ("add_special_tokens", "false"),
    ("add_special_tokens", 0),
]
CHAT_ONLY = [
    ("echo", "true"),
    ("echo", 1),
    ("documents", "doc"),
    ("documents", {"title": "t", "text": "x"}),
    ("documents", ["text"]),
    ("documents", [1]),
    ("documents", [[{"title": "t"}]]),
    ("documents", [{"title": 1}]),
    ("documents", [{"title": {"nested": "x"}}]),
    ("documents", [{"title": "t"}] * 5000),
]


@pytest.mark.parametrize(("path", "field", "value"),
                         [(p, f, v) for p in ("/v1/completions", "/v1/chat/completions") for f, v in BOTH]
                         + [("/v1/chat/completions", f, v) for f, v in CHAT_ONLY])
def test_hostile_values_are_400_naming_the_field(frontend, path, field, value):
    body = {"max_tokens": 2, field: value, **({"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES})}
    resp = _post(frontend, path, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field, resp.text
    assert len(resp.text) < 2000  # a huge value is not echoed back
    assert _post(frontend, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).status_code == 200
