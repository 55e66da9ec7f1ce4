"""Speculative decoding settings, given as vLLM's: --speculative-config '{"method": "ngram", ...}'
or LLM(speculative_config={...}). Nothing here imports torch (shared/draft_model.py reads a draft
model's config)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from shared.config_checks import check_bool_fields

SPEC_METHODS = ("ngram", "suffix", "draft_model", "eagle", "eagle3")
MODEL_METHODS = ("draft_model", "eagle", "eagle3")  # a model on the workers drafts (shared/draft_model.py)
_NGRAM_KEYS = ("prompt_lookup_max", "prompt_lookup_min")
_DRAFT_KEYS = ("model", "draft_tensor_parallel_size", "revision", "draft_cost")


@dataclass(frozen=True)
class SpeculativeConfig:
    """method "ngram": the engine proposes up to num_speculative_tokens tokens per decoding
    request by prompt lookup (the tokens that followed the latest earlier occurrence of the
    request's last n tokens, n from prompt_lookup_max down to prompt_lookup_min); the workers
    verify them in one forward. With async scheduling every method proposes on the workers
    (proposals_on_workers below). disable_by_batch_size: no proposals while at least this many
    requests run (the step is compute-bound; None: never off by batch size).

    method "suffix": suffix decoding (shared/proposers/suffix.py) over a suffix tree of
    the request's tokens and one of the latest suffix_decoding_max_cached_requests outputs (0:
    none), at most suffix_decoding_max_tree_depth tokens deep (matched and proposed together),
    at most suffix_decoding_max_spec_factor proposed tokens per matched one, each only while the
    continuation's empirical probability is at least suffix_decoding_min_token_prob. vLLM's
    names and defaults; num_speculative_tokens defaults to the tree depth (at most 32).

    method "draft_model": `model` (a directory or hub id, revision at `revision`) is a smaller
    checkpoint with the target's vocabulary; it runs on the workers beside the target, sharded
    like it over the tensor-parallel ranks (draft_tensor_parallel_size unset or the target's
    tensor_parallel_size) or whole on each of them (draft_tensor_parallel_size 1), on the last
    pipeline stage, and proposes the next tokens of each request.
    draft_cost (pagedserve's own): what drafting one token costs, as a fraction of a target
    decode step, for the adaptive rule; default: estimated from the two checkpoints.

    methods "eagle" and "eagle3": `model` is an EAGLE-1/2 or EAGLE-3 draft head for a Llama-family
    target (shared/eagle.py, services/worker/eagle_runner.py), run on the workers as draft_model
    is, from the target's hidden states; the same keys as draft_model."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int | None = None
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    model: str | None = None
    draft_tensor_parallel_size: int | None = None
    revision: str | None = None
    draft_cost: float | None = None  # drafting one token, in target decode steps (None: estimated)

    def __post_init__(self) -> None:
        check_bool_fields(self)
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config method must be one of {SPEC_METHODS}, got {self.method!r}")
        self._check_suffix()
        self._check_method_keys()
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size",
                     "draft_tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"speculative_config {name} must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > 32:
            raise ValueError(f"speculative_config num_speculative_tokens must be at most 32, got {self.num_speculative_tokens}")
        lo, hi = self.lookup_range
        if lo > hi:
            raise ValueError(f"speculative_config prompt_lookup_min ({lo}) must not exceed prompt_lookup_max ({hi})")

    def _check_suffix(self) -> None:
        depth, cached = self.suffix_decoding_max_tree_depth, self.suffix_decoding_max_cached_requests
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 1024:
            raise ValueError(f"speculative_config suffix_decoding_max_tree_depth must be an integer in [1, 1024], got {depth!r}")
        if isinstance(cached, bool) or not isinstance(cached, int) or cached < 0:
            raise ValueError(
                f"speculative_config suffix_decoding_max_cached_requests must be a non-negative integer, got {cached!r}"
            )
        for name, low, high in (("suffix_decoding_max_spec_factor", 0.0, 1024.0),
                                ("suffix_decoding_min_token_prob", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"speculative_config {name} must be a number in [{low:g}, {high:g}], got {value!r}")

    def _check_method_keys(self) -> None:
        """Each method's own keys, and none of the other's."""
        unused = _NGRAM_KEYS if self.model_drafts else _DRAFT_KEYS
        given = [name for name in unused if getattr(self, name) is not None]
        if given:
            raise ValueError(f"speculative_config {given}: not used by method {self.method!r}")
        if not self.model_drafts:
            return
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f'speculative_config method "{self.method}" needs a "model" (the draft checkpoint)')
        cost = self.draft_cost
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost <= 1e3):
            raise ValueError(f"speculative_config draft_cost must be a number in [0, 1000], got {cost!r}")

    @property
    def model_drafts(self) -> bool:
        """Whether a model drafts on the workers (draft_model, eagle, eagle3)."""
        return self.method in MODEL_METHODS

    @property
    def lookup_range(self) -> tuple[int, int]:
        """(min, max) n-gram sizes: one given sets both, as in vLLM; neither: 1 to 5."""
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if lo is None and hi is None:
            return 1, 5
        return (lo if lo is not None else hi), (hi if hi is not None else lo)

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From a JSON object (the flag), a dict (LLM's keyword) or None; ValueError naming an
        unknown key or a bad value."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"--speculative-config must be a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unsupported key(s) {unknown}; supported: {sorted(known)}")
        if "method" not in value:
            raise ValueError('speculative_config needs a "method" (supported: ' + ", ".join(SPEC_METHODS) + ")")
        if value["method"] == "suffix" and "num_speculative_tokens" not in value:
            depth = value.get("suffix_decoding_max_tree_depth", 24)
            value = {**value, "num_speculative_tokens": min(32, depth) if isinstance(depth, int) else 24}
        return cls(**value)


def proposals_on_workers(async_scheduling: bool, pipeline_parallel_size: int) -> bool:
    """Whether the workers make every method's proposals and keep them for the request's next
    step (services/worker/proposals.py): with async scheduling, whose next step is planned before
    this step's tokens reach the engine. Not over pipeline stages: there a request is in one step
    in flight at most, so the engine proposes as without async scheduling, and every stage gets
    the proposals with the plan."""
    return async_scheduling and pipeline_parallel_size == 1
