"""Errors that reach a client as GraphQL errors with a stable ``extensions.code``.

Plain exceptions (no strawberry import) so that ``db/`` and ``services/`` can raise them too.
Expected mutation failures are *not* these: they are ``UserError`` data in the payload.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request-level error: bad arguments, malformed ids or cursors, limits."""

    code = "BAD_USER_INPUT"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra

    @property
    def extensions(self) -> dict[str, Any]:
        return {"code": self.code, **self.extra}


class InvalidIdError(ApiError):
    code = "INVALID_ID"


class InvalidCursorError(ApiError):
    code = "INVALID_CURSOR"


class InvalidPaginationError(ApiError):
    code = "INVALID_PAGINATION"


class PageSizeExceededError(ApiError):
    code = "PAGE_SIZE_EXCEEDED"


class NotImplementedYetError(ApiError):
    code = "NOT_IMPLEMENTED"
