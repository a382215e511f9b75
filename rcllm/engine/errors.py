"""Refused input: the one exception that means "the caller sent something we will not take"."""

from __future__ import annotations


class RequestError(ValueError):
    """Input refused for what it is: an unknown id or policy, more candidates than a prompt
    holds, a prompt longer than the model takes, a malformed request body. The caller can fix it.

    Servers answer it with ``status`` (4xx) and its message; any other exception, a ValueError
    included, is a fault of ours and answers 500. A ValueError subclass, so that callers that
    catch ValueError for bad input (the CLI) keep working.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
