"""The one error the request processor raises for a bad request."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that cannot be served as asked: a ValueError offline, a 400 naming ``param``
    (with OpenAI's ``code``) over HTTP. The message is the same in both."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code
