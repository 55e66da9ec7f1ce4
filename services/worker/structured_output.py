"""Structured outputs in the worker: grammars compiled with xgrammar, one matcher per request.

Before sampling, every row whose request carries StructuredOutputsParams gets the grammar's
bitmask of allowed next tokens applied to its logits (the others are untouched); after sampling,
each matcher accepts the sampled token. A request resumed after preemption replays its output
tokens through a fresh matcher. Compiled grammars are cached by constraint. The model's EOS ids
are the grammar's stop tokens: once the output is complete only they remain allowed.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from shared.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from services.worker.input_batch import RequestState

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept


class StructuredOutputs:
    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer_path, self.vocab_size, self.eos_token_ids = tokenizer_path, vocab_size, eos_token_ids
        self._compiler = None
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def _xgrammar(self):
        try:
            import xgrammar
        except ImportError:
            raise ValueError("structured outputs need the xgrammar package (pip install xgrammar)") from None
        if self._compiler is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info)
        return xgrammar

    def _compile(self, params: StructuredOutputsParams):
        key = params.key()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        self._xgrammar()
        compiler = self._compiler
        try:
            if params.json is not None:
                grammar = compiler.compile_json_schema(params.json, any_whitespace=False)
            elif params.json_object:
                grammar = compiler.compile_builtin_json_grammar()
            elif params.regex is not None:
                grammar = compiler.compile_regex(params.regex)
            elif params.choice is not None:
                options = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
                grammar = compiler.compile_grammar(f"root ::= {options}")
            else:
                grammar = compiler.compile_grammar(params.grammar)
        except RuntimeError as exc:  # xgrammar's parse and conversion errors
            message = str(exc).splitlines()[0].split("] ", 1)[-1].split(": ", 1)[-1]
            raise ValueError(f"structured_outputs cannot be compiled: {message}") from None
        self._cache[key] = grammar
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar

    def matcher(self, params: StructuredOutputsParams, output_token_ids: list[int]):
        """A matcher at the state after output_token_ids; ValueError for a constraint that does
        not compile (or tokens it cannot have produced)."""
        xgrammar = self._xgrammar()
        matcher = xgrammar.GrammarMatcher(self._compile(params))
        for token in output_token_ids:
            if not matcher.accept_token(token):
                raise ValueError(f"token {token} does not fit the request's structured_outputs")
        return matcher

    def apply(self, logits: torch.Tensor, states: list[RequestState]) -> None:
        """Mask, in place, the tokens each constrained row's grammar does not allow next."""
        rows = [i for i, s in enumerate(states) if s.grammar is not None]
        if not rows:
            return
        xgrammar = self._xgrammar()
        bitmask = xgrammar.allocate_token_bitmask(len(states), self.vocab_size)
        for i in rows:
            states[i].grammar.fill_next_token_bitmask(bitmask, i)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                             indices=rows)

    @staticmethod
    def accept(states: list[RequestState], tokens: list[int]) -> None:
        for state, token in zip(states, tokens):
            grammar = state.grammar
            if grammar is not None and not grammar.is_terminated() and not grammar.accept_token(token):
                log.warning("request %s sampled token %d outside its grammar", state.req_id, token)
