"""The console's ASGI app: server-rendered pages, a little JavaScript to refresh them live.

Every value shown comes from Redis and may hold anything (markup, terminal escapes, megabytes), so
pages are rendered by Jinja2 with autoescaping on, and long values are cut before rendering.
Actions change state, so they need the operator token; without a configured token the console is
read-only and every action endpoint answers 403.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from rsaga.config import Settings
from rsaga.deadletters import DeadLetters
from rsaga.errors import RsagaError, ValidationError
from rsaga.events import new_id
from rsaga.executor import Executor
from rsaga.handlers import installed_process_managers
from rsaga.health import ProcessThresholds, health_report, process_thresholds
from rsaga.inspect import (
    SEARCH_STATES,
    list_timeouts,
    process_types,
    search_processes,
    show_process,
)
from rsaga.operator import Operator, ProcessState
from rsaga.process.api import ProcessManager
from rsaga.process.runner import ProcessRunner
from rsaga.store import EventStore
from rsaga.web.views import process_detail, shown

_HERE = Path(__file__).parent
_COOKIE = "rsaga_session"
_MAX_SHOWN = 2000
"""Characters of one value shown on a page; the rest is cut (a payload can be megabytes)."""


def _shorten(value: Any, limit: int = _MAX_SHOWN) -> str:
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _when(value: datetime | None) -> str:
    return "?" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _to_json(value: Any) -> str:
    try:
        encoded: bytes = msgspec.json.encode(shown(value), enc_hook=str)
    except (msgspec.EncodeError, RecursionError, TypeError):
        return repr(value)
    return encoded.decode()


_templates = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters.update(shorten=_shorten, when=_when, to_json=_to_json)


class _Console:
    """The state one app instance shares between requests."""

    def __init__(
        self,
        settings: Settings,
        open_store: Callable[[Settings], EventStore],
        token: str | None,
    ) -> None:
        self.settings = settings
        self.open_store = open_store
        self.token = token or None
        self.opened: EventStore | None = None
        self.managers: list[ProcessManager[Any]] | None = None
        self.runner: ProcessRunner | None = None

    @property
    def store(self) -> EventStore:
        """The store the console reads, opened for the app's lifetime."""
        if self.opened is None:
            raise RuntimeError("the console's store is not open: run the app with its lifespan")
        return self.opened

    @property
    def writable(self) -> bool:
        return self.token is not None

    def session_value(self) -> str:
        """What the session cookie holds: derived from the token, never the token itself."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"rsaga-console-session", hashlib.sha256).hexdigest()

    def signed_in(self, request: Request) -> bool:
        if self.token is None:
            return False
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(
            bearer[7:].encode(), self.token.encode()
        ):
            return True
        cookie = request.cookies.get(_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session_value().encode())

    @property
    def redis(self) -> Any:
        return self.store.redis

    def thresholds(self) -> dict[str, ProcessThresholds]:
        """Each installed process type's health thresholds (its own, or the defaults)."""
        managers = self.runner.managers.values() if self.runner else ()
        return process_thresholds(self.settings.health, [type(m) for m in managers])

    def operator(self, request: Request) -> Operator:
        """Operator actions as the console's signed-in operator (named by their address)."""
        if self.runner is None:
            raise RuntimeError("the console's store is not open: run the app with its lifespan")
        client = request.client.host if request.client else "?"
        return Operator(self.runner, by=f"web console ({client})")


def _console(request: Request) -> _Console:
    console: _Console = request.app.state.console
    return console


