"""The FastAPI application: pages, REST API, static files, limits, headers, errors and the worker.

`create_app` builds everything from a `Settings`: it creates the tables, imports the configured
results stores, registers the bundle folder, and starts the job worker with the app (lifespan).
"""

from __future__ import annotations

import gzip
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from scdrugmap import __version__
from scdrugmap.report.style import RESPONSE_COLOURS, UNKNOWN_COLOUR
from scdrugmap.web.bundles import register_bundle_dir
from scdrugmap.web.db import init_db
from scdrugmap.web.guard import RateLimiter, cross_site_reason, request_kind, retry_after
from scdrugmap.web.logs import redact_path
from scdrugmap.web.results import import_results
from scdrugmap.web.settings import Settings
from scdrugmap.web.storage import Storage
from scdrugmap.web.worker import JobWorker

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
#: Room for the multipart envelope and form fields around an upload at the size limit.
MULTIPART_OVERHEAD = 1 << 20
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY, "x-content-type-options": "nosniff",
                    "referrer-policy": "same-origin", "x-frame-options": "DENY",
                    "cross-origin-opener-policy": "same-origin"}
GENERIC_ERROR = "Something went wrong on the server. The error was logged; please try again later."


def wants_json(path: str) -> bool:
    return path.startswith("/api/") or path == "/health"


class BodyTooLarge(StarletteHTTPException):
    """A request body over the upload limit (raised while the body streams in)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload is larger than the limit of {limit / 1024 / 1024:g} MiB.")


CROSS_SITE_MESSAGE = ("cross-site request refused ({reason}): this server takes forms and API calls only from its "
                      "own pages. Scripts call the JSON API without an Origin header.")


class ServerMiddleware:
    """Give each request an id, refuse cross-site posts and clients over their rate, cap the body, add security
    headers, catch crashes, and log it as JSON."""

    def __init__(self, app: Any, *, max_upload_bytes: int, templates: Jinja2Templates,
                 rate_limits: dict[str, tuple[int, float]] | None = None,
                 allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.limit = max_upload_bytes + MULTIPART_OVERHEAD
        self.templates = templates
        self.limiter = RateLimiter(rate_limits or {})
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(6)
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        path = redact_path(scope.get("path", ""))
        state = {"status": 500, "started": False}
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.max_upload_bytes)
            return message

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                headers["x-request-id"] = request_id
                if "/jobs/" in scope.get("path", ""):
                    headers["cache-control"] = "no-store"
            await send(message)

        try:
            reason = cross_site_reason(scope, self.allowed_origins)
            if reason is not None:
                log.warning("cross-site request refused", extra={"request_id": request_id, "path": path,
                                                                 "reason": reason})
                await self._error(scope, send_with_headers, 403, CROSS_SITE_MESSAGE.format(reason=reason))
                return
            kind = request_kind(scope)
            if kind is not None:
                client = (scope.get("client") or ("unknown",))[0]
                wait = self.limiter.hit(str(client), kind)
                if wait is not None:
                    await self._error(scope, send_with_headers, 429,
                                      f"too many {kind} requests from this address; try again in "
                                      f"{retry_after(wait)} s.", headers={"retry-after": retry_after(wait)})
                    return
            if length.isdigit() and int(length) > self.limit:
                raise BodyTooLarge(self.max_upload_bytes)
            await self.app(scope, limited_receive, send_with_headers)
        except BodyTooLarge as err:
            if not state["started"]:
                await self._error(scope, send_with_headers, 413, str(err.detail))
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id, "path": path})
            if not state["started"]:
                await self._error(scope, send_with_headers, 500, GENERIC_ERROR)
        finally:
            log.info("request", extra={"request_id": request_id, "method": scope.get("method"), "path": path,
                                       "status": state["status"],
                                       "ms": round((time.perf_counter() - start) * 1000, 1)})

    async def _error(self, scope: dict, send: Any, status: int, message: str,
                     headers: dict[str, str] | None = None) -> None:
        if wants_json(scope.get("path", "")):
            response: Response = JSONResponse({"detail": message}, status_code=status, headers=headers)
        else:
            request = Request(scope)
            response = self.templates.TemplateResponse(request, "error.html",
                                                       {"status": status, "message": message}, status_code=status,
                                                       headers=headers)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def error_response(request: Request, status: int, message: str, **extra: Any) -> Response:
    """Return an error as JSON (API) or as the error page, never with a stack trace."""
    if wants_json(request.url.path):
        return JSONResponse({"detail": message, **extra}, status_code=status)
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, "error.html", {"status": status, "message": message, **extra},
                                      status_code=status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = str(exc.detail) if exc.status_code < 500 else GENERIC_ERROR
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = "There is nothing here. A job's pages open only with its full link."
    response = error_response(request, exc.status_code, message)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = [{"field": ".".join(str(p) for p in error.get("loc", ())[1:]) or "request",
                 "problem": str(error.get("msg", "invalid"))} for error in exc.errors()]
    message = "; ".join(f"{p['field']}: {p['problem']}" for p in problems)
    return error_response(request, 422, f"the request is not valid ({message}).", problems=problems)


def plotly_js_path() -> Path:
    """Return the plotly.min.js bundled with the installed plotly package."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the web application.

    Creates the database tables, imports ``settings.results``, registers the bundles in
    ``settings.bundle_dir``, and (with ``settings.run_worker``) runs the job worker while the
    app is up.

    Raises
    ------
    ConfigError
        When a results folder holds no results, or a limit is not positive.
    """
    from scdrugmap.web import api, pages

    settings = (settings or Settings()).resolved()
    sessions = init_db(str(settings.db_url))
    storage = Storage(settings)
    storage.ensure()
    with sessions() as session:
        for run_dir in settings.results:
            import_results(session, run_dir)
        register_bundle_dir(session, settings.bundle_dir)
    worker = JobWorker(settings, sessions, storage)
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.globals["version"] = __version__
    templates.env.globals["max_upload_mb"] = settings.max_upload_mb
    templates.env.globals["colours"] = {**RESPONSE_COLOURS, "unknown": UNKNOWN_COLOUR}  # CSS variables of base.html

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.run_worker:
            worker.start()
        try:
            yield
        finally:
            if settings.run_worker:
                worker.stop()

    app = FastAPI(title="scDrugMap", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan,
                  description="Single-cell drug response: the curated catalog, benchmark results, and predictions "
                              "on uploaded data. A prediction job is reachable only with its token.")
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.storage = storage
    app.state.worker = worker
    app.state.templates = templates
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_middleware(ServerMiddleware, max_upload_bytes=settings.max_upload_bytes, templates=templates,
                       rate_limits=settings.rate_limits, allowed_origins=settings.allowed_origins)

    plotly_js = plotly_js_path()
    compressed: list[bytes] = []

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly_script(request: Request) -> Response:
        headers = {"cache-control": "public, max-age=86400", "vary": "accept-encoding"}
        if "gzip" not in request.headers.get("accept-encoding", ""):
            return FileResponse(plotly_js, media_type="text/javascript", headers=headers)
        if not compressed:  # 4.8 MB of script is 1.4 MB gzipped; compress it once
            compressed.append(gzip.compress(plotly_js.read_bytes(), compresslevel=6, mtime=0))
        return Response(compressed[0], media_type="text/javascript", headers={**headers, "content-encoding": "gzip"})

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app
