"""Structured outputs in the worker: grammars compiled with xgrammar, one matcher per request.

Before sampling, every row whose request carries StructuredOutputsParams gets the grammar's
bitmask of allowed next tokens applied to its logits (the others are untouched); after sampling,
each matcher accepts the sampled token (on an earlier pipeline stage, which samples nothing, the
tokens of each step's outcome). A request resumed after preemption replays its output
tokens through a fresh matcher (grammars are compiled, cached and bounded in time by
grammar_compiler.py). The model's EOS ids are the grammar's stop tokens: once the output is
complete only they remain allowed, and the sampled stop token terminates the matcher. A
terminated matcher is never masked or advanced again: its request is reported as stopped (as
vLLM finishes it), even under ignore_eos. Speculative proposals are cut at the first token the
grammar forbids (allowed_prefix), so none is verified that cannot be kept. json_object is the schema {"type": "object"}, so the
output is an object, never another value. An error in one request's matcher fails that request
alone.
"""

from __future__ import annotations

import logging

import torch

from services.worker.grammar_compiler import GrammarCompiler, import_xgrammar
from shared.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)


class StructuredOutputs:
    """The matchers of the requests with structured_outputs, by request id."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer_path, vocab_size, eos_token_ids)
        self.matchers: dict[str, object] = {}

    def add(self, req_id: str, params: StructuredOutputsParams, output_token_ids: list[int]) -> None:
        """A matcher for req_id at the state after output_token_ids; ValueError for a constraint
        that does not compile (or tokens it cannot have produced)."""
        self.matchers.pop(req_id, None)
        grammar = self.compiler.compile(params)
        matcher = import_xgrammar().GrammarMatcher(grammar)
        for token in output_token_ids:
            if matcher.is_terminated():  # tokens an engine a step late added after the stop
                break
            if not matcher.accept_token(token):
                raise ValueError(f"token {token} does not fit the request's structured_outputs")
        self.matchers[req_id] = matcher

    def allowed_prefix(self, req_id: str, tokens: list[int]) -> list[int]:
        """Proposed `tokens` (to follow the request's tokens so far) up to the first its grammar
        forbids: that one cannot be sampled there, so verifying it and those after it is wasted.
        All of them for a request without an active matcher; the matcher ends as it was
        (xgrammar rolls back what it accepted)."""
        grammar = self.matchers.get(req_id)
        if not tokens or not _active(grammar):
            return tokens
        n = 0
        try:
            while n < len(tokens) and grammar.accept_token(tokens[n]):
                n += 1
        except RuntimeError as exc:  # a broken matcher: the step's sampling fails its request
            _grammar_error("cannot check the proposals", exc)
        if n:
            grammar.rollback(n)
        return tokens[:n]

    def drop(self, req_id: str) -> None:
        self.matchers.pop(req_id, None)

    def clear(self) -> None:
        self.matchers.clear()

    def apply(self, logits: torch.Tensor, req_ids: list[str]) -> dict[str, str]:
        """Mask, in place, the tokens each constrained row's grammar does not allow next (row i
        is req_ids[i]). Rows whose matcher has terminated are left alone. Returns {req_id: error}
        for the rows whose matcher failed (left unmasked; the caller fails their requests)."""
        rows = [i for i, req_id in enumerate(req_ids) if _active(self.matchers.get(req_id))]
        if not rows:
            return {}
        xgrammar = import_xgrammar()
        bitmask = xgrammar.allocate_token_bitmask(len(req_ids), self.vocab_size)
        failed, masked = {}, []
        for i in rows:
            try:
                self.matchers[req_ids[i]].fill_next_token_bitmask(bitmask, i)
                masked.append(i)
            except RuntimeError as exc:  # xgrammar's failed checks; the error stays with its request
                failed[req_ids[i]] = _grammar_error("cannot compute the allowed tokens", exc)
        if masked:
            xgrammar.apply_token_bitmask_inplace(
                logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=masked
            )
        return failed

    def accept(self, req_ids: list[str], tokens: list[int]) -> tuple[list[str], dict[str, str]]:
        """Advance each active matcher by its row's token. Returns the requests whose matcher
        terminated with it (stopped), and {req_id: error} for tokens the grammar rejected."""
        stopped, failed = [], {}
        for req_id, token in zip(req_ids, tokens):
            grammar = self.matchers.get(req_id)
            if not _active(grammar):
                continue
            try:
                accepted = grammar.accept_token(token)
            except RuntimeError as exc:
                failed[req_id] = _grammar_error("cannot advance", exc)
                continue
            if not accepted:
                failed[req_id] = f"sampled token {token} does not fit the request's structured_outputs"
            elif grammar.is_terminated():
                stopped.append(req_id)
        return stopped, failed


def _active(grammar) -> bool:
    """A matcher still constraining its request (not absent, not terminated)."""
    return grammar is not None and not grammar.is_terminated()


def _grammar_error(what: str, exc: Exception) -> str:
    log.warning("structured outputs: %s: %s", what, exc)
    return f"structured_outputs: {what}: {type(exc).__name__}"
