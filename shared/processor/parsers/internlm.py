"""internlm: InternLM2 / InternLM2.5 tool calls, one JSON object per call after the special
tokens ``<|action_start|><|plugin|>``, closed by ``<|action_end|>``:

    <|action_start|><|plugin|>
    {"name": "get_weather", "parameters": {"city": "Paris"}}<|action_end|>

``arguments`` is accepted for ``parameters``, as vLLM does. Text outside is content. As in vLLM,
``<|action_end|>`` may be missing when the object ends the output. A block that is not such an
object, or an object the output leaves unclosed, stays content, markers and all.
"""

from __future__ import annotations

from shared.processor.parsers.json_list import closer_after
from shared.processor.parsers.scan import call_from_object, json_value, skip_space
from shared.processor.parsers.tool_parser import MarkedToolParser, Segment

START, PLUGIN, END = "<|action_start|>", "<|plugin|>", "<|action_end|>"


class InternLMToolParser(MarkedToolParser):
    name = "internlm"
    marker = START + PLUGIN
    special_markers = (START, PLUGIN, END)

    def _read(self, text: str, start: int, final: bool) -> tuple[list[Segment], int] | None:
        pos = skip_space(text, start + len(self.marker))
        if pos == len(text) and not final:
            return None
        if text[pos:pos + 1] != "{":
            return [text[start:pos]], pos
        end = self._brackets.end(text, pos)
        if end is None:
            return None if not final else ([text[start:]], len(text))
        close = closer_after(text, end, END, final)
        if close is None:
            return None
        if close < 0 and skip_space(text, end) == len(text):
            close = len(text)  # final here: the object ends the output
        call = call_from_object(json_value(text[pos:end]), ("parameters", "arguments"))
        if call is None or close < 0:
            stop = max(close, end)
            return [text[start:stop]], stop
        return [call], close
