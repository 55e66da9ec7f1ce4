"""Anthropic's Messages API against the real stack, with the official `anthropic` SDK as the
client: a whole message equal to chat's greedy answer for the same conversation (text, stop
reason, usage), the stream's events in order (raw, and the SDK's messages.stream), stop_sequences
and max_tokens stop reasons, tools forced with tool_choice any (a tool_use block that validates,
streamed as input_json_delta) and a tool_result fed back, count_tokens, the x-api-key header on a
keyed frontend, and hostile bodies each a 400 in Anthropic's error shape."""

from __future__ import annotations

import json
from types import SimpleNamespace

import anthropic
import httpx
import jsonschema
import openai
import pytest
from e2e_stack import Stack
from frontend_helpers import metric_value, wait_until

from services.frontend.messages import MessageWriter
from shared.processor.parsers.types import DeltaMessage

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SYSTEM = "You answer briefly."
KEY = "messages-key"
# greedy; the SDK (2.x) has no temperature argument any more, the API still takes the field
T0 = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def claude(frontend: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=frontend, api_key="unused", max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, model: str, max_tokens: int, **extra):
    """Chat's greedy answer to ASK with SYSTEM (the reference a message must equal)."""
    messages = [{"role": "system", "content": SYSTEM}, *ASK]
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                          **extra)


def _text(message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_whole_message_is_chats_greedy_answer(claude, client, model):
    chat = _chat(client, model, 12)
    msg = claude.messages.create(model=model, max_tokens=12, system=SYSTEM, messages=ASK, **T0)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == model
    assert _text(msg) == chat.choices[0].message.content
    assert [b.type for b in msg.content] == (["text"] if _text(msg) else [])
    expected = {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert msg.stop_reason == expected and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                 chat.usage.completion_tokens)
    # system as text blocks, content as text blocks: the same prompt
    same = claude.messages.create(model=model, max_tokens=12, **T0, system=[{"type": "text", "text": SYSTEM}],
                                  messages=[{"role": "user", "content": [{"type": "text", "text": ASK[0]["content"]}]}])
    assert _text(same) == _text(msg) and same.usage.input_tokens == msg.usage.input_tokens


def test_a_final_assistant_text_is_continued(claude, client, model):
    """Anthropic's prefill: the answer continues the assistant's text, as chat's continue_final_message."""
    history = [*ASK, {"role": "assistant", "content": "Well,"}]
    chat = client.chat.completions.create(model=model, messages=history, max_tokens=6, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False})
    msg = claude.messages.create(model=model, max_tokens=6, messages=history, **T0)
    assert _text(msg) == chat.choices[0].message.content
    assert msg.usage.input_tokens == chat.usage.prompt_tokens


