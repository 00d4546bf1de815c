"""Reads GenAuth's admin audit log (``POST /api/v3/get-admin-audit-logs``) over a time window.

The request goes through :meth:`monitor.genauth.GenAuthClient.call`: the target's cached token
and pool headers, one re-authentication on a refused token, every page bounded by the target's
``timeout`` and ``max_response_bytes``. Here: the pages of one window (``start``/``end`` in
milliseconds since the epoch, ``pagination.page`` from 1, ``limit`` 50, the vendor's cap), read
until the log has no more, within a deadline for the whole read and at most :data:`MAX_PAGES`
pages; entries another page repeats (the log is newest first, so new entries shift the pages
while they are read) are kept once.

Failures are :class:`AuditLogError`: ``permanent`` when asking again cannot help (no permission,
an endpoint a private deployment does not offer, refused credentials), else transient (network,
timeout, a 5xx, a malformed answer).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from monitor.core.attribution import Window
from monitor.errors import MonitorError, UpstreamError
from monitor.genauth import GenAuthClient

__all__ = ["AUDIT_LOG_PATH", "MAX_PAGES", "PAGE_SIZE", "AuditLogError", "AuditLogReader", "Read"]

AUDIT_LOG_PATH: Final = "/api/v3/get-admin-audit-logs"
PAGE_SIZE: Final = 50  # the vendor's largest page
MAX_PAGES: Final = 20  # 1,000 entries: far more than one change window holds


class AuditLogError(MonitorError):
    """The audit log could not be read; ``permanent``: asking again will not help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Read:
    """The entries of a window; ``complete`` is False when the page cap stopped the read."""

    entries: list[dict[str, Any]]
    complete: bool


def _permanent(error: UpstreamError) -> bool:
    if error.reason == "auth":
        return True
    status = error.http_status
    # 403 no permission, 404 not offered, 400/405 a deployment that speaks another dialect;
    # 429 is a rate limit and passes.
    return (
        error.reason == "http_status"
        and status is not None
        and 400 <= status < 500
        and (status != 429)
    )


class AuditLogReader:
    """The admin audit log of one target, read through its client."""

    def __init__(
        self, client: GenAuthClient, *, max_pages: int = MAX_PAGES, page_size: int = PAGE_SIZE
    ) -> None:
        self._client = client
        self._max_pages = max_pages
        self._page_size = page_size

    @property
    def deadline_seconds(self) -> float:
        """The whole read's budget: a few requests' worth of the target's timeout."""
        return 4 * self._client.timeout

    def read(self, span: Window, *, resource_types: Collection[str] = ()) -> Read:
        """Every entry the log has for ``span`` (up to the page cap)."""
        deadline = time.monotonic() + self.deadline_seconds
        payload: dict[str, Any] = {
            "start": int(span.start.timestamp() * 1000),
            "end": int(span.end.timestamp() * 1000),
            "success": True,
        }
        if len(resource_types) == 1:
            payload["resourceType"] = next(iter(resource_types))
        seen: set[tuple[Any, ...]] = set()
        entries: list[dict[str, Any]] = []
        for page in range(1, self._max_pages + 1):
            if time.monotonic() >= deadline:
                raise AuditLogError("audit log: deadline passed while paging", permanent=False)
            listed, total = self._page(
                {**payload, "pagination": {"page": page, "limit": self._page_size}}, deadline
            )
            for entry in listed:
                key = (entry.get("requestId"), entry.get("timestamp"), entry.get("adminUserId"))
                if key not in seen:
                    seen.add(key)
                    entries.append(entry)
            if len(listed) < self._page_size or (
                total is not None and page * self._page_size >= total
            ):
                return Read(entries, complete=True)
        return Read(entries, complete=False)

    def _page(
        self, payload: dict[str, Any], deadline: float
    ) -> tuple[list[dict[str, Any]], int | None]:
        try:
            data = self._client.call(AUDIT_LOG_PATH, payload, deadline=deadline)
        except UpstreamError as exc:
            raise AuditLogError(
                f"audit log: {exc.reason}: {exc.message}", permanent=_permanent(exc)
            ) from None
        listed = data.get("list") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise AuditLogError("audit log: data.list is missing or not a list", permanent=False)
        total = data.get("totalCount") if isinstance(data, dict) else None
        count = total if type(total) is int else None
        return [entry for entry in listed if isinstance(entry, dict)], count
