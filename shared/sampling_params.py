"""Per-request sampling parameters, with vLLM's field names and defaults.

A msgspec Struct so it travels inside protocol messages between processes; nothing here
imports torch. Validation runs in ``__post_init__``, which msgspec also calls when decoding,
so a malformed message fails as loudly as a malformed constructor call.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType
from msgspec.structs import force_setattr, replace

MAX_LOGPROBS = 20
MAX_N = 1 << 16  # samples of one prompt: far past it, building the samples alone would exhaust memory
# bad_words: the sampler checks every word's tokens against the output at every step
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 128, 128
_PENALTY_RANGE = (-2.0, 2.0)
_GREEDY_EPS = 1e-5
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator accepts
# The fields a model's generation_config may supply, with SamplingParams's own defaults: left
# unset by the caller, they hold these until the request processor merges the model's.
MODEL_DEFAULTABLE = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                     "max_tokens": 16}


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{field} {rule}, got {value!r}")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


class _Brief:
    """A value shown shortened in an error message (a client's list may be huge)."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return reprlib.repr(self.value)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class StructuredOutputsParams(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """Constrain the output to a format (vLLM's names); exactly one field is set. json: a JSON
    schema (dict or JSON text); regex: a regular expression; choice: one of these strings;
    grammar: an EBNF (GBNF) grammar; json_object: any JSON object. The worker compiles it with
    xgrammar and masks every token that cannot continue a valid output."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [f for f in ("json", "regex", "choice", "grammar") if getattr(self, f) is not None]
        given += ["json_object"] if self.json_object else []
        _require(len(given) == 1, "structured_outputs", "must set exactly one of json, regex, choice, grammar, "
                 "json_object", given)
        if isinstance(self.json, str):
            try:
                force_setattr(self, "json", json.loads(self.json))
            except ValueError as exc:
                raise ValueError(f"structured_outputs json must be a JSON schema, got invalid JSON: {exc}") from None
        if self.json is not None:
            _require(isinstance(self.json, dict), "structured_outputs", "json must be a JSON object (a schema)",
                     self.json)
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"structured_outputs regex is invalid: {exc}") from None
        if self.choice is not None:
            ok = bool(self.choice) and all(isinstance(c, str) and c for c in self.choice)
            _require(ok, "structured_outputs", "choice must be a non-empty list of non-empty strings", self.choice)
        if self.grammar is not None:
            _require(bool(self.grammar.strip()), "structured_outputs", "grammar must not be empty", self.grammar)

    def key(self) -> str:
        """One string per distinct constraint (a cache key for its compiled grammar)."""
        return json.dumps(msgspec.to_builtins(self), sort_keys=True)


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False):
    """How to pick each next token of one request, and what to report about it.

    Frozen: derive variants with ``msgspec.structs.replace`` (or ``for_child``). After
    construction ``stop`` and ``stop_token_ids`` are always lists and ``top_k`` is 0 when
    disabled (-1 is accepted as vLLM's spelling of "disabled"). ``unset_fields`` names the
    MODEL_DEFAULTABLE fields the caller did not set (they hold the defaults above), so the model's
    generation_config can fill exactly those (shared.processor.defaults).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: int | UnsetType = UNSET  # 0 (or -1) = all tokens
    min_p: float | UnsetType = UNSET
    seed: int | None = None
    # default_factory=list (rather than None) so an empty list is omitted on the wire.
    stop: str | list[str] | None = msgspec.field(default_factory=list)
    stop_token_ids: list[int] | None = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None | UnsetType = UNSET  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs to return besides the sampled token's
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words the output never contains (as token sequences)
    # bad_words tokenized, set by the request processor (what the worker bans)
    bad_words_token_ids: list[list[int]] = msgspec.field(default_factory=list)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    unset_fields: tuple[str, ...] = ()  # a tuple: an empty one is omitted on the wire

    def __post_init__(self) -> None:
        unset = {f for f in MODEL_DEFAULTABLE if getattr(self, f) is UNSET}
        for field in unset:
            force_setattr(self, field, MODEL_DEFAULTABLE[field])
        if unset:
            force_setattr(self, "unset_fields", tuple(sorted(unset.union(self.unset_fields))))
        self._normalize()
        self._validate_sampling()
        self._validate_lengths()
        self._validate_stops()
        self._validate_token_lists()

    def _normalize(self) -> None:
        if self.stop is None or isinstance(self.stop, str):
            force_setattr(self, "stop", [] if self.stop is None else [self.stop])
        if self.stop_token_ids is None:
            force_setattr(self, "stop_token_ids", [])
        if self.top_k == -1:
            force_setattr(self, "top_k", 0)
        if self.logit_bias is not None:
            try:  # JSON clients send token ids as string keys
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError):
                msg = f"logit_bias must map token ids to numbers, got {self.logit_bias!r}"
                raise ValueError(msg) from None
            force_setattr(self, "logit_bias", bias)

    def _validate_sampling(self) -> None:
        floats = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
        for field in floats:  # inf or nan would turn a whole batch's logits into nan in the worker
            _require(_is_finite(getattr(self, field)), field, "must be a finite number", getattr(self, field))
        lo, hi = _PENALTY_RANGE
        checks = [
            ("n", is_int(self.n) and 1 <= self.n <= MAX_N, f"must be in [1, {MAX_N}]"),
            ("temperature", self.temperature >= 0, "must be non-negative"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "must be -1, 0 (disabled) or positive"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be positive"),
            ("presence_penalty", lo <= self.presence_penalty <= hi, "must be in [-2, 2]"),
            ("frequency_penalty", lo <= self.frequency_penalty <= hi, "must be in [-2, 2]"),
            ("seed", self.seed is None or (is_int(self.seed) and _SEED_MIN <= self.seed <= _SEED_MAX),
             "must be a 64-bit integer or None"),
        ]
        for field in ("logprobs", "prompt_logprobs"):
            if getattr(self, field) is not None:
                ok = is_int(getattr(self, field)) and 0 <= getattr(self, field) <= MAX_LOGPROBS
                checks.append((field, ok, f"must be in [0, {MAX_LOGPROBS}]"))
        for field, ok, rule in checks:
            _require(ok, field, rule, getattr(self, field))
        ok = self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams)
        _require(ok, "structured_outputs", "must be a StructuredOutputsParams (or None)", self.structured_outputs)

    def _validate_lengths(self) -> None:
        if self.max_tokens is not None:
            ok = is_int(self.max_tokens) and self.max_tokens >= 1
            _require(ok, "max_tokens", "must be at least 1 (or None)", self.max_tokens)
        ok = is_int(self.min_tokens) and self.min_tokens >= 0
        _require(ok, "min_tokens", "must be non-negative", self.min_tokens)
        if self.max_tokens is not None:
            _require(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"must not exceed max_tokens ({self.max_tokens})",
                self.min_tokens,
            )

    def _validate_stops(self) -> None:
        _require(set(self.unset_fields) <= MODEL_DEFAULTABLE.keys(), "unset_fields", "must name defaultable fields",
                 sorted(self.unset_fields))
        ok = all(is_int(t) and t >= 0 for t in self.stop_token_ids)
        _require(ok, "stop_token_ids", "must be non-negative token ids", self.stop_token_ids)
        ok = all(isinstance(s, str) and s for s in self.stop)
        _require(ok, "stop", "must be non-empty strings", self.stop)
        if self.logit_bias is not None:
            ok = all(k >= 0 and math.isfinite(v) for k, v in self.logit_bias.items())
            _require(ok, "logit_bias", "must map non-negative token ids to finite numbers", self.logit_bias)

    def _validate_token_lists(self) -> None:
        """allowed_token_ids, bad_words and truncate_prompt_tokens, as vLLM checks them (the
        request processor checks them against the vocabulary and the context)."""
        if self.allowed_token_ids is not None:
            ok = isinstance(self.allowed_token_ids, list) and bool(self.allowed_token_ids) \
                and all(is_int(t) and t >= 0 for t in self.allowed_token_ids)
            _require(ok, "allowed_token_ids", "must be a non-empty list of token ids", _Brief(self.allowed_token_ids))
        if self.bad_words is not None:
            words = self.bad_words
            ok = isinstance(words, list) and len(words) <= MAX_BAD_WORDS
            ok = ok and all(isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in words)
            _require(ok, "bad_words", f"must be a list of at most {MAX_BAD_WORDS} words, each of 1 to "
                     f"{MAX_BAD_WORD_CHARS} characters and not only spaces", _Brief(words))
        seqs = self.bad_words_token_ids
        longest = 4 * MAX_BAD_WORD_CHARS + 1  # a character takes at most 4 byte tokens, and the space
        ok = len(seqs) <= 2 * MAX_BAD_WORDS and all(
            isinstance(s, list) and 0 < len(s) <= longest and all(is_int(t) and t >= 0 for t in s) for s in seqs)
        _require(ok, "bad_words_token_ids", "must be non-empty lists of token ids", _Brief(seqs))
        t = self.truncate_prompt_tokens
        ok = t is None or (is_int(t) and (t == -1 or t >= 1))
        _require(ok, "truncate_prompt_tokens", "must be -1 (max_model_len) or at least 1", t)

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token (temperature ~ 0)."""
        return self.temperature < _GREEDY_EPS

    def for_child(self, index: int) -> SamplingParams:
        """Params of the ``index``-th of ``n`` parallel samples: one sequence each, and a distinct
        but reproducible seed when the parent is seeded."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
