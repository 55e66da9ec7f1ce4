"""What a proposer reads of a request: the engine's Request and the worker's RequestState both
have it."""

from __future__ import annotations

from typing import Protocol


class TokenHistory(Protocol):
    req_id: str

    @property
    def token_ids(self) -> list[int]:
        """The prompt, then the outputs (kept and extended in place, not copied)."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def output_token_ids(self) -> list[int]: ...
