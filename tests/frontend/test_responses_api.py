"""The Responses API against the real stack with the official SDK: create, retrieve, delete,
previous_response_id (404 when unknown), function tools with tool_choice required and their
outputs fed back, text.format json_schema, the typed stream events in order, background
responses (polled, streamed again, cancelled), input_items and reasoning; the store's LRU and
TTL bounds and their metrics on the real ResponseStore class."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from e2e_stack import Stack, paused
from frontend_helpers import metric_value, wait_until
from prometheus_client import CollectorRegistry, generate_latest

from pagedserve.serve import free_port
from services.frontend.response_store import ResponseStore

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]


def _finished(frontend: str) -> float:
    page = httpx.get(f"{frontend}/metrics", timeout=10).text
    return metric_value(page, "pagedserve_frontend_requests_total", endpoint="/v1/responses", finish_reason="length")


def test_create_retrieve_delete(client, model, frontend):
    before = _finished(frontend)
    # greedy: a sampled token could be the random model's EOS, ending the response before its limit
    resp = client.responses.create(model=model, input="Hello there", instructions="Be brief", max_output_tokens=6,
                                   temperature=0)
    assert _finished(frontend) == before + 1
    assert resp.id.startswith("resp_") and resp.status == "incomplete" and resp.usage.output_tokens == 6
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in resp.output] == ["message"] and isinstance(resp.output_text, str)
    again = client.responses.retrieve(resp.id)
    assert again.id == resp.id and again.output_text == resp.output_text
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_unknown_previous_response_is_404(client, model):
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=model, input="hi", previous_response_id="resp_missing", max_output_tokens=2)
    assert err.value.body["param"] == "previous_response_id"


def test_required_tool_call_then_its_output(client, model):
    first = client.responses.create(model=model, input="Weather in Paris?", tools=TOOLS, tool_choice="required",
                                    temperature=0.0, max_output_tokens=80)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and calls
    assert calls[0].call_id.startswith("call_") and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    second = client.responses.create(
        model=model, previous_response_id=first.id, tools=TOOLS, tool_choice="none", max_output_tokens=4,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees"}])
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the history and the tool output are in the prompt


def test_json_schema_text_format(client, model):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    resp = client.responses.create(model=model, input="Answer in JSON", max_output_tokens=40, temperature=0.0,
                                   text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    jsonschema.validate(json.loads(resp.output_text), schema)


def test_stream_events_in_order(client, model):
    with client.responses.stream(model=model, input="Tell me", max_output_tokens=5, temperature=0.0) as events:
        kinds, text = [], ""
        for event in events:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = events.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert final.output_text == text and final.status == "incomplete"
    assert client.responses.retrieve(final.id).output_text == text


def test_bad_input_is_a_400(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="x", tool_choice="required", max_output_tokens=2)
    assert err.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input=[{"type": "file_search_call"}], max_output_tokens=2)
    assert err.value.body["param"] == "input[0]"
    for empty in ([], [{"type": "reasoning", "summary": []}]):  # had been named 'messages', chat's field
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model=model, input=empty, max_output_tokens=2)
        assert err.value.body["param"] == "input" and "messages" not in err.value.body["message"]
    bad_schema = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}
    with pytest.raises(openai.BadRequestError) as err:  # named in the Responses shape, not chat's
        client.responses.create(model=model, input="x", tools=[bad_schema], max_output_tokens=2)
    assert err.value.body["param"] == "tools[0].parameters" and ".function" not in err.value.body["message"]


def _settled(client, response_id: str, timeout: float = 60):
    """The background response once it has left queued / in_progress."""
    deadline = time.monotonic() + timeout
    while (resp := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"{response_id} still {resp.status}"
        time.sleep(0.05)
    return resp


def test_background_response_is_polled_to_the_same_output(client, model):
    args = {"model": model, "input": "Tell me about the sea", "max_output_tokens": 8, "temperature": 0}
    plain = client.responses.create(**args)
    queued = client.responses.create(**args, background=True)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    done = _settled(client, queued.id)
    assert done.status == "incomplete" and done.output_text == plain.output_text and done.usage.output_tokens == 8
    # a finished background response: cancel changes nothing
    assert client.responses.cancel(queued.id).status == "incomplete"
    follow = client.responses.create(model=model, input="More", previous_response_id=queued.id, max_output_tokens=2)
    assert follow.usage.input_tokens > done.usage.input_tokens


def test_background_stream_and_its_replay(client, model):
    stream = client.responses.create(model=model, input="Sing", max_output_tokens=6, temperature=0, background=True,
                                     stream=True)
    events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    response_id = events[-1].response.id
    replay = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [e.sequence_number for e in replay] == list(range(3, len(events)))
    assert replay[-1].response.output_text == events[-1].response.output_text
    assert _settled(client, response_id).output_text == events[-1].response.output_text
    plain = client.responses.create(model=model, input="Sing", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:  # only a background response's events are kept
        list(client.responses.retrieve(plain.id, stream=True))
    assert err.value.body["param"] == "stream"


def test_cancel_stops_a_background_response_and_its_engine_requests(client, model, backend: Stack):
    with paused(backend.procs[0]):  # the worker: the response cannot finish before the cancel
        queued = client.responses.create(model=model, input="A long story", max_output_tokens=500, background=True)
        with pytest.raises(openai.BadRequestError) as err:  # a conversation cannot go on from it yet
            client.responses.create(model=model, input="and", previous_response_id=queued.id, max_output_tokens=2)
        assert err.value.body["code"] == "response_not_ready"
        cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.id == queued.id
    backend.wait_engine_idle(30)  # aborted, not left running
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # again: the same
    plain = client.responses.create(model=model, input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_missing")
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="x", background=True, store=False, max_output_tokens=2)
    assert err.value.body["param"] == "background"


def test_delete_stops_a_running_background_response(client, model, backend: Stack):
    with paused(backend.procs[0]):
        queued = client.responses.create(model=model, input="A long story", max_output_tokens=500, background=True)
        client.responses.delete(queued.id)
    backend.wait_engine_idle(30)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(queued.id)


def test_a_running_background_response_is_not_evicted_from_a_full_store(stack: Stack, backend: Stack, model):
    """It had been: a 404 for GET and cancel while it ran on in the engine, back once done."""
    port = free_port()
    wait_until(f"http://127.0.0.1:{port}/health",
               stack.start_frontend("fe-small-store", "--response-store-max-entries", "2", port=port), timeout=120)
    small = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    with paused(backend.procs[0]):
        running = small.responses.create(model=model, input="A long story", max_output_tokens=500, background=True)
        others = [small.responses.create(model=model, input=f"x{i}", max_output_tokens=2, background=True)
                  for i in range(2)]
        # three running in a store of two: all held
        assert {small.responses.retrieve(r.id).status for r in (running, *others)} <= {"queued", "in_progress"}
        assert small.responses.cancel(running.id).status == "cancelled"
    assert all(_settled(small, r.id).status == "incomplete" for r in others)
    backend.wait_engine_idle(30)
    small.responses.create(model=model, input="y", max_output_tokens=1)  # a finished one goes now
    assert len([r for r in (running, *others) if _stored(small, r.id)]) == 1


def _stored(client, response_id: str) -> bool:
    try:
        client.responses.retrieve(response_id)
        return True
    except openai.NotFoundError:
        return False


def test_input_items_are_listed_in_pages(client, model, frontend):
    items = [{"role": "user", "content": f"message {i}"} for i in range(5)]
    resp = client.responses.create(model=model, input=items, max_output_tokens=1)
    listed = client.responses.input_items.list(resp.id, order="asc", limit=2)
    assert [item.content[0].text for item in listed.data] == ["message 0", "message 1"] and listed.has_more
    rest = client.responses.input_items.list(resp.id, order="asc", after=listed.last_id)
    assert [item.content[0].text for item in rest.data] == ["message 2", "message 3", "message 4"]
    assert not rest.has_more
    newest = client.responses.input_items.list(resp.id)  # desc by default
    assert newest.data[0].content[0].text == "message 4" and newest.data[0].id.startswith("msg_")
    for query, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after")):
        answer = httpx.get(f"{frontend}/v1/responses/{resp.id}/input_items", params=query, timeout=10)
        assert answer.status_code == 400 and param in str(answer.json()["error"]["param"]), answer.text
    assert httpx.get(f"{frontend}/v1/responses/resp_nope/input_items", timeout=10).status_code == 404


def test_reasoning_is_echoed_and_checked(client, model):
    resp = client.responses.create(model=model, input="hi", max_output_tokens=1, reasoning={"effort": "low"})
    assert resp.reasoning.effort == "low"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=model, input="hi", max_output_tokens=1, reasoning={"effort": "lots"})
    assert err.value.body["param"].startswith("reasoning")


def test_store_is_bounded_by_count_and_age():
    now = [0.0]
    registry = CollectorRegistry()
    store = ResponseStore(2, ttl=10.0, registry=registry, clock=lambda: now[0])
    for rid in ("a", "b"):
        store.put(rid, {"id": rid}, [])
    assert store.get("a") is not None  # now the most recently used: "b" goes first
    store.put("c", {"id": "c"}, [])
    assert store.get("b") is None and store.get("a") and store.get("c")
    now[0] = 10.0
    assert store.get("a") is None and store.get("c") is None
    page = generate_latest(registry).decode()
    assert metric_value(page, "pagedserve_frontend_response_store_evictions_total", reason="capacity") == 1
    assert metric_value(page, "pagedserve_frontend_response_store_evictions_total", reason="ttl") == 2
    assert metric_value(page, "pagedserve_frontend_response_store_entries") == 0
    # a background response still running stays past both bounds
    store.put("run", {"id": "run", "status": "in_progress"}, [])
    for rid in ("d", "e", "f"):
        store.put(rid, {"id": rid}, [])
    now[0] = 100.0
    assert store.get("run") is not None and "run" in store and store.get("d") is None
