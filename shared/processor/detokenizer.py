"""Incremental detokenization and stop strings.

Text is emitted only once it is stable: a multi-byte UTF-8 character split across tokens shows
up as U+FFFD until its last byte arrives, so that text is held back; and while streaming, the
tail that could still grow into a stop string is held back too, so a partial stop string is
never sent.

Stop strings are searched only in the text after the first ``min_tokens`` tokens (vLLM's rule).
The same class runs in the engine for requests with stop strings (shared.processor.stop), so the
engine finishes such a request on the step that completed its stop string, and here, where it
cuts the text: both see the same tokens through the same code, so they agree on where it stops.
"""

from __future__ import annotations

from shared.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5  # prompt tokens decoded along with the first outputs, for correct leading spaces


def decoder_of(tokenizer):
    """A function decoding token ids as ``tokenizer.decode`` does: straight through the Rust
    tokenizer when transformers would add nothing to it (no clean-up of spaces), which spares
    transformers' Python wrapper on every token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return backend.decode
    return tokenizer.decode


class IncrementalDetokenizer:
    """Per token, decodes a window of a few tokens (the last stable text's tokens and the new
    ones), never the whole output, so each token costs the same however long the text grows."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self._decoder = decoder_of(tokenizer)
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._stop_floor = 0  # stop strings start at or after this offset (the min_tokens text)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self.stop_str: str | None = None
        self._sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self._decoder(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> str | None:
        """Take new tokens one at a time; returns the stop string that matched, if one did
        (self.text is then cut at it, and later tokens are ignored)."""
        for token in token_ids:
            if self.stop_str is not None:
                break
            self._ids.append(token)
            self._num_tokens += 1
            before = self._decode(self._ids[self._prefix_offset : self._read_offset])
            after = self._decode(self._ids[self._prefix_offset :])
            if len(after) <= len(before) or after.endswith("\ufffd"):
                continue  # nothing new yet, or an incomplete UTF-8 sequence
            start = len(self.text)
            self.text += after[len(before) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            if self._num_tokens <= self._min_tokens:
                self._stop_floor = len(self.text)
            else:
                self._check_stop(start)
        return self.stop_str

    def _check_stop(self, new_from: int) -> None:
        for stop in self.stop:
            at = self.text.find(stop, max(self._stop_floor, new_from - len(stop) + 1))
            if at != -1:
                self.stop_str = stop
                self.text = self.text[: at + len(stop)] if self.include_stop else self.text[:at]
                return

    def take_stream_delta(self, finished: bool) -> str:
        """The text not yet sent that can no longer become part of a stop string."""
        end = len(self.text) if finished or self.stop_str is not None else max(self._sent, len(self.text) - self._hold)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