def _page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """The whole page, or only its `<main>` when the page's script asks for a live refresh."""
    console = _console(request)
    fragment = request.headers.get("x-rsaga-fragment") == "1"
    html = _templates.get_template(template).render(
        request=request,
        fragment=fragment,
        writable=console.writable,
        signed_in=console.signed_in(request),
        keyspace_prefix=console.settings.store.prefix,
        path=request.url.path,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


async def overview(request: Request) -> Response:
    console = _console(request)
    report = await health_report(
        console.redis, console.store.keyspace, console.settings.health, console.thresholds()
    )
    if request.query_params.get("format") == "json":
        return JSONResponse(msgspec.to_builtins(report, enc_hook=str))
    return _page(request, "overview.html", report=report, refresh=5)


async def processes(request: Request) -> Response:
    console = _console(request)
    store = console.store
    params = request.query_params
    state = params.get("state", "active")
    chosen = params.get("type", "")
    correlation = params.get("correlation", "").strip()
    prefix = params.get("prefix", "").strip()
    bounds = {name: params.get(name, "") for name in _TIME_BOUNDS}
    try:
        limit = min(max(int(params.get("limit", "50") or 50), 1), 500)
        page = await search_processes(
            store.redis, store.keyspace, types=[chosen] if chosen else None,
            state=None if state == "any" else state, correlation_id=correlation or None,
            id_prefix=prefix or None, limit=limit, cursor=params.get("cursor") or None,
            settings=console.settings.health, thresholds=console.thresholds(),
            **{name: _utc(name, text) for name, text in bounds.items() if text},
        )
    except (ValidationError, ValueError) as exc:
        return _page(request, "error.html", message=str(exc), status=400)
    older = None
    if page.cursor:
        query = {k: v for k, v in params.items() if k != "cursor"}
        older = f"/processes?{urlencode({**query, 'cursor': page.cursor})}"
    return _page(
        request, "processes.html", rows=page.items, older=older,
        types=await process_types(store.redis, store.keyspace), states=[*SEARCH_STATES, "any"],
        chosen=chosen, state=state, correlation=correlation, prefix=prefix, limit=limit,
        bounds=bounds,
        refresh=0 if params.get("cursor") else 5,
    )


_TIME_BOUNDS = ("started_after", "started_before", "finished_after", "finished_before")


def _utc(name: str, text: str) -> datetime:
    """A time bound from a ``datetime-local`` input (no zone: the console shows UTC)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(f"{name.replace('_', ' ')}: not a time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def process(request: Request) -> Response:
    console = _console(request)
    stream_id = request.path_params["stream_id"]
    try:
        view = await show_process(console.store, stream_id)
    except ValidationError as exc:
        return _page(request, "error.html", message=str(exc), status=400)
    if view is None:
        return _page(request, "error.html", message=f"no process with stream {stream_id!r}",
                     status=404)
    state: ProcessState | None = None
    missing = ""
    try:
        state = await console.operator(request).state(stream_id)
    except RsagaError as exc:  # its definition is not installed where the console runs
        missing = str(exc)
    can_compensate = state is not None and _compensates(console, state.info.process_type)
    return _page(
        request, "process.html", view=view, detail=process_detail(view), state=state,
        missing=missing, can_compensate=can_compensate, signal_key=new_id(), refresh=3,
    )


def _compensates(console: _Console, process_type: str) -> bool:
    """Whether the type's definition can compensate on terminate (a saga's can)."""
    assert console.runner is not None
    manager = console.runner.managers.get(process_type)
    return manager is not None and type(manager).compensate is not ProcessManager.compensate


async def dead_letters(request: Request) -> Response:
    console = _console(request)
    letters = await DeadLetters(console.redis, console.store.keyspace).list(limit=200)
    letters.sort(key=lambda letter: letter.failed_at, reverse=True)
    return _page(request, "dead_letters.html", letters=letters,
                 message=request.query_params.get("message", ""), refresh=5)


async def timeouts(request: Request) -> Response:
    console = _console(request)
    rows = await list_timeouts(console.redis, console.store.keyspace, limit=200)
    return _page(request, "timeouts.html", rows=rows, refresh=2)


async def sign_in(request: Request) -> Response:
    console = _console(request)
    if not console.writable:
        return Response("this console is read-only: no web token is configured", status_code=403)
    form = await _form(request)
    given = form.get("token", "")
    back = _safe_back(form.get("back", "/"))
    if console.token is None or not hmac.compare_digest(given.encode(), console.token.encode()):
        return RedirectResponse(f"{back}?{urlencode({'message': 'wrong token'})}", 303)
    response = RedirectResponse(back, 303)
    response.set_cookie(
        _COOKIE, console.session_value(), httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )
    return response


async def sign_out(request: Request) -> Response:
    response = RedirectResponse(_safe_back(request.query_params.get("back", "/")), 303)
    response.delete_cookie(_COOKIE, path="/")
    return response


async def _form(request: Request) -> dict[str, str]:
    """The fields of a small urlencoded form (the console's forms hold a token and a path)."""
    body = await request.body()
    if len(body) > 16_384:
        return {}
    try:
        return dict(parse_qsl(body.decode(errors="replace"), max_num_fields=20))
    except ValueError:  # more fields than any console form has
        return {}


def _safe_back(back: str) -> str:
    """Redirect only within the console (never to another site)."""
    return back if back.startswith("/") and not back.startswith("//") else "/"


def _action(
    run: Callable[[Request, _Console], Awaitable[str]],
) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that changes state: the token (bearer or session) and a same-site origin."""

    async def endpoint(request: Request) -> Response:
        console = _console(request)
        if not console.signed_in(request):
            return Response("forbidden: this action needs the console token", status_code=403)
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            return Response("forbidden: cross-site request", status_code=403)
        try:
            message = await run(request, console)
        except RsagaError as exc:
            message = f"refused: {exc}"
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"message": message})
        back = _safe_back((await _form(request)).get("back", "/"))
        return RedirectResponse(f"{back}?{urlencode({'message': message})}", 303)

    return endpoint


async def _replay(request: Request, console: _Console) -> str:
    shard, letter_id = int(request.path_params["shard"]), request.path_params["letter_id"]
    new_id = await DeadLetters(console.redis, console.store.keyspace).replay(letter_id, shard=shard)
    return f"replayed {shard}/{letter_id}" if new_id else f"no dead letter {shard}/{letter_id}"


async def _drop(request: Request, console: _Console) -> str:
    shard, letter_id = int(request.path_params["shard"]), request.path_params["letter_id"]
    dropped = await DeadLetters(console.redis, console.store.keyspace).drop(letter_id, shard=shard)
    return f"dropped {shard}/{letter_id}" if dropped else f"no dead letter {shard}/{letter_id}"


async def _terminate(request: Request, console: _Console) -> str:
    form = await _form(request)
    stream_id = request.path_params["stream_id"]
    state = await console.operator(request).terminate(
        stream_id, form.get("reason", ""), compensate=form.get("compensate") == "on"
    )
    return f"terminated {stream_id}: {state.info.status}"


async def _signal(request: Request, console: _Console) -> str:
    form = await _form(request)
    stream_id = request.path_params["stream_id"]
    try:
        data = msgspec.json.decode(form.get("data", "null") or "null")
    except msgspec.DecodeError as exc:
        raise ValidationError(f"signal data is not JSON: {exc}") from None
    await console.operator(request).signal(stream_id, data, key=form.get("key") or None)
    return f"signalled {stream_id}"


async def _retry(request: Request, console: _Console) -> str:
    form = await _form(request)
    return await console.operator(request).retry(
        request.path_params["stream_id"], timer=form.get("timer") or None
    )


def create_app(
    settings: Settings | None = None,
    *,
    token: str | None = None,
    open_store: Callable[[Settings], EventStore] | None = None,
    managers: Sequence[ProcessManager[Any]] | None = None,
) -> Starlette:
    """The console as an ASGI app, for `rsaga web` or to mount in your own application.

    `token` enables actions (replay, drop, and the process actions); without it the console is
    read-only. `open_store` builds the store the console reads (default: from `settings`, knowing
    every installed handler's events). `managers` are the process definitions the console folds
    states and acts with (default: every installed one).
    """
    from rsaga.app import open_store as open_configured_store
    from rsaga.config import load_settings

    settings = settings or load_settings()
    console = _Console(settings, open_store or open_configured_store, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        console.opened = console.open_store(settings)
        console.runner = ProcessRunner(
            Executor(console.opened),
            list(managers) if managers is not None
            else installed_process_managers(settings.worker.handlers),
            retention=settings.processes.retention,
        )
        try:
            yield
        finally:
            await console.opened.redis.aclose()
            console.opened = None

    app = Starlette(
        routes=[
            Route("/", overview),
            Route("/processes", processes),
            Route("/processes/{stream_id:path}", process),
            Route("/dead-letters", dead_letters),
            Route("/dead-letters/{shard:int}/{letter_id}/replay", _action(_replay),
                  methods=["POST"]),
            Route("/dead-letters/{shard:int}/{letter_id}/drop", _action(_drop), methods=["POST"]),
            Route("/actions/terminate/{stream_id:path}", _action(_terminate), methods=["POST"]),
            Route("/actions/signal/{stream_id:path}", _action(_signal), methods=["POST"]),
            Route("/actions/retry/{stream_id:path}", _action(_retry), methods=["POST"]),
            Route("/timeouts", timeouts),
            Route("/sign-in", sign_in, methods=["POST"]),
            Route("/sign-out", sign_out),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.console = console
    return app


async def serve(settings: Settings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve the console with uvicorn until SIGTERM or SIGINT (`rsaga web`)."""
    import logging

    import uvicorn

    host = host or settings.web.host
    port = port or settings.web.port
    token = settings.web.operator_token()
    app = create_app(settings, token=token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    mode = "actions enabled" if token else "read-only (no web.token)"
    logging.getLogger("rsaga.web").info("console on http://%s:%d/, %s", host, port, mode)
    await uvicorn.Server(config).serve()
