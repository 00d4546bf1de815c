"""The web view ``/ui``: HTML rendered on the server over the command layer.

The third renderer beside the CLI and the JSON API: every page asks :class:`AuditCommands`
and shows the models of :mod:`monitor.views`, so it answers what the API answers. It builds no
query and validates no parameter of its own; it only reads an empty form field as "not given"
and a ``datetime-local`` value (no zone) as UTC.

Every value goes through Jinja2's autoescaping (upstream strings are attacker-controlled) after
:func:`~monitor.core.escape.escape_text`, which writes control, bidi and line-separator
characters as visible escapes, as the CLI does. Pages carry a Content-Security-Policy that
allows only this package's stylesheet and script, and work without the script (it only adds
a copy button).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape

from monitor.commands import AuditCommands
from monitor.core import dumps_json, escape_text, flatten
from monitor.core.diff import MISSING
from monitor.core.kinds import EVENT_KINDS
from monitor.errors import BadParameter, NotFound, StorageError
from monitor.storage.queries import SnapshotView
from monitor.timeutil import Clock, format_time
from monitor.views import DiffOut, EventOut, SnapshotDocumentOut, SnapshotOut, TargetOut, to_json
from monitor.web.session import COOKIE, Sessions, bearer_matches, token_matches
from monitor.web.verify import ChainCheck

__all__ = ["CONTENT_SECURITY_POLICY", "UiState", "ui_router"]

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGE_SIZE: Final = 50  # events per timeline page
PICKER_SIZE: Final = 500  # snapshots offered by the diff pickers (the API's largest page)
_MAX_FORM: Final = 4096  # bytes of a login form
_STATIC: Final = {"style.css": "text/css; charset=utf-8", "ui.js": "text/javascript; charset=utf-8"}
_LOCAL_TIME: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?")
_SAFE_NEXT: Final = re.compile(r"/ui/[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]*")
_SAFE_HOST: Final = re.compile(r"[A-Za-z0-9.-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


@dataclass(frozen=True, slots=True)
class UiState:
    """What the pages need besides the commands: the login sessions (None: no API token, the
    web view is closed like the API) and the on-demand chain check."""

    sessions: Sessions | None
    check: ChainCheck

    @classmethod
    def build(
        cls, commands: AuditCommands, *, api_token: str | None, lifetime: float, clock: Clock
    ) -> UiState:
        sessions = Sessions(api_token, lifetime=lifetime, clock=clock) if api_token else None
        return cls(sessions, ChainCheck(commands.verify, clock=clock))


# --------------------------------------------------------------------------- answers


class _LoginRequired(Exception):
    """No credentials at all: a browser is sent to the login form."""


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class _UiRoute(APIRoute):
    """Every /ui answer is HTML with the hardening headers; the command layer's problems
    become error pages (400, 404, 503) instead of the API's JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except _LoginRequired:
                response = RedirectResponse(_login_url(request), 303)
            except _Refused as exc:
                response = _error_page(request, exc.status, exc.message, exc.headers)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {"loc": ("?",), "msg": "invalid"}
                message = f"bad parameter {first['loc'][-1]}: {first['msg']}"
                response = _error_page(request, 400, message)
            except BadParameter as exc:
                response = _error_page(request, 400, f"bad parameter {exc.name}: {exc.problem}")
            except NotFound as exc:
                response = _error_page(request, 404, exc.message)
            except StorageError as exc:
                response = _error_page(request, 503, f"the database is unavailable: {exc}")
            for name, value in _HEADERS.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return route


