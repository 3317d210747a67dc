"""The error hierarchy. The HTTP edge maps `ApiError`s to statuses; the CLI maps the rest."""

from __future__ import annotations


class FlowbotError(Exception):
    """Base of every error flowbot raises on purpose."""


class ConfigError(FlowbotError):
    def __init__(self, errors: list[str], warnings: list[str]) -> None:
        super().__init__(f"{len(errors)} problem(s) in the config")
        self.errors = errors
        self.warnings = warnings


class ApiError(FlowbotError):
    """A request we refuse; it changed nothing. `code` is for machines, `message` for people."""

    status = 400

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def __reduce__(self) -> tuple[object, ...]:
        # keyword extras included, so the error survives the trip from the database process
        return (_rebuild, (type(self), self.code, self.message, self.extra))

    def body(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, **self.extra}


def _rebuild(cls: type[ApiError], code: str, message: str, extra: dict[str, object]) -> ApiError:
    return cls(code, message, **extra)


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Gone(ApiError):
    status = 410


class RequestTimeout(ApiError):
    """The request (its headers or body) did not arrive in time; the connection is closed."""

    status = 408


class TooLarge(ApiError):
    status = 413


class DatabaseInUse(FlowbotError):
    """Another process already serves this database file (one writer per SQLite file)."""


class TooMany(ApiError):
    status = 429


class StorageUnavailable(ApiError):
    """The database cannot take the request now (disk full, locked past its timeout,
    read-only, its process gone): 503 with Retry-After; the client should retry."""

    status = 503
    retry_after = 5


class VariableTooLarge(FlowbotError):
    """An event would make a variable larger than `bot.max_variable_bytes` (`scope`
    "variable"), or all of a conversation's variables larger than
    `bot.max_conversation_bytes` (`scope` "conversation"; `variable` is then the largest).
    Sizes in bytes of compact UTF-8 JSON. The ledger refuses the event: nothing it did is
    kept, and the user is told `error_message`."""

    def __init__(self, variable: str, size: int, limit: int, scope: str, flow: str,
                 block: str) -> None:
        what = (f"variable {variable!r}" if scope == "variable"
                else f"the conversation's variables (largest: {variable!r})")
        super().__init__(f"{what} would be {size} bytes; the limit is {limit} "
                         f"(bot.max_{scope}_bytes), at {flow}/{block}")
        self.variable, self.size, self.limit, self.scope = variable, size, limit, scope
        self.flow, self.block = flow, block

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.variable, self.size, self.limit, self.scope, self.flow,
                             self.block))


class StaleState(FlowbotError):
    """A conversation changed under us (optimistic concurrency); the caller retries."""


class StorageError(FlowbotError):
    """An operator's command (`check`, `backup`, `conversations`) could not read or copy the
    database: missing, unreadable, unreachable. The message is a sentence for a person; the
    driver's error is translated in storage/ (nothing else imports a driver)."""


class NoDatabase(StorageError):
    """There is no database yet: no SQLite file, or no flowbot tables in PostgreSQL (both
    are created at the first start)."""
