"""The HTTP surface of the daemon: /metrics, /healthz, /readyz and the read-only /api/v1.

The /api/v1 handlers only translate HTTP to the shared query layer (``storage.Queries``) that
the CLI uses as well, so both always answer the same.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from monitor import __version__
from monitor.api_models import (
    DiffOut,
    ErrorOut,
    EventPage,
    ReadyOut,
    SnapshotDocumentOut,
    SnapshotPage,
    TargetList,
)
from monitor.core import diff
from monitor.core.rules import EVENT_KINDS
from monitor.errors import StorageError
from monitor.storage import Queries
from monitor.storage.queries import AmbiguousReference, decode_cursor
from monitor.timeutil import Clock, parse_time

__all__ = ["MAX_LIMIT", "create_app"]

MAX_LIMIT = 500
_SEVERITIES = ("info", "warning", "critical")
# At module level: FastAPI resolves annotations by name, which a local alias would defeat.
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"rows per page, 1-{MAX_LIMIT}")]


class _Row(Protocol):
    def as_dict(self) -> dict[str, Any]: ...
    def cursor(self) -> str: ...


def _page(key: str, rows: Sequence[_Row], limit: int) -> dict[str, Any]:
    """One page; a full page carries the cursor of its last row for the next one."""
    return {
        key: [row.as_dict() for row in rows],
        "next_cursor": rows[-1].cursor() if rows and len(rows) == limit else None,
    }


_ERROR_TEXT = {
    400: "bad parameter (named in the message)",
    401: "missing or wrong bearer token",
    404: "unknown target or snapshot",
    503: "API disabled (no token configured) or database unavailable",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut, "description": _ERROR_TEXT[code]} for code in codes}


class _BadParameter(Exception):
    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def create_app(
    *,
    registry: CollectorRegistry,
    queries: Queries,
    ready: Callable[[], tuple[bool, dict[str, bool]]],
    api_token: str | None,
    clock: Clock,
    metrics_token: bool = False,
) -> FastAPI:
    """The ASGI application. ``ready`` says whether the database and scheduler are fine."""
    app = FastAPI(
        title="genauth-monitor",
        version=__version__,
        description="Read-only history of GenAuth email provider configuration.",
    )

    def require_token(request: Request) -> None:
        if api_token is None:
            raise HTTPException(
                503,
                "the API is disabled: set [server] api_token_env or api_token_file "
                "in the configuration",
            )
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), api_token.encode()
        ):
            raise HTTPException(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("query", "?"), "msg": "invalid"}
        name = str(first["loc"][-1])
        return JSONResponse({"error": f"bad parameter {name}: {first['msg']}"}, 400)

    @app.exception_handler(_BadParameter)
    async def _bad(_: Request, exc: _BadParameter) -> JSONResponse:
        return JSONResponse({"error": f"bad parameter {exc.name}: {exc.problem}"}, 400)

    @app.exception_handler(AmbiguousReference)
    async def _ambiguous(_: Request, exc: AmbiguousReference) -> JSONResponse:
        return JSONResponse({"error": f"bad parameter: {exc}; give more of the hash"}, 400)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 503)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    @app.get("/healthz", response_class=PlainTextResponse, summary="process alive")
    def healthz() -> str:
        return "ok\n"

    @app.get(
        "/readyz",
        response_model=ReadyOut,
        responses={503: {"model": ReadyOut, "description": "not ready"}},
        summary="database reachable and scheduler running",
    )
    def readyz() -> JSONResponse:
        ok, checks = ready()
        return JSONResponse({"ready": ok, "checks": checks}, 200 if ok else 503)

    metrics_deps = [Depends(require_token)] if metrics_token else []

    @app.get(
        "/metrics",
        dependencies=metrics_deps,
        response_class=PlainTextResponse,
        responses=_errors(401, 503) if metrics_token else {},
        summary="Prometheus metrics",
    )
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def when(name: str, value: str | None) -> datetime | None:
        if value is None:
            return None
        try:
            return parse_time(value, now=clock())
        except ValueError as exc:
            raise _BadParameter(name, str(exc)) from None

    def check_cursor(value: str | None) -> str | None:
        if value is not None:
            try:
                decode_cursor(value)
            except ValueError:
                raise _BadParameter("cursor", "not a cursor this API returned") from None
        return value

    def known_target(name: str) -> str:
        # A NUL byte can never be in a name, and PostgreSQL refuses it as text.
        if "\x00" in name or not queries.target_exists(name):
            raise HTTPException(404, f"unknown target {name!r}")
        return name

    v1 = [Depends(require_token)]

    @app.get(
        "/api/v1/targets", dependencies=v1, response_model=TargetList, responses=_errors(401, 503)
    )
    def list_targets() -> dict[str, Any]:
        return {"targets": [view.as_dict() for view in queries.targets()]}

    @app.get(
        "/api/v1/targets/{name}/snapshots",
        dependencies=v1,
        response_model=SnapshotPage,
        responses=_errors(400, 401, 404, 503),
    )
    def list_snapshots(
        name: str,
        since: str | None = None,
        until: str | None = None,
        limit: Limit = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        rows = queries.snapshots(
            target=known_target(name),
            since=when("since", since),
            until=when("until", until),
            limit=limit,
            cursor=check_cursor(cursor),
        )
        return _page("snapshots", rows, limit)

    @app.get(
        "/api/v1/snapshots/{hash}",
        dependencies=v1,
        response_model=SnapshotDocumentOut,
        responses=_errors(400, 401, 404, 503),
    )
    def get_snapshot(hash: str) -> dict[str, Any]:  # the parameter name SPEC §8 gives
        found = queries.snapshot(hash)
        if found is None:
            raise HTTPException(404, f"unknown snapshot {hash!r}")
        return found.as_dict(with_document=True)

    @app.get(
        "/api/v1/targets/{name}/at",
        dependencies=v1,
        response_model=SnapshotDocumentOut,
        responses=_errors(400, 401, 404, 503),
    )
    def snapshot_at(name: str, time: str) -> dict[str, Any]:
        moment = when("time", time)
        assert moment is not None
        found = queries.at(known_target(name), moment)
        if found is None:
            raise HTTPException(404, f"target {name!r} was not observed yet at {time}")
        return found.as_dict(with_document=True)

    @app.get(
        "/api/v1/events",
        dependencies=v1,
        response_model=EventPage,
        responses=_errors(400, 401, 404, 503),
    )
    def list_events(
        target: str | None = None,
        kind: str | None = None,
        severity: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: Limit = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        if severity is not None and severity not in _SEVERITIES:
            raise _BadParameter("severity", f"must be one of {', '.join(_SEVERITIES)}")
        if target is not None:
            known_target(target)
        kinds = tuple(k for k in (kind or "").split(",") if k)
        unknown = [k for k in kinds if k not in EVENT_KINDS]
        if unknown:
            raise _BadParameter("kind", f"unknown event kind {unknown[0]!r}")
        rows = queries.events(
            target=target,
            kinds=kinds,
            severity=severity,
            since=when("since", since),
            until=when("until", until),
            limit=limit,
            cursor=check_cursor(cursor),
        )
        return _page("events", rows, limit)

    @app.get(
        "/api/v1/diff",
        dependencies=v1,
        response_model=DiffOut,
        responses=_errors(400, 401, 404, 503),
    )
    def diff_snapshots(from_: Annotated[str, Query(alias="from")], to: str) -> dict[str, Any]:
        old, new = queries.snapshot(from_), queries.snapshot(to)
        if old is None:
            raise HTTPException(404, f"unknown snapshot {from_!r}")
        if new is None:
            raise HTTPException(404, f"unknown snapshot {to!r}")
        return {
            "from": old.hash,
            "to": new.hash,
            "changes": [c.as_dict() for c in diff(old.document, new.document)],
        }

    return app