def _error_page(
    request: Request, status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    response = _page(request, "error.html", status=status, message=message, nav=status != 503)
    response.headers.update(headers or {})
    return response


def _page(request: Request, template: str, *, status: int = 200, **context: Any) -> Response:
    context.setdefault("nav", True)
    html = _templates().get_template(template).render(path=request.url.path, **context)
    return HTMLResponse(html, status)


# --------------------------------------------------------------------------- templates


def _visible(value: Any) -> Any:
    """Jinja2's ``finalize``: every printed string with unsafe characters made visible (then
    autoescaped); None prints as nothing."""
    if value is None:
        return ""
    if isinstance(value, str) and not isinstance(value, Markup):
        return escape_text(value)
    return value


def _json(value: Any) -> Markup:
    """A value as JSON (strings quoted, so ``"465"`` and ``465`` differ); absent as a mark."""
    if value is MISSING:
        return Markup('<span class="absent">absent</span>')
    return escape(dumps_json(value))


def _pretty(value: Any) -> Markup:
    """A document as indented JSON for a ``<pre>``: escaped here, since escape_text would
    turn its line breaks into ``\\n``."""
    return escape(dumps_json(value, indent=2, sort_keys=True))


def _url(path: str, **params: Any) -> str:
    """``/ui`` + path + the query of the given (non-empty) parameters; lists repeat."""
    query = {k.rstrip("_"): v for k, v in params.items() if v not in (None, "", [], ())}
    return "/ui" + path + ("?" + urlencode(query, doseq=True) if query else "")


def _short(hash_: str | None) -> str:
    return hash_.removeprefix("sha256:")[:12] if hash_ else ""


@cache
def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("monitor.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        finalize=_visible,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(json=_json, pretty=_pretty, short=_short)
    env.globals.update(url=_url, kinds=EVENT_KINDS)
    return env


@cache
def _static(name: str) -> bytes:
    return resources.files("monitor.web").joinpath("static", name).read_bytes()


# --------------------------------------------------------------------------- who may read


def _state(request: Request) -> UiState:
    state: UiState = request.app.state.ui
    return state


def _commands(request: Request) -> AuditCommands:
    commands: AuditCommands = request.app.state.commands
    return commands


def _sessions(request: Request) -> Sessions:
    sessions = _state(request).sessions
    if sessions is None:
        raise _Refused(
            503,
            "The web view is disabled: set [server] api_token_env or api_token_file in the "
            "configuration (it logs in with the API token).",
        )
    return sessions


def _viewer(request: Request) -> None:
    """A valid bearer header (scripts) or login cookie (browsers). A wrong bearer header is a
    401; no credentials at all send a browser to the login form."""
    sessions = _sessions(request)
    header = request.headers.get("authorization")
    if header is not None:
        if bearer_matches(header, request.app.state.api_token):
            return
        raise _Refused(401, "unauthorized", {"WWW-Authenticate": "Bearer"})
    if not sessions.valid(request.cookies.get(COOKIE)):
        raise _LoginRequired


def _login_url(request: Request) -> str:
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return _url("/login", next=here if request.method == "GET" else None)


def _safe_next(value: str | None) -> str:
    """Where to go after logging in: a path of this web view, nothing else (no open
    redirect to another site, ``//host`` or ``/\\host``)."""
    if value and _SAFE_NEXT.fullmatch(value) and "//" not in value:
        return value
    return "/ui/"


Commands = Annotated[AuditCommands, Depends(_commands)]
ui_router = APIRouter(prefix="/ui", include_in_schema=False, route_class=_UiRoute)
_public = APIRouter(route_class=_UiRoute)
_private = APIRouter(route_class=_UiRoute, dependencies=[Depends(_viewer)])


def _given(value: str | None) -> str | None:
    """An empty form field is a parameter not given."""
    return value or None


# --------------------------------------------------------------------------- login


@_public.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    _sessions(request)
    return _page(request, "login.html", next=_safe_next(next), failed=False, nav=False)


@_public.post("/login")
async def login(request: Request) -> Response:
    sessions = _sessions(request)
    form = await _form(request)
    target = _safe_next(form.get("next"))
    if not token_matches(form.get("token", ""), request.app.state.api_token):
        return _page(request, "login.html", status=401, next=target, failed=True, nav=False)
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE,
        sessions.issue(),
        max_age=int(sessions.lifetime),
        path="/ui",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@_public.post("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/ui/login", 303)
    response.delete_cookie(
        COOKIE,
        path="/ui",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form of at most a few KiB, first value of each field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        raise _Refused(400, "send the login form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise _Refused(413, "the form is too large")
    try:
        fields = parse_qs(body.decode(), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, "the form is not valid") from None
    return {name: values[0] for name, values in fields.items()}


@_public.get("/static/{name}")
def static(name: str) -> Response:
    media_type = _STATIC.get(name)
    if media_type is None:
        raise _Refused(404, f"no file {name!r} here")
    return Response(_static(name), media_type=media_type, headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- pages


@_private.get("/")
def targets_page(request: Request, commands: Commands) -> Response:
    targets = [TargetOut.of(view) for view in commands.targets()]
    recent = [EventOut.of(view) for view in commands.events(limit=20, max_limit=20).rows]
    return _page(request, "targets.html", targets=targets, events=recent)


@_private.get("/targets/{name}")
def timeline_page(
    request: Request,
    commands: Commands,
    name: str,
    kind: Annotated[list[str] | None, Query()] = None,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
) -> Response:
    kinds = [k for k in kind or () if k]
    since, until = _given(since), _given(until)
    page = commands.events(
        target=name,
        kind=kinds,
        since=since,
        until=until,
        limit=PAGE_SIZE,
        max_limit=PAGE_SIZE,
        cursor=_given(cursor),
    )
    filters = {"kind": kinds, "since": since, "until": until}
    states = [TargetOut.of(view) for view in commands.targets(name)]
    snapshots = commands.snapshots(target=name, limit=PICKER_SIZE, max_limit=PICKER_SIZE).rows
    return _page(
        request,
        "timeline.html",
        name=name,
        state=states[0] if states else None,
        events=[EventOut.of(view) for view in page.rows],
        filters=filters,
        older=_url(f"/targets/{name}", **filters, cursor=page.next_cursor)
        if page.next_cursor
        else None,
        paged=cursor is not None,
        snapshots=[SnapshotOut.of(view) for view in snapshots],
        chosen=_default_pair(snapshots),
    )


@_private.get("/snapshots/{ref}")
def snapshot_page(request: Request, commands: Commands, ref: str) -> Response:
    view = commands.snapshot(ref)
    older, newer = commands.neighbours(view)
    return _page(
        request,
        "snapshot.html",
        snapshot=SnapshotDocumentOut.of(view),
        older=older,
        newer=newer,
        command=_recompute_command(request, view.hash),
    )


@_private.get("/targets/{name}/diff")
def diff_page(
    request: Request,
    commands: Commands,
    name: str,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None,
) -> Response:
    commands.target(name)
    snapshots = commands.snapshots(target=name, limit=PICKER_SIZE, max_limit=PICKER_SIZE).rows
    chosen = _default_pair(snapshots)
    context: dict[str, Any] = {"diff": None, "fields": [], "previous": None, "next": None}
    if _given(from_) and _given(to):
        assert from_ is not None and to is not None
        found = commands.diff(from_, to)
        chosen = (found.old.id, found.new.id)
        for view in (found.old, found.new):
            if all(s.id != view.id for s in snapshots):
                snapshots.append(view)  # of another target, or older than the pickers' list
        context.update(
            diff=DiffOut.of(found.old, found.new, found.changes),
            old=SnapshotOut.of(found.old),
            new=SnapshotOut.of(found.new),
            fields=_fields(found.old.document, found.new.document, found.changes),
            **_steps(commands, found.old, found.new),
        )
    return _page(
        request,
        "diff.html",
        name=name,
        snapshots=[SnapshotOut.of(view) for view in snapshots],
        chosen=chosen,
        **context,
    )


@_private.get("/diff.json")
def diff_download(
    commands: Commands, from_: Annotated[str, Query(alias="from")], to: str
) -> Response:
    found = commands.diff(from_, to)
    body = DiffOut.of(found.old, found.new, found.changes)
    filename = f"diff-{_short(found.old.hash)}-{_short(found.new.hash)}.json"
    return JSONResponse(
        to_json(body), headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@_private.get("/targets/{name}/at")
def at_page(request: Request, commands: Commands, name: str, time: str | None = None) -> Response:
    commands.target(name)
    found, missing, status = None, None, 200
    if _given(time):
        assert time is not None
        try:
            found = SnapshotDocumentOut.of(commands.at(name, _utc(time)))
        except NotFound as exc:
            if exc.what != "moment":
                raise
            missing, status = exc.message, 404
    return _page(
        request,
        "at.html",
        status=status,
        name=name,
        time=_utc(time) if time else "",
        field=time if time and _LOCAL_TIME.fullmatch(time) else "",
        snapshot=found,
        missing=missing,
    )


@_private.get("/verify")
def verify_page(request: Request, commands: Commands) -> Response:
    state = _state(request).check.state()
    return _page(
        request,
        "verify.html",
        head=commands.chain_head(),
        running_since=format_time(state.running_since),
        last=state.last,
        started_at=format_time(state.last.started_at) if state.last else None,
        finished_at=format_time(state.last.finished_at) if state.last else None,
        next_allowed_at=format_time(state.next_allowed_at),
    )


@_private.post("/verify")
def verify_start(request: Request) -> Response:
    _state(request).check.start()
    return RedirectResponse("/ui/verify", 303)


@_private.get("/{rest:path}")
def unknown_page(rest: str) -> Response:
    raise _Refused(404, f"no page /ui/{rest} here")


ui_router.include_router(_public)
ui_router.include_router(_private)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class FieldRow:
    """One leaf of either document on the diff page."""

    path: str
    old: Any  # MISSING where that document does not have it
    new: Any
    changed: bool


def _fields(old: Any, new: Any, changes: Any) -> list[FieldRow]:
    before, after = flatten(old), flatten(new)
    changed = {change.path for change in changes}
    return [
        FieldRow(path, before.get(path, MISSING), after.get(path, MISSING), path in changed)
        for path in sorted(before.keys() | after.keys())
    ]


def _steps(commands: AuditCommands, a: SnapshotView, b: SnapshotView) -> dict[str, Any]:
    """The change before the earlier of the two snapshots and the one after the later."""
    first, last = sorted((a, b), key=lambda s: (s.first_seen_at, s.id))
    before, _ = commands.neighbours(first)
    _, after = commands.neighbours(last)
    return {
        "previous": _url(f"/targets/{first.target}/diff", from_=before.id, to=first.id)
        if before
        else None,
        "next": _url(f"/targets/{last.target}/diff", from_=last.id, to=after.id) if after else None,
    }


def _default_pair(snapshots: list[SnapshotView]) -> tuple[int | None, int | None]:
    """The pickers' choice when none is made: the last change (second newest -> newest)."""
    if not snapshots:
        return None, None
    return (snapshots[1].id if len(snapshots) > 1 else snapshots[0].id), snapshots[0].id


def _utc(time: str) -> str:
    """A ``datetime-local`` field's value (no zone) is UTC, as the page says."""
    return time + "Z" if _LOCAL_TIME.fullmatch(time) else time


def _recompute_command(request: Request, hash_: str) -> str:
    """A shell command that fetches the snapshot from the API and recomputes its hash with
    nothing of genauth-monitor (JCS via ``pip install rfc8785``)."""
    host = request.headers.get("host", "")
    base = f"{request.url.scheme}://{host}" if _SAFE_HOST.fullmatch(host) else "http://HOST:PORT"
    return (
        'curl -s -H "Authorization: Bearer $GENAUTH_MONITOR_API_TOKEN" '
        f"'{base}/api/v1/snapshots/{hash_}' | python3 -c 'import hashlib, json, sys, rfc8785; "
        'print("sha256:" + hashlib.sha256(rfc8785.dumps(json.load(sys.stdin)["document"]))'
        ".hexdigest())'"
    )
