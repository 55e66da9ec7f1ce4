"""DeepSeek (deepseek_v3, deepseek_v31) and Kimi K2 (kimi_k2) tool-call parsers: their documented
formats become calls with JSON-object arguments, prose stays content, a malformed or cut-short
call stays content with its markers (never an exception), and any split of the text into
streamed deltas gives exactly the whole text's result."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parser_streams import check_call_deltas, stream

from shared.processor.parsers.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from shared.processor.parsers.kimi_k2 import KimiK2ToolParser
from shared.processor.parsers.types import ParsedMessage

V3, V31, KIMI = DeepSeekV3ToolParser, DeepSeekV31ToolParser, KimiK2ToolParser
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
K_BEGIN, K_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
K_CALL, K_CALL_END, K_ARGS = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"


def v3_call(name: str, args: str) -> str:
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{args}\n```{DS_CALL_END}"


def v31_call(name: str, args: str) -> str:
    return f"{DS_CALL}{name}{DS_SEP}{args}{DS_CALL_END}"


def kimi_call(ident: str, args: str) -> str:
    return f"{K_CALL}{ident}{K_ARGS}{args}{K_CALL_END}"


def v3(*calls: tuple[str, str]) -> str:
    """As DeepSeek-V3's template writes calls: a newline between two."""
    return DS_BEGIN + "\n".join(v3_call(*c) for c in calls) + DS_END


def v31(*calls: tuple[str, str]) -> str:
    return DS_BEGIN + "".join(v31_call(*c) for c in calls) + DS_END


def kimi(*calls: tuple[str, str]) -> str:
    return K_BEGIN + "".join(kimi_call(f"functions.{name}:{i}", args) for i, (name, args) in enumerate(calls)) + K_END


RENDER = {V3: v3, V31: v31, KIMI: kimi}
PARSERS = list(RENDER)
PARIS = ("get_weather", '{"city": "Paris", "unit": "celsius"}')
NOW = ("now", "{}")
NESTED = ("search", ('{"filter": {"tags": ["a", "b"], "range": {"lo": 1, "hi": 2.5}}, "deep": [[{"x": null}]], '
                     '"ok": true}'))
UNICODE = ("translate", '{"text": "Zürich ☀ 天气", "quote": "say \\"hi\\"\\n", "markup": "```}]<|"}')


def _plain(message: ParsedMessage) -> tuple:
    return message.content, [(c.name, c.arguments) for c in message.tool_calls]


def _extract(cls, text: str) -> tuple:
    return _plain(cls.extract(text))


@pytest.mark.parametrize("cls", PARSERS)
@pytest.mark.parametrize(("calls", "prose"), [
    ([PARIS], ""),
    ([PARIS, NOW], ""),
    ([PARIS, NOW], "I will check both.\n"),
    ([NESTED], "Searching. "),
    ([UNICODE, PARIS, NOW], "Un instant… "),
])
def test_documented_formats(cls, calls, prose):
    assert _extract(cls, prose + RENDER[cls](*calls)) == (prose or None, calls)


@pytest.mark.parametrize("cls", PARSERS)
def test_arguments_are_normalised_json(cls):
    """Arguments as the model spaced them, read and written back as one JSON object text."""
    text = RENDER[cls](("f", '{"a":1,\n  "b" : ["x" ,{"c":"é"}]}'))
    assert _extract(cls, text) == (None, [("f", '{"a": 1, "b": ["x", {"c": "é"}]}')])


@pytest.mark.parametrize("cls", PARSERS)
def test_prose_alone_and_text_after_the_section_are_content(cls):
    assert _extract(cls, "No tools needed: 4.") == ("No tools needed: 4.", [])
    assert _extract(cls, "Let me look.\n" + RENDER[cls](PARIS) + "\nDone.") == ("Let me look.\n\nDone.", [PARIS])


@pytest.mark.parametrize("cls", PARSERS)
def test_a_call_after_the_sections_end_is_content(cls):
    after = kimi_call("functions.now:1", "{}") if cls is KIMI else RENDER[cls](NOW)[len(DS_BEGIN):-len(DS_END)]
    assert _extract(cls, RENDER[cls](PARIS) + after) == (after, [PARIS])


@pytest.mark.parametrize("cls", PARSERS)
def test_two_sections(cls):
    text = RENDER[cls](PARIS) + " then " + RENDER[cls](NOW)
    assert _extract(cls, text) == (" then ", [PARIS, NOW])


def test_v3_format_without_newlines_between_calls():
    text = DS_BEGIN + v3_call(*PARIS) + v3_call(*NOW) + DS_END
    assert _extract(V3, text) == (None, [PARIS, NOW])


def test_v3_arguments_may_span_lines_and_hold_fences():
    text = v3(("write", '{\n  "code": "```py\\nprint(1)\\n```"\n}'))
    assert _extract(V3, text) == (None, [("write", '{"code": "```py\\nprint(1)\\n```"}')])


