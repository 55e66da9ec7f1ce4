"""What a finished request reports as a whole: one finish reason over its choices, and usage."""

from __future__ import annotations

from dataclasses import dataclass

from shared.processor.sequence import Sequence

# Precedence of the choices' reasons for the request's one reason: the first that any choice has.
_PRECEDENCE = ("error", "abort", "length", "stop")


def request_finish_reason(choice_reasons: list[str | None], failed: bool) -> str:
    """One finish reason for a request from its choices' reasons (None: not finished, so
    abandoned early, i.e. aborted). ``failed``: the request failed after admission."""
    if failed:
        return "error"
    reasons = {"abort" if r is None else r for r in choice_reasons}
    return next((r for r in _PRECEDENCE if r in reasons), "stop")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage(prompts: list[list[int]], sequences: list[Sequence]) -> Usage:
    """Each prompt counted once (however many samples it has), every generated token."""
    return Usage(sum(map(len, prompts)), sum(len(s.token_ids) for s in sequences))
