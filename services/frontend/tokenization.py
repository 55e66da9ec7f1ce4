"""The tokenizer's work for one frontend, off the event loop and sized so that one large request
cannot stall the others: texts up to SMALL_TEXT_CHARS go to one thread pool, larger ones to
another (the Rust tokenizer releases the GIL, so both make progress). Chat templates render
here too: the model's in a thread, a client's (when trusted) in the TemplateSandbox."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from services.frontend.errors import bad_request
from services.frontend.limits import check_text_fits
from services.frontend.template_sandbox import TemplateRejected, TemplateSandbox
from shared.frontend_args import RequestLimits
from shared.processor.tokenizer import max_token_bytes, render_chat, template_variables

log = logging.getLogger(__name__)
T = TypeVar("T")
SMALL_TEXT_CHARS = 64 << 10
THREADS_PER_POOL = 2


class Tokenization:
    """Created once the tokenizer is loaded; ``close`` stops its threads and sandbox."""

    def __init__(self, tokenizer: Any, limits: RequestLimits):
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_token_bytes = max_token_bytes(tokenizer)  # None: no bound before tokenizing
        if self.max_token_bytes is None:
            log.warning("this tokenizer does not keep every byte of its input: over-long prompts are counted "
                        "by tokenizing them")
        self._small = ThreadPoolExecutor(THREADS_PER_POOL, thread_name_prefix="tokenize")
        self._large = ThreadPoolExecutor(THREADS_PER_POOL, thread_name_prefix="tokenize-large")
        self._sandbox: TemplateSandbox | None = None

    async def run(self, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the pool for work of ``size`` characters (or tokens)."""
        pool = self._small if size <= SMALL_TEXT_CHARS else self._large
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    def check_fits(self, text: str, max_model_len: int | None, param: str) -> None:
        if max_model_len is not None and self.max_token_bytes is not None:
            check_text_fits(text, max_model_len, self.max_token_bytes, param)

    async def encode(self, texts: list[str], *, add_special_tokens: bool = True, max_model_len: int | None = None,
                     param: str = "prompt") -> list[list[int]]:
        """Token ids of each text, as one job sized by them all (so many prompts in one request
        count as one large request); with ``max_model_len``, a text that cannot fit is refused
        before any is tokenized."""
        for text in texts:
            self.check_fits(text, max_model_len, param)

        def encode_all() -> list[list[int]]:
            return [self.tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]

        return await self.run(sum(map(len, texts)), encode_all)

    async def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self.run(len(ids), self.tokenizer.decode, ids, skip_special_tokens=skip_special_tokens)

    async def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool, *,
                          chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None,
                          max_model_len: int | None = None, add_special_tokens: bool = False) -> list[int]:
        """Messages rendered (the model's template, or the client's ``chat_template`` when this
        server trusts them) and tokenized, with special tokens on top of the template's only when
        asked (vLLM's add_special_tokens); ``max_model_len`` as in ``encode``."""
        variables = template_variables(self.tokenizer, template_kwargs)
        size = sum(len(str(m.get("content") or "")) for m in messages) + len(str(variables.get("documents") or ""))
        if chat_template is None:
            text = await self._render_own(size, messages, add_generation_prompt, variables)
        else:
            text = await self._render_client(chat_template, messages, add_generation_prompt, variables)
        (ids,) = await self.encode([text], add_special_tokens=add_special_tokens, max_model_len=max_model_len,
                                   param="messages")
        return ids

    async def _render_own(self, size: int, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          variables: dict[str, Any]) -> str:
        try:
            return await self.run(size, render_chat, self.tokenizer, messages,
                                  add_generation_prompt=add_generation_prompt, **variables)
        except ValueError as exc:  # no template, or it cannot render these messages (render_chat)
            raise bad_request(str(exc), param="messages") from None

    async def _render_client(self, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                             variables: dict[str, Any]) -> str:
        if not self.limits.trust_request_chat_template:
            msg = ("Chat template is passed with request, but --trust-request-chat-template is not set. "
                   "Refused request with untrusted chat template.")
            raise bad_request(msg, param="chat_template")
        if variables.get("continue_final_message"):  # apply_chat_template's cut, which the sandbox does not make
            raise bad_request("continue_final_message cannot be combined with a chat_template sent in the request.",
                              param="continue_final_message")
        if self._sandbox is None:
            self._sandbox = TemplateSandbox(self.limits.chat_template_timeout, self.limits.max_request_body_bytes)
        context = {**self.tokenizer.special_tokens_map, **variables, "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return await self._sandbox.render(template, context)
        except TemplateRejected as exc:
            msg = str(exc)
            raise bad_request(f"{msg[:1].upper()}{msg[1:]}.", param="chat_template") from None

    async def close(self) -> None:
        self._small.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)
        if self._sandbox is not None:
            await self._sandbox.close()