def test_kimi_keeps_the_models_ids():
    """Kimi's chat template writes a call's id back into the prompt: functions.NAME:INDEX."""
    text = K_BEGIN + kimi_call("functions.get_weather:0", PARIS[1]) + kimi_call(" get_time:7 ", " {} ") + K_END
    calls = KIMI.extract(text).tool_calls
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("functions.get_weather:0", "get_weather", PARIS[1]), ("get_time:7", "get_time", "{}")]


@pytest.mark.parametrize(("cls", "body"), [
    (V31, "now" + DS_SEP), (V31, " now " + DS_SEP + " "), (KIMI, "functions.now:0" + K_ARGS),
    (V3, f"function{DS_SEP}now\n```json\n\n```"),
])
def test_no_arguments_written_means_none(cls, body):
    begin, end, call, call_end = (K_BEGIN, K_END, K_CALL, K_CALL_END) if cls is KIMI else \
        (DS_BEGIN, DS_END, DS_CALL, DS_CALL_END)
    assert _extract(cls, begin + call + body + call_end + end) == (None, [NOW])


@pytest.mark.parametrize("cls", PARSERS)
def test_output_ending_after_a_call_keeps_it(cls):
    """Cut by max_tokens or a stop string between a call's end and the section's end."""
    text = RENDER[cls](PARIS, NOW)
    end = DS_END if cls is not KIMI else K_END
    assert _extract(cls, "Sure. " + text[:-len(end)]) == ("Sure. ", [PARIS, NOW])


MALFORMED = [
    (V3, v3(("f", '{"a": 1'))),  # not closed
    (V3, v3(("f", "{not json}"))),
    (V3, v3(("f", "[1, 2]"))),  # arguments not an object
    (V3, v3(("f", '{"x": NaN}'))),  # not strict JSON
    (V3, v3(("f", '{"x": 1e999}'))),  # inf: no JSON can say it
    (V3, v3(("get weather", "{}"))),  # not a name
    (V3, v3(("", "{}"))),
    (V3, DS_BEGIN + DS_CALL + f"function{DS_SEP}f\n{{}}" + DS_CALL_END + DS_END),  # no fence
    (V3, DS_BEGIN + DS_CALL + f"function{DS_SEP}f\n```json\n{{}}" + DS_CALL_END + DS_END),  # fence not closed
    (V3, DS_BEGIN + DS_CALL + f"tool{DS_SEP}f\n```json\n{{}}\n```" + DS_CALL_END + DS_END),  # not a function
    (V3, v31(PARIS)),  # the other DeepSeek format
    (V31, v3(PARIS)),
    (V31, v31(("f", '{"a": 1'))),
    (V31, v31(("f", '"text"'))),
    (V31, v31(("get weather", "{}"))),
    (V31, DS_BEGIN + DS_CALL + "f{}" + DS_CALL_END + DS_END),  # no separator
    (KIMI, kimi(("f", '{"a": 1'))),
    (KIMI, kimi(("f", "null"))),
    (KIMI, K_BEGIN + kimi_call("functions.get_weather", "{}") + K_END),  # no index
    (KIMI, K_BEGIN + kimi_call("functions.invalid.0", "{}") + K_END),
    (KIMI, K_BEGIN + K_CALL + "functions.f:0 {}" + K_CALL_END + K_END),  # no argument marker
    (KIMI, v31(PARIS)),  # another family's markers are plain text
]
CUT_SHORT = [
    *[(cls, RENDER[cls](PARIS)[:cut]) for cls in PARSERS for cut in (1, 12, 25, 60, 80)],
    (V3, DS_BEGIN), (V3, DS_BEGIN + DS_CALL), (V31, DS_BEGIN + v31_call("f", "{}")[:-3]),
    (KIMI, K_BEGIN + K_CALL + "functions.get_wea"), (KIMI, K_BEGIN + kimi_call("functions.f:0", '{"a": "b"}')[:-1]),
]
EMPTY_OR_PROSE = [
    (V3, DS_BEGIN + DS_END), (V31, DS_BEGIN + "\n" + DS_END), (KIMI, K_BEGIN + K_END),
    (V3, DS_BEGIN + "I changed my mind."), (KIMI, K_BEGIN + " no " + kimi_call("functions.f:0", "{}") + K_END),
    (V31, DS_CALL + "f" + DS_SEP + "{}" + DS_CALL_END),  # a call outside a section
    (KIMI, kimi_call("functions.f:0", "{}")),
]


@pytest.mark.parametrize(("cls", "text"), MALFORMED + CUT_SHORT + EMPTY_OR_PROSE)
def test_malformed_cut_short_or_empty_calls_stay_content(cls, text):
    assert _extract(cls, text) == (text, [])


