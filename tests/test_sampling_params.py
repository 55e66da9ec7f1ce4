"""SamplingParams: vLLM defaults, validation that names the field, normalization, wire format."""

from __future__ import annotations

import msgspec
import pytest

from shared.processor.defaults import merge_model_defaults
from shared.sampling_params import MODEL_DEFAULTABLE, SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.greedy


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("temperature", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop_token_ids", [2, -1]),
        ("seed", 1.5),
        ("seed", "42"),
        ("stop", ["ok", ""]),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", {-3: 1.0}),
        ("logit_bias", [1, 2]),
        ("n", 2**16 + 1),  # a fan-out that would exhaust memory before any step
        ("temperature", "1"),
        ("top_p", None),
        ("presence_penalty", True),
        ("structured_outputs", {"regex": "a"}),  # a dict, not StructuredOutputsParams
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_error_message_shows_the_value() -> None:
    with pytest.raises(ValueError, match=r"temperature must be non-negative, got -1"):
        SamplingParams(temperature=-1)


def test_min_tokens_cannot_exceed_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    assert SamplingParams(min_tokens=10, max_tokens=None).min_tokens == 10
    assert SamplingParams(min_tokens=5, max_tokens=5).min_tokens == 5


def test_boundary_values_are_accepted() -> None:
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, presence_penalty=2.0, frequency_penalty=-2.0)
    SamplingParams(logprobs=0, max_tokens=1, seed=0, top_k=1)
    SamplingParams(logprobs=20, seed=-5)


def test_normalization() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    # JSON clients send token ids as string keys.
    assert SamplingParams(logit_bias={"50": 5, 7: -1.5}).logit_bias == {50: 5.0, 7: -1.5}


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_model_defaults_fill_only_unset_fields() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 512}
    p = merge_model_defaults(SamplingParams(temperature=1.0, max_tokens=None), defaults, 16)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.unset_fields) == (1.0, 0.9, 20, None, ())
    assert merge_model_defaults(SamplingParams(), {}, 16).temperature == 1.0
    assert defaults["temperature"] == 0.6  # the shared defaults dict is untouched
    with pytest.raises(ValueError, match="top_p"):
        merge_model_defaults(SamplingParams(), {"top_p": 0.0}, 16)


def test_for_child_derives_distinct_reproducible_seeds() -> None:
    parent = SamplingParams(n=3, seed=100, temperature=0.7, stop=["x"])
    children = [parent.for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [100, 101, 102]
    assert all(c.n == 1 and c.temperature == 0.7 and c.stop == ["x"] for c in children)
    unseeded = SamplingParams(n=2).for_child(1)
    assert unseeded.n == 1 and unseeded.seed is None


@pytest.mark.parametrize("codec", [msgspec.msgpack, msgspec.json])
def test_wire_round_trip(codec: object) -> None:
    p = SamplingParams(
        n=2, temperature=0.3, stop="END", stop_token_ids=[7], logit_bias={3: 2.0}, seed=9, logprobs=5
    )
    assert codec.decode(codec.encode(p), type=SamplingParams) == p  # type: ignore[attr-defined]


def test_defaults_are_omitted_on_the_wire() -> None:
    # only the fields a model's defaults may fill travel with their values (and which were unset)
    unset = msgspec.json.decode(msgspec.json.encode(SamplingParams()))
    assert set(unset) == {*MODEL_DEFAULTABLE, "unset_fields"} and sorted(unset["unset_fields"]) == sorted(MODEL_DEFAULTABLE)
    assert set(msgspec.json.decode(msgspec.json.encode(merge_model_defaults(SamplingParams(), {}, 16)))) == {
        *MODEL_DEFAULTABLE}
    assert msgspec.json.decode(b'{"max_tokens":null}', type=SamplingParams).max_tokens is None


def test_decoding_validates_too() -> None:
    with pytest.raises(ValueError, match="top_p"):
        msgspec.json.decode(b'{"top_p": 2.0}', type=SamplingParams)