def _sse(frontend: str, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a raw stream, checking each is 'event: NAME\\ndata: JSON'."""
    with httpx.stream("POST", f"{frontend}/v1/messages", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = []
    for chunk in raw.split("\n\n")[:-1]:
        name_line, data_line = chunk.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        events.append((data["type"], data))
    assert raw.endswith("\n\n")
    return events


def test_stream_events_in_order(frontend, claude, model):
    body = {"model": model, "max_tokens": 8, "system": SYSTEM, "messages": ASK}
    whole = claude.messages.create(**body, **T0)
    events = _sse(frontend, {**body, "temperature": 0})
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == whole.usage.input_tokens
    if _text(whole):
        assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
        assert set(kinds[2:-3]) == {"content_block_delta"}
        assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        deltas = [data["delta"] for kind, data in events if kind == "content_block_delta"]
        assert {d["type"] for d in deltas} == {"text_delta"}
        assert "".join(d["text"] for d in deltas) == _text(whole)
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": whole.stop_reason, "stop_sequence": None}
    assert final["usage"]["output_tokens"] == whole.usage.output_tokens
    with claude.messages.stream(**body, **T0) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == _text(whole) == _text(message)
    assert message.stop_reason == whole.stop_reason and message.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_and_max_tokens(claude, client, model):
    long = claude.messages.create(model=model, max_tokens=16, messages=ASK, **T0)
    text = _text(long)
    assert long.stop_reason == "max_tokens" and long.usage.output_tokens == 16, "needs a greedy answer of 16 tokens"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    chat = client.chat.completions.create(model=model, messages=ASK, max_tokens=16, temperature=0, stop=[stop])
    assert chat.choices[0].finish_reason == "stop"
    msg = claude.messages.create(model=model, max_tokens=16, messages=ASK, stop_sequences=["never-said", stop], **T0)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert _text(msg) == chat.choices[0].message.content == text[:text.index(stop)]
    with claude.messages.stream(model=model, max_tokens=16, messages=ASK, stop_sequences=[stop], **T0) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence, _text(streamed)) == ("stop_sequence", stop, _text(msg))


def _call(message):
    (block,) = [b for b in message.content if b.type == "tool_use"]
    return block


def test_tool_choice_any_then_the_tool_result(frontend, claude, model):
    asked = {"model": model, "max_tokens": 80, "messages": ASK, "tools": TOOLS}
    msg = claude.messages.create(**asked, tool_choice={"type": "any", "disable_parallel_tool_use": True}, **T0)
    call = _call(msg)
    assert msg.stop_reason == "tool_use" and call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER)
    # streamed: the call's input arrives as input_json_delta, joined to the same input
    events = _sse(frontend, {**asked, "temperature": 0, "tool_choice": {"type": "tool", "name": "get_weather"}})
    (start,) = [data for kind, data in events if kind == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    partial = "".join(data["delta"]["partial_json"] for kind, data in events if kind == "content_block_delta")
    assert json.loads(partial) == call.input and events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with claude.messages.stream(**asked, tool_choice={"type": "any"}, **T0) as stream:
        assert _call(stream.get_final_message()).input == call.input
    # the result fed back: a longer prompt, answered with text
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": [{"type": "text", "text": "18 degrees"}]}]}]
    after = claude.messages.create(model=model, max_tokens=3, messages=history, tools=TOOLS,
                                   tool_choice={"type": "none"})
    assert after.usage.input_tokens > msg.usage.input_tokens and after.stop_reason in ("max_tokens", "end_turn")
    assert {b.type for b in after.content} <= {"text"}
    count = claude.messages.count_tokens(model=model, messages=history, tools=TOOLS, tool_choice={"type": "none"})
    assert count.input_tokens == after.usage.input_tokens
    errored = claude.messages.count_tokens(model=model, tools=TOOLS, tool_choice={"type": "none"}, messages=[*history[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": call.id, "content": "no such city", "is_error": True}]}])
    assert errored.input_tokens > msg.usage.input_tokens


def test_count_tokens(claude, client, model):
    chat = _chat(client, model, 1)
    assert claude.messages.count_tokens(model=model, system=SYSTEM, messages=ASK).input_tokens == \
        chat.usage.prompt_tokens
    with_tools = claude.messages.count_tokens(model=model, system=SYSTEM, messages=ASK, tools=TOOLS,
                                              tool_choice={"type": "any"})
    assert with_tools.input_tokens > chat.usage.prompt_tokens  # the template shows the tools


def test_unknown_model_is_not_found(claude):
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="no-such-model", max_tokens=2, messages=ASK)
    assert err.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "The model `no-such-model` does not exist or you do not have access to it."}}


def _hostile(model: str) -> list[tuple[dict, str]]:
    """(body, what the error message must name)."""
    ok = {"model": model, "max_tokens": 4, "messages": ASK}
    user = ASK[0]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    return [
        ({"model": model, "messages": ASK}, "'max_tokens'"),
        ({**ok, "max_tokens": 0}, "'max_tokens'"),
        ({**ok, "max_tokens": "ten"}, "'max_tokens'"),
        ({**ok, "max_tokens": 10 ** 9}, "1000000000 in the completion"),
        ({**ok, "max_tokens": 10 ** 30}, "'max_tokens'"),
        ({**ok, "messages": []}, "'messages'"),
        ({**ok, "messages": "hello"}, "'messages'"),
        ({**ok, "messages": [{"role": "system", "content": "x"}]}, "'messages[0].role'"),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, "'messages[0].role'"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, "'messages[0].content'"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]},
         "'messages[0].content[1].type'"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
         "'messages[0].content[0].type'"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                           "content": [image]}]}]},
         "'messages[0].content[0].content[0].type'"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]},
         "'messages[0].content[0].tool_use_id'"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         "'messages[0].content[0].type'"),
        ({**ok, "messages": [{"role": "user", "content": "\ud800"}]}, "'messages[0].content'"),
        ({**ok, "system": 3}, "'system'"),
        ({**ok, "temperature": 1e308}, "'temperature'"),
        ({**ok, "temperature": 1.5}, "'temperature'"),
        ({**ok, "top_k": -2}, "'top_k'"),
        ({**ok, "stop_sequences": "x"}, "'stop_sequences'"),
        ({**ok, "stop_sequences": ["x"] * 129}, "stop_sequences"),
        ({**ok, "tools": [{"name": "bad name", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}},
         "'tools[0].name'"),
        ({**ok, "tools": [{"name": "f", "input_schema": {"type": "string"}}], "tool_choice": {"type": "any"}},
         "'tools[0].input_schema'"),
        ({**ok, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "'tools[0]"),
        ({**ok, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "missing"}}, "'tool_choice.name'"),
        ({**ok, "tools": TOOLS, "tool_choice": {"type": "sometimes"}}, "'tool_choice.type'"),
        ({**ok, "tool_choice": {"type": "any"}}, "'tool_choice'"),
        ({**ok, "tools": TOOLS}, "tool_choice"),  # auto (the default) needs a tool call parser on this server
        ({**ok, "messages": [user, {"role": "assistant", "content": [{"type": "text"}]}]},
         "'messages[1].content[0].text'"),
        # nothing left to answer: not chat's "'messages': List should have at least 1 item"
        ({**ok, "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "t"}]}]},
         "'messages': no message has a text, tool_use or tool_result block"),
        ({**ok, "system": "s", "messages": [{"role": "user", "content": []}]}, "'messages': no message has a text"),
    ]


def _responses(frontend: str, endpoint: str, status: str) -> float:
    page = httpx.get(f"{frontend}/metrics", timeout=10).text
    return metric_value(page, "pagedserve_frontend_http_responses_total", endpoint=endpoint, status=status)


def test_hostile_bodies_are_400s_in_anthropics_shape(frontend, model):
    before = _responses(frontend, "/v1/messages", "400")
    for body, named in _hostile(model):  # json.dumps escapes a lone surrogate, which httpx cannot encode
        resp = httpx.post(f"{frontend}/v1/messages", content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json"})
        assert resp.status_code == 400, (body, resp.text)
        error = resp.json()
        assert error["type"] == "error" and set(error["error"]) == {"type", "message"}, resp.text
        assert error["error"]["type"] == "invalid_request_error" and named in error["error"]["message"], \
            (named, resp.text)
    for text in ("{", "[]", ""):
        resp = httpx.post(f"{frontend}/v1/messages", content=text, headers={"content-type": "application/json"},
                          timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    assert _responses(frontend, "/v1/messages", "400") == before + len(_hostile(model)) + 3  # counted by name
    counted = httpx.post(f"{frontend}/v1/messages/count_tokens", json={"model": model, "messages": []}, timeout=60)
    assert counted.status_code == 400 and "'messages'" in counted.json()["error"]["message"]
    # other endpoints keep OpenAI's shape; this one still serves
    assert "error" in httpx.post(f"{frontend}/v1/chat/completions", json={"messages": []}, timeout=60).json()
    ok = httpx.post(f"{frontend}/v1/messages", json={"model": model, "max_tokens": 2, "messages": ASK,
                                                     "temperature": 0, "metadata": {"user_id": "u1"}}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] <= 2


def test_x_api_key_on_a_keyed_frontend(stack: Stack, tmp_path_factory: pytest.TempPathFactory, model):
    keyed = stack.sharing(tmp_path_factory.mktemp("messages-logs"), api_key=KEY)
    try:
        wait_until(f"{keyed.base}/health", keyed.start_frontend("fe-messages"), timeout=120)
        good = anthropic.Anthropic(base_url=keyed.base, api_key=KEY, max_retries=0, timeout=60)
        msg = good.messages.create(model=model, max_tokens=2, messages=ASK)
        assert msg.usage.output_tokens <= 2
        assert good.messages.count_tokens(model=model, messages=ASK).input_tokens > 0
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=keyed.base, api_key="wrong", max_retries=0).messages.create(
                model=model, max_tokens=2, messages=ASK)
        body = {"model": model, "max_tokens": 2, "messages": ASK}
        assert httpx.post(f"{keyed.base}/v1/messages", json=body, timeout=60).status_code == 401
        bearer = httpx.post(f"{keyed.base}/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=60)
        assert bearer.status_code == 200
        twice = httpx.post(f"{keyed.base}/v1/messages", json=body, timeout=60,
                           headers=[("x-api-key", KEY), ("x-api-key", "wrong")])
        assert twice.status_code == 401  # two keys are ambiguous
        assert twice.json() == {"type": "error", "error": {"type": "authentication_error", "message": (
            "Incorrect or missing API key: send 'Authorization: Bearer <key>' (or Anthropic's 'x-api-key: <key>').")}}
    finally:
        keyed.close()


def test_the_writer_makes_thinking_text_and_tool_use_blocks():
    """Reasoning (from a --reasoning-parser) is a thinking block, then text, then each call a
    tool_use block whose input streams as input_json_delta: events and blocks from one writer."""
    seq = SimpleNamespace(prompt_token_ids=[1, 2, 3])
    writer = MessageWriter(None, SimpleNamespace(seq=seq), "m", [])  # feeding needs neither generation nor parser
    deltas = [DeltaMessage(reasoning_content="Hm"), DeltaMessage(reasoning_content="m."), DeltaMessage(content="Hi"),
              DeltaMessage(tool_calls=[{"index": 0, "id": "call_ab12", "type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": '}}]),
              DeltaMessage(tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}])]
    raw = b"".join(event for delta in deltas for event in writer.feed(delta)) + b"".join(writer.close_block())
    events = [json.loads(chunk.split(b"\ndata: ")[1]) for chunk in raw.split(b"\n\n")[:-1]]
    assert [(e["type"], e.get("index")) for e in events] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_delta", 2),
        ("content_block_stop", 2)]
    assert events[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert [e["delta"] for e in events if e["type"] == "content_block_delta"] == [
        {"type": "thinking_delta", "thinking": "Hm"}, {"type": "thinking_delta", "thinking": "m."},
        {"type": "text_delta", "text": "Hi"}, {"type": "input_json_delta", "partial_json": '{"city": '},
        {"type": "input_json_delta", "partial_json": '"Oslo"}'}]
    assert events[7]["content_block"] == {"type": "tool_use", "id": "toolu_ab12", "name": "get_weather", "input": {}}
    assert writer.message["content"] == [
        {"type": "thinking", "thinking": "Hmm.", "signature": ""}, {"type": "text", "text": "Hi"},
        {"type": "tool_use", "id": "toolu_ab12", "name": "get_weather", "input": {"city": "Oslo"}}]
