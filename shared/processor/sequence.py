"""One generated sequence as the user sees it: tokens, text, logprobs and how it finished.

The offline LLM and the HTTP frontend both drive it with the engine's deltas, so both apply stop
strings, report errors and count tokens the same way.
"""

from __future__ import annotations

from shared.processor.detokenizer import IncrementalDetokenizer
from shared.protocol import RequestDelta, TokenLogprobs
from shared.sampling_params import SamplingParams


class Sequence:
    def __init__(self, req_id: str, index: int, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 prompt_index: int = 0, eos_token_ids: tuple[int, ...] = ()):
        self.req_id = req_id
        self.index = index  # the choice index: prompt p, sample j of n -> p * n + j
        self.prompt_index = prompt_index
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 1.., with the first token
        self.finish_reason: str | None = None
        self.pooled: list[float] | None = None  # a pooling request's vector, once finished
        self.stop_reason: int | str | None = None
        self.error: str | None = None  # finish_reason "error": why (e.g. a grammar that does not compile)
        self.num_cached_tokens = 0
        self._logprobs_sent = 0
        self._token_ids_sent = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: RequestDelta) -> bool:
        """Apply an engine delta. Returns True when a stop string finished the sequence here but
        the engine had not finished it (an engine without the tokenizer): the caller must then
        abort the request in the engine."""
        if self.finished:
            return False
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.pooled is not None:
            self.pooled = delta.pooled
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None and delta.prompt_logprobs:
            self.prompt_logprobs = delta.prompt_logprobs
        self.token_ids.extend(delta.new_token_ids)
        self.logprobs.extend(delta.new_logprobs)
        stop = self.detok.add(self._text_token_ids(delta))
        if stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
            return delta.finish_reason is None
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.error = delta.finish_reason, delta.stop_reason, delta.error
        return False

    def _text_token_ids(self, delta: RequestDelta) -> list[int]:
        """The delta's tokens that become text: all but an EOS or stop token id that finished the
        sequence, whose text shows only with include_stop_str_in_output (vLLM's rule; otherwise
        skip_special_tokens=False, which tool parsers set, would put "<|im_end|>" in the text)."""
        ids = delta.new_token_ids
        stopped_by_token = delta.stop_reason is not None or (bool(ids) and ids[-1] in self.eos_token_ids)
        if delta.finish_reason == "stop" and stopped_by_token and not self.params.include_stop_str_in_output:
            return ids[:-1]
        return ids

    def fail(self, message: str) -> None:
        """The engine refused or lost this sequence."""
        if not self.finished:
            self.finish_reason, self.error = "error", message

    def take_stream_delta(self) -> tuple[str, list[TokenLogprobs]]:
        """For streaming: the text that is safe to send now (never part of a possible stop
        string) and the logprobs of the tokens that arrived since the last call."""
        text = self.detok.take_stream_delta(self.finished)
        logprobs = self.logprobs[self._logprobs_sent :]
        self._logprobs_sent = len(self.logprobs)
        return text, logprobs

    def take_stream_token_ids(self) -> list[int]:
        """For streaming: the token ids that arrived since the last call."""
        ids = self.token_ids[self._token_ids_sent :]
        self._token_ids_sent = len(self.token_ids)
        return ids

    @property
    def text(self) -> str:
        return self.detok.text

    def cumulative_logprob(self) -> float | None:
        if self.params.logprobs is None:
            return None
        return sum(lp.logprobs[0] for lp in self.logprobs)
