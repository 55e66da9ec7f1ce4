"""kimi_k2: Kimi K2 tool calls, in a section of calls between special tokens, each call's id
(``functions.NAME:INDEX``) before its JSON arguments:

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

The call keeps the model's id, as vLLM does: Kimi's chat template writes it back into the prompt
for the call's turn and its tool result. An id without the ``functions.`` prefix is accepted.
Text outside the section is content; see sections for what stays content inside one.
"""

from __future__ import annotations

import re

from shared.processor.parsers.sections import SectionToolParser, arguments
from shared.processor.parsers.types import ToolCall

SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_END, ARGUMENTS = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"
_ID = re.compile(r"(?:functions\.)?([A-Za-z0-9_.\-]+):\d+")


class KimiK2ToolParser(SectionToolParser):
    name = "kimi_k2"
    section = (SECTION_BEGIN, SECTION_END)
    call = (CALL_BEGIN, CALL_END)
    special_markers = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENTS, CALL_END)

    def _parse(self, body: str) -> ToolCall | None:
        ident, sep, args = body.partition(ARGUMENTS)
        ident, args = ident.strip(), arguments(args) if sep else None
        match = _ID.fullmatch(ident)
        return ToolCall(match.group(1), args, ident) if match and args is not None else None
