"""The Responses API against the real stack with the official SDK: create, retrieve, delete,
previous_response_id (404 when unknown), function tools with tool_choice required and their
outputs fed back, text.format json_schema, and the typed stream events in order; the store's
LRU and TTL bounds and their metrics on the real ResponseStore class."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from frontend_helpers import metric_value
from prometheus_client import CollectorRegistry, generate_latest

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
    bad_schema = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}
    with pytest.raises(openai.BadRequestError) as err:  # named in the Responses shape, not chat's
        client.responses.create(model=model, input="x", tools=[bad_schema], max_output_tokens=2)
    assert err.value.body["param"] == "tools[0].parameters" and ".function" not in err.value.body["message"]


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
