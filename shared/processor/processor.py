"""The request processor: everything that happens to a request outside the model, shared by the
offline LLM and the HTTP frontend so the same request gives the same result in both.

- validation: prompts against the vocabulary and the context (truncated first when
  truncate_prompt_tokens asks), max_tokens against the context, token-id parameters against the
  vocabulary (shared.processor.checks);
- bad_words to the token id sequences the worker bans (``bad_words_token_ids``);
- the model's generation_config defaults for the fields the user did not set (defaults);
- prompts and chat messages to token ids (tokenizer);
- n fan-out: prompt p, sample j -> one engine request per choice index p * n + j (``sequences``);
- per sequence, incremental detokenization with stop strings, logprobs, finish reasons (Sequence);
- logprob token text (TokenText), the request's finish reason and usage (outcome).

Stop strings are checked where tokens are sampled: the engine runs the same detokenizer for a
request with stop strings (shared.processor.stop) and finishes it on the step that completed
one, like EOS, so no step is spent after a stop; the Sequence cuts the text at the same place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from msgspec.structs import replace

from shared.processor import checks
from shared.processor.defaults import merge_model_defaults
from shared.processor.errors import InvalidRequest
from shared.processor.pooling import resolve_truncation
from shared.processor.sequence import Sequence
from shared.processor.token_text import TokenText
from shared.processor.tokenizer import render_chat, template_variables
from shared.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelFacts:
    """What the processor must know of the model (the engine's ModelInfo, or ModelConfig offline)."""

    vocab_size: int
    max_model_len: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()  # a final EOS stays out of the text, as a stop token id does


class RequestProcessor:
    def __init__(self, tokenizer, model: ModelFacts):
        self.tokenizer = tokenizer
        self.model = model
        self.token_text = TokenText(tokenizer)

    # ----- prompts ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    chat_template: str | None = None, **variables: Any) -> list[int]:
        """A conversation rendered with the model's template (or ``chat_template``) and tokenized
        (the template carries any BOS); ``variables`` (chat_template_kwargs, tools) reach the
        template, less apply_chat_template's own options."""
        text = render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           chat_template=chat_template, **template_variables(self.tokenizer, variables))
        return self.encode(text, add_special_tokens=False)

    def check_prompt(self, ids: list[int], param: str = "prompt", truncate_prompt_tokens: int | None = None) -> list[int]:
        """The prompt, cut to its last ``truncate_prompt_tokens`` tokens when given (-1:
        max_model_len, as vLLM's; pooling's rule), and checked against the vocabulary and context."""
        keep = resolve_truncation(truncate_prompt_tokens, self.model.max_model_len)
        ids = ids[-keep:] if keep else ids
        checks.check_prompt(ids, self.model.vocab_size, self.model.max_model_len, param)
        return ids

    # ----- parameters ---------------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams, prompts: list[list[int]], default_max_tokens: int | None,
                        prompt_param: str = "prompt", max_tokens_param: str = "max_tokens") -> SamplingParams:
        """The engine parameters of a request with these (checked) prompts: the user's max_tokens
        must fit, the model's defaults fill what the user left unset, token ids must be in the
        vocabulary. Raises InvalidRequest (or ValueError from SamplingParams)."""
        m = self.model
        checks.check_max_tokens(params, [len(p) for p in prompts], m.max_model_len, prompt_param, max_tokens_param)
        params = merge_model_defaults(params, m.generation_defaults, default_max_tokens)
        if params.bad_words or params.bad_words_token_ids:
            params = replace(params, bad_words_token_ids=self.bad_words_token_ids(params.bad_words or []))
        checks.check_token_params(params, m.vocab_size)
        return params

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenizing of bad words: each word (left-stripped) as it is, and with a leading
        space too when that spells it with a different first token and as many tokens (a word
        inside the text, for a tokenizer that folds the space into the word)."""
        seqs = []
        for word in words:
            plain = self.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise InvalidRequest(f"bad_words: {word!r} has no tokens.", "bad_words")
            spaced = self.encode(" " + word.lstrip(), add_special_tokens=False)
            seqs.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                seqs.append(spaced)
        return seqs

    # ----- fan-out ------------------------------------------------------------------------------

    def sequences(self, base_id: str, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """One Sequence per choice, in choice order: prompt p, sample j -> index p * n + j, engine
        request id ``{base_id}-{index}``, its own seed when the request is seeded."""
        return [
            Sequence(f"{base_id}-{p * params.n + j}", p * params.n + j, self.tokenizer, ids, params.for_child(j), p,
                     self.model.eos_token_ids)
            for p, ids in enumerate(prompts)
            for j in range(params.n)
        ]
