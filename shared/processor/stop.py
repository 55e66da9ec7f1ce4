"""Stop strings, checked in the engine as tokens are sampled.

A request with stop strings gets a StopStrings checker when the engine takes it: the processor's
IncrementalDetokenizer fed each sampled token, so the request finishes ("stop") on the step that
completed its stop string, as it would on EOS, and no step is spent after it. The frontend or the
offline LLM runs the same detokenizer over the same tokens and cuts the text at the same place.
Requests without stop strings cost the engine nothing; an engine that cannot load a tokenizer
(its image carries none) leaves the check to the processor, which then aborts the request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence as Seq

from shared.processor.detokenizer import IncrementalDetokenizer
from shared.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class StopStrings:
    """A request's stop-string check: ``add(token)`` says whether that token completed one."""

    def __init__(self, tokenizer, prompt_token_ids: Seq[int], params: SamplingParams, output_token_ids: Seq[int] = ()):
        self._detok = IncrementalDetokenizer(tokenizer, list(prompt_token_ids), params)
        self._detok.add(list(output_token_ids))  # a resumption: its text so far

    def add(self, token_id: int) -> bool:
        return self._detok.add([token_id]) is not None


class StopStringFactory:
    """Checkers for one model's requests; the tokenizer loads on the first request with stop
    strings (engines that never see one never load it)."""

    def __init__(self, tokenizer_path: str):
        self.path = tokenizer_path
        self._tokenizer = None
        self._failed = False
        self._lock = threading.Lock()

    def checker(self, prompt_token_ids: Seq[int], params: SamplingParams,
                output_token_ids: Seq[int] = ()) -> StopStrings | None:
        if not params.stop:
            return None
        tokenizer = self._load()
        return None if tokenizer is None else StopStrings(tokenizer, prompt_token_ids, params, output_token_ids)

    def _load(self):
        with self._lock:
            if self._tokenizer is None and not self._failed:
                try:
                    from shared.processor.tokenizer import load_tokenizer

                    self._tokenizer = load_tokenizer(self.path)
                except Exception as exc:  # noqa: BLE001 no tokenizer here: the processor checks stops alone
                    self._failed = True
                    log.warning("stop strings are checked by the frontend only: no tokenizer (%s)", exc)
            return self._tokenizer
