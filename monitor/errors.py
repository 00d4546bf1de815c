"""The one exception tree of genauth-monitor.

    MonitorError
    ├── ConfigError        bad configuration; carries one line per problem (exit code 2)
    ├── UsageError         a command line that cannot be run as given (exit code 2)
    ├── BadParameter       a parameter of a command (CLI option, API query) is not usable:
    │                      ``name`` and ``problem`` (CLI exit code 2, HTTP 400)
    ├── NotFound           what a command asked about does not exist: ``what`` is ``target``,
    │                      ``snapshot`` or ``moment`` (CLI exit code 2 or 4, HTTP 404)
    ├── UpstreamError      a failed poll of the GenAuth API, classified by ``reason``
    ├── StorageError       the database is unreachable or refused a write
    │   ├── StaleStateError  the target's state changed under this writer: read it again
    │   └── ClaimLost        a replica wrote under a claim another replica has taken since
    ├── DeliveryError      an alert sink did not accept a delivery (it will be retried)
    ├── HttpFailure        (monitor.httpio) a request past its deadline or size cap; the
    │                      client and the sinks turn it into UpstreamError / DeliveryError
    └── UnusableDocument   (monitor.core.canonical) JSON without a canonical form: the poll
                           path records it as an ``invalid_response`` failure

Foreign exceptions (requests, SQLAlchemy, pydantic) are translated at the module that talks to
the foreign library, never leaked upward. No message in this tree ever carries a secret value.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "REASONS",
    "BadParameter",
    "ClaimLost",
    "ConfigError",
    "DeliveryError",
    "MonitorError",
    "NotFound",
    "Reason",
    "StaleStateError",
    "StorageError",
    "UpstreamError",
    "UsageError",
]

Reason = Literal[
    "network", "timeout", "http_status", "api_error", "auth", "invalid_response", "internal"
]
# ``internal``: a bug of ours inside a poll. It still counts as a failed poll (``up`` = 0,
# poll_failing), so a monitor with a bug is never silent while its metrics look fine.
REASONS: Final[tuple[Reason, ...]] = (
    "network",
    "timeout",
    "http_status",
    "api_error",
    "auth",
    "invalid_response",
    "internal",
)


class MonitorError(Exception):
    """Base of every error genauth-monitor raises on purpose."""


class ConfigError(MonitorError):
    """The configuration is unusable; ``problems`` holds one line per problem, key path first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class UsageError(MonitorError):
    """A command line that cannot be run as given: printed as one line, exit code 2."""


class BadParameter(MonitorError):
    """A command's parameter ``name`` cannot be used; ``problem`` says why (never a secret)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


NotFoundWhat = Literal["target", "snapshot", "moment"]


class NotFound(MonitorError):
    """Nothing matches: an unknown ``target`` or ``snapshot``, or no configuration observed at
    that ``moment``."""

    def __init__(self, what: NotFoundWhat, message: str) -> None:
        super().__init__(message)
        self.what: NotFoundWhat = what
        self.message = message


class UpstreamError(MonitorError):
    """A poll failed. ``reason`` is one of :data:`REASONS`; the rest is kept for the record."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        http_status: int | None = None,
        api_code: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message
        self.http_status = http_status
        self.api_code = api_code
        self.request_id = request_id
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"UpstreamError(reason={self.reason!r}, message={self.message!r}, "
            f"http_status={self.http_status!r}, api_code={self.api_code!r}, "
            f"request_id={self.request_id!r})"
        )


class StorageError(MonitorError):
    """The database could not be reached or refused the operation. ``permanent``: it refused
    this very data (a value it cannot store), so trying again cannot succeed."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class DeliveryError(MonitorError):
    """A sink refused or did not answer; the message never holds the sink URL (it may be a
    credential, as Slack's are) nor the payload. ``permanent``: the sink rejected this payload
    itself (an HTTP 4xx other than 408/425/429), so retrying the same body will not help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class StaleStateError(StorageError):
    """The target's current snapshot in the database is not the one the writer assumed
    (another process recorded something meanwhile): read the state again and re-judge."""


class ClaimLost(StorageError):
    """A replica wrote under a claim it no longer holds (another replica took the target, or
    took it and gave it back: a newer epoch). Nothing was written; ``targets`` names them."""

    def __init__(self, targets: list[str]) -> None:
        super().__init__("claim lost: " + ", ".join(targets))
        self.targets = targets