@pytest.mark.parametrize(("cls", "bad"), [
    (V3, v3_call("f", "{oops}")), (V31, v31_call("f", '{"a": }')), (KIMI, kimi_call("functions.f", "{}")),
    (V31, v31_call("f", '{"a": 1}')[:-1]),  # a call cut short by the next one
])
def test_from_the_first_bad_call_the_section_is_content(cls, bad):
    """Calls before it were streamed already; the bad one and all after it stay content."""
    whole = RENDER[cls](PARIS, NOW)
    first_end = _first_call_end(cls, whole)
    rest = whole[first_end:]
    text = whole[:first_end] + bad + rest
    assert _extract(cls, text) == (bad + rest, [PARIS])


def _first_call_end(cls, text: str) -> int:
    marker = K_CALL_END if cls is KIMI else DS_CALL_END
    return text.index(marker) + len(marker)


@pytest.mark.parametrize("cls", PARSERS)
def test_text_between_calls_ends_the_section(cls):
    whole = RENDER[cls](PARIS, NOW)
    cut = _first_call_end(cls, whole)
    text = whole[:cut] + " wait " + whole[cut:]
    assert _extract(cls, text) == (text[cut:], [PARIS])


def test_markers_that_are_special_tokens_are_declared():
    assert set(V3.special_markers) == set(V31.special_markers) == {DS_BEGIN, DS_END, DS_CALL, DS_CALL_END, DS_SEP}
    assert set(KIMI.special_markers) == {K_BEGIN, K_END, K_CALL, K_CALL_END, K_ARGS}
    assert (V3.name, V31.name, KIMI.name) == ("deepseek_v3", "deepseek_v31", "kimi_k2")


# Streaming: every split gives the whole text's result.



def _streamed(cls, text: str, cuts: list[int]) -> tuple:
    deltas = stream(cls, text, cuts)
    check_call_deltas(deltas)
    message = ParsedMessage.from_deltas(deltas)
    ids = [c.id for c in message.tool_calls] if cls is KIMI else None
    return (*_plain(message), ids)


def _whole(cls, text: str) -> tuple:
    message = cls.extract(text)
    return (*_plain(message), [c.id for c in message.tool_calls] if cls is KIMI else None)


STREAMED = [(cls, "Let me look.\n" + RENDER[cls](UNICODE, PARIS) + "\nDone.") for cls in PARSERS] + \
    [(cls, RENDER[cls](NESTED)[:-5]) for cls in PARSERS] + \
    [(V31, v31(PARIS)[:-len(DS_END)] + v31_call("f", "{")), (KIMI, kimi(NOW) + "<|tool_calls_sect"),
     (V3, "a " + DS_BEGIN + "\n" + v3_call(*NOW) + "\n\n" + DS_END + " <｜tool▁")] + MALFORMED[::3]


@pytest.mark.parametrize(("cls", "text"), STREAMED)
def test_every_split_point_and_one_character_deltas(cls, text):
    whole = _whole(cls, text)
    for cut in range(len(text) + 1):
        assert _streamed(cls, text, [cut]) == whole, cut
    assert _streamed(cls, text, list(range(len(text)))) == whole


@pytest.mark.parametrize("cls", PARSERS)
def test_streams_content_at_once_and_each_call_when_it_ends(cls):
    parser, text = cls(), "Hi " + RENDER[cls](PARIS, NOW)
    first = _first_call_end(cls, text)
    assert [d.content for d in parser.feed(text[:8])] == ["Hi "]  # the rest could begin a marker: held
    assert parser.feed(text[8:first - 1]) == []  # the call's end marker is not complete yet
    head, args = parser.feed(text[first - 1:first])
    assert head.tool_calls[0]["function"]["name"] == "get_weather"
    assert args.tool_calls == [{"index": 0, "function": {"arguments": PARIS[1]}}]
    rest = parser.feed(text[first:]) + parser.finish()
    assert [d.tool_calls[0]["index"] for d in rest] == [1, 1] and all(d.content is None for d in rest)


PIECES = st.sampled_from([
    "a", " ", "\n", "{", "}", "```", "json", "function", DS_BEGIN, DS_END, DS_CALL, DS_CALL_END, DS_SEP,
    K_BEGIN, K_END, K_CALL, K_CALL_END, K_ARGS, "functions.f:0", "f", '{"a": [1, "}"]}', "<｜tool▁", "<|tool_",
])


@st.composite
def outputs(draw, cls) -> str:
    """Model text mixing prose, markers, valid calls and calls cut short."""
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["piece", "call", "cut"]))
        if kind == "piece":
            parts.append(draw(PIECES))
        else:
            calls = draw(st.lists(st.sampled_from([PARIS, NOW, NESTED, UNICODE]), min_size=1, max_size=2))
            text = RENDER[cls](*calls)
            parts.append(text if kind == "call" else text[:draw(st.integers(0, len(text)))])
    return "".join(parts)


@pytest.mark.parametrize("cls", PARSERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_streams_the_whole_result(cls, data):
    text = data.draw(outputs(cls))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    assert _streamed(cls, text, cuts) == _whole(cls, text)
