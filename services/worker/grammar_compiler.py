"""Compiling structured-outputs constraints with xgrammar: cached, and bounded in size and time.

Compiling runs inside a step, so every request of the step waits for it; some constraints take
far longer than others (a single 100,000-character literal takes seconds, and the time grows
faster than the length). A constraint is at most MAX_CONSTRAINT_CHARS long, and each compile
runs in a daemon thread (xgrammar releases the GIL) that the step waits on for at most
compile_timeout_s: past it, the request fails alone and the compile finishes in the background,
its result discarded. While that runaway compile still runs, new constraints fail at once rather
than queue behind it; constraints already compiled are served from the cache meanwhile.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from shared.sampling_params import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept
COMPILE_TIMEOUT_S = 5.0
MAX_CONSTRAINT_CHARS = 65536  # of the constraint as JSON; OpenAI allows 15,000 characters of schema strings
_ANY_OBJECT = {"type": "object"}


def import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured outputs need the xgrammar package (pip install xgrammar)") from None
    return xgrammar


class GrammarCompiler:
    def __init__(
        self, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int], compile_timeout_s: float = COMPILE_TIMEOUT_S
    ):
        self.tokenizer_path, self.vocab_size, self.eos_token_ids = tokenizer_path, vocab_size, eos_token_ids
        self.compile_timeout_s = compile_timeout_s
        self._compiler = None  # built on first use: loading the tokenizer's vocabulary takes a while
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._runaway: threading.Thread | None = None  # a compile that outlived its timeout

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of a constraint; ValueError when it does not compile in time."""
        key = params.key()
        if len(key) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"structured_outputs must be at most {MAX_CONSTRAINT_CHARS} characters as JSON, "
                             f"got {len(key)}")
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self._runaway is not None and self._runaway.is_alive():
            raise ValueError("structured_outputs: the grammar compiler is still busy with an earlier "
                             "constraint that took too long; try again later")
        grammar = self._compile_bounded(self._xgrammar_compiler(), params)
        self._cache[key] = grammar
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar

    def _xgrammar_compiler(self):
        xgrammar = import_xgrammar()
        if self._compiler is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler

    def _compile_bounded(self, compiler, params: StructuredOutputsParams):
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["grammar"] = _compile(compiler, params)
            except Exception as exc:  # noqa: BLE001 (re-raised by the waiting step)
                outcome["error"] = exc

        thread = threading.Thread(target=run, name="grammar-compile", daemon=True)
        thread.start()
        thread.join(self.compile_timeout_s)
        if thread.is_alive():
            self._runaway = thread
            raise ValueError(f"structured_outputs took longer than {self.compile_timeout_s:g}s to compile")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["grammar"]


def _compile(compiler, params: StructuredOutputsParams):
    try:
        if params.json is not None:
            return compiler.compile_json_schema(params.json, any_whitespace=False)
        if params.json_object:  # any object; xgrammar's builtin JSON grammar also allows arrays and scalars
            return compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=False)
        if params.regex is not None:
            return compiler.compile_regex(params.regex)
        if params.choice is not None:
            options = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
            return compiler.compile_grammar(f"root ::= {options}")
        return compiler.compile_grammar(params.grammar)
    except RuntimeError as exc:  # xgrammar's parse and conversion errors (and RecursionError)
        message = str(exc).splitlines()[0].split("] ", 1)[-1].split(": ", 1)[-1]
        raise ValueError(f"structured_outputs cannot be compiled: {message}") from None
