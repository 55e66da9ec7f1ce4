"""A response's output items built from the parsed deltas of its choice, and the typed SSE events
that stream them, in OpenAI's order: an item is added, its text (or arguments) streams in
deltas, then it is done; a delta of another kind closes the open item first. The whole response
is made by the same writer (its events discarded), so streamed and whole outputs agree."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from shared.processor.parsers.types import DeltaMessage, ParsedMessage

_encode = msgspec.json.Encoder().encode


def deltas_of(message: ParsedMessage) -> list[DeltaMessage]:
    """A whole parsed message as the deltas that would have streamed it."""
    out = [DeltaMessage(reasoning_content=message.reasoning_content), DeltaMessage(content=message.content)]
    for i, call in enumerate(message.tool_calls):
        out.append(DeltaMessage(tool_calls=[{"index": i, "id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]))
        out.append(DeltaMessage(tool_calls=[{"index": i, "function": {"arguments": call.arguments}}]))
    return out


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class EventWriter:
    def __init__(self, envelope: dict[str, Any]):
        self.envelope = envelope
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._seq = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n"

    def snapshot(self, status: str) -> dict[str, Any]:
        """The Response object with the items so far."""
        return {**self.envelope, "status": status, "output": list(self.items)}

    def feed(self, delta: DeltaMessage) -> list[bytes]:
        out: list[bytes] = []
        if delta.reasoning_content:
            out += self._text("reasoning", delta.reasoning_content)
        if delta.content:
            out += self._text("message", delta.content)
        for part in delta.tool_calls:
            if "id" in part:
                out += self.close_item()
                item = {"type": "function_call", "id": _item_id("fc"), "call_id": part["id"],
                        "name": part["function"]["name"], "arguments": "", "status": "in_progress"}
                out += self._add(item)
            args = part["function"].get("arguments", "")
            if args and self._open is not None:
                self._open["arguments"] += args
                out.append(self.event("response.function_call_arguments.delta", item_id=self._open["id"],
                                      output_index=len(self.items) - 1, delta=args))
        return out

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        self.items.append(item)
        self._open = item
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item))]

    def _text(self, kind: str, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._open is None or self._open["type"] != kind:
            out += self.close_item()
            if kind == "message":
                out += self._add({"type": "message", "id": _item_id("msg"), "role": "assistant",
                                  "status": "in_progress", "content": []})
                part = {"type": "output_text", "text": "", "annotations": []}
                self._open["content"].append(part)
                out.append(self.event("response.content_part.added", item_id=self._open["id"],
                                      output_index=len(self.items) - 1, content_index=0, part=dict(part)))
            else:
                out += self._add({"type": "reasoning", "id": _item_id("rs"), "summary": [],
                                  "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
        item, where = self._open, {"item_id": self._open["id"], "output_index": len(self.items) - 1, "content_index": 0}
        item["content"][0]["text"] += text
        kind_event = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        return out + [self.event(kind_event, **where, delta=text, **extra)]

    def close_item(self) -> list[bytes]:
        """The events that finish the open item (none open: nothing)."""
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = "completed"
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        out: list[bytes] = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", **where, content_index=0, text=part["text"],
                                  logprobs=[]))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
        elif item["type"] == "reasoning":
            out.append(self.event("response.reasoning_text.done", **where, content_index=0,
                                  text=item["content"][0]["text"]))
        else:
            out.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"]))
        out.append(self.event("response.output_item.done", output_index=where["output_index"], item=item))
        return out

    def assistant_message(self) -> dict[str, Any]:
        """The output as a chat assistant message, for the next response's history."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
