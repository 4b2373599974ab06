"""The HTTP service over an export bundle: FastAPI routes, error bodies, a request size limit, Prometheus
metrics and the page at ``/``; the scoring itself is `llmrec.service.Service`.

``create_app(load)`` returns the app; ``load()`` builds the `Service` (loading and verifying the bundle,
replaying its journal) in a background thread started with the app, and ``GET /healthz`` answers 503
until it is done. Ids in paths and bodies are the raw ids of the data. Every error a client can fix is a
4xx JSON body ``{"detail": "one line"}`` (`common.errors.one_line`): an unknown user or item 404, a bad
value 422, a body over ``max_body_bytes`` 413, a request before the bundle is loaded 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from common.errors import NotFoundError, UserError, one_line
from llmrec.recommender import Recommender
from llmrec.service import Service

logger = logging.getLogger(__name__)
disable_created_metrics()  # the *_created series: one more sample per label set that nobody reads here

MAX_BODY_BYTES = 1 << 20
MAX_K = 100_000
MAX_LIST = 10_000
KNOWN_USER_ROUTE = "/users/{user}/recommendations"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class HistoryQuery(Body):
    history: list[str] = Field(min_length=1, max_length=MAX_LIST, description="raw item ids, oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[str] = Field(
        default_factory=list, max_length=MAX_LIST, description="raw item ids to leave out"
    )


class Interactions(Body):
    items: list[str] = Field(min_length=1, max_length=MAX_LIST, description="raw item ids, oldest first")


class NewItem(Body):
    id: str
    title: str
    text: str = ""


class NewItems(Body):
    items: list[NewItem] = Field(min_length=1, max_length=MAX_LIST)


class Metrics:
    """The HTTP metrics: requests and errors by route and status, and latency by route."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "llmrec_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "llmrec_http_errors",
            "HTTP responses with a 4xx/5xx status, by route",
            ["route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "llmrec_http_request_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class Instrument:
    """ASGI middleware: times each request and counts it by route template (``/users/{user}``, not the
    id: bounded label sets) and status."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def record_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status[0])).inc()
            if status[0] >= 400:
                self.metrics.errors.labels(route, str(status[0])).inc()


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, from its Content-Length before it is
    read, or while a body without one streams in."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> str:
        return f"request body over the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse({"detail": self._refusal()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI passes an HTTPException from the body read through
                raise HTTPException(413, self._refusal())
            return message

        await self.app(scope, limited, send)


class KnownAnswers:
    """ASGI middleware: ``GET /users/{user}/recommendations`` that the service has answered since its last
    change (`llmrec.service.Service.answered`) is answered here, before FastAPI's routing, parameter
    validation and dependency machinery, which cost several times the lookup itself on a page view's
    hot path; anything else, a first question or a query it does not parse plainly, goes on to the app,
    which validates it and answers (or refuses) as usual. Same body, status and metrics as the route."""

    PATH = re.compile(r"/users/([^/]+)/recommendations")
    K = re.compile(r"[1-9][0-9]{0,5}")

    def __init__(self, app: Any, service: Callable[[], Service | None], route: Callable[[], Any]):
        self.app, self.service, self.route = app, service, route

    def _question(self, scope: dict) -> tuple[str, int, list[str]] | None:
        if scope["type"] != "http" or scope["method"] != "GET":
            return None
        path = self.PATH.fullmatch(scope["path"])
        if path is None:
            return None
        k, exclude = [], []
        for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
            if key == "k":
                k.append(value)
            elif key == "exclude":
                exclude.append(value)
        if len(k) > 1 or (k and not self.K.fullmatch(k[0])) or len(exclude) > MAX_LIST:
            return None
        count = int(k[0]) if k else 10
        return (path.group(1), count, exclude) if count <= MAX_K else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        question = self._question(scope)
        service = self.service() if question is not None else None
        answer = service.answered(*question) if service is not None else None
        if answer is None:
            return await self.app(scope, receive, send)
        scope["route"] = self.route()  # the metrics' label, as if the route had answered
        await JSONResponse(answer)(scope, receive, send)


def create_app(
    load: Callable[[CollectorRegistry], Service],
    max_body_bytes: int = MAX_BODY_BYTES,
    on_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app; ``load(registry)`` builds the service (its metrics go into ``registry``) in a thread
    started with the app. A failed load is kept (``app.state.error``), reported by ``/healthz`` and passed
    to ``on_failure`` (the command line stops the server with it)."""
    registry = CollectorRegistry()
    page_html = resources.files("llmrec").joinpath("serve_page.html").read_text(encoding="utf-8")

    def loader() -> None:
        try:
            app.state.service = load(registry)
            logger.info("ready")
        except BaseException as err:  # noqa: BLE001  (kept for /healthz and the command line)
            app.state.error = err
            logger.error("cannot serve: %s", one_line(err))
            if on_failure is not None:
                on_failure(err)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=loader, name="llmrec-load", daemon=True).start()
        yield  # a shutdown during the load does not wait for it: the loader is a daemon thread
        if app.state.service is not None:
            app.state.service.close()

    app = FastAPI(
        title="llmrec",
        summary="Recommendations from an llmrec export bundle",
        description='Ids are the raw ids of the data. Errors are `{"detail": "one line"}` with a 4xx status.',
        lifespan=lifespan,
    )
    app.state.service, app.state.error = None, None
    app.add_middleware(
        KnownAnswers,
        service=lambda: app.state.service,
        route=functools.cache(
            lambda: next(r for r in app.routes if getattr(r, "path", "") == KNOWN_USER_ROUTE)
        ),
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Instrument, metrics=Metrics(registry))

    def service() -> Service:
        if app.state.service is None:
            detail = "the bundle is still loading" if app.state.error is None else one_line(app.state.error)
            raise HTTPException(503, detail)
        return app.state.service

    async def answer(future: Any) -> JSONResponse:
        # a JSONResponse, so that FastAPI does not walk the plain dict again (jsonable_encoder)
        return JSONResponse(await asyncio.wrap_future(future))

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, err: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": one_line(err)}, status_code=404)

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> JSONResponse:
        return JSONResponse({"detail": one_line(err)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        return JSONResponse({"detail": one_line(ValueError("; ".join(parts)))}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html

    @app.get("/healthz", summary="Ready once the bundle is loaded and verified and its journal replayed")
    async def healthz() -> JSONResponse:
        if app.state.service is None:
            status = "loading" if app.state.error is None else "failed"
            body = {
                "status": status,
                "detail": None if app.state.error is None else one_line(app.state.error),
            }
            return JSONResponse(body, status_code=503)
        rec = app.state.service.rec
        return JSONResponse({"status": "ready", "users": rec.n_users, "items": rec.n_items})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/users/{user}", summary="A known user's history (raw item ids and titles, oldest first)")
    async def user(user: str) -> JSONResponse:
        return await answer(
            service().call(lambda rec: {"user": user, "history": _items(rec, rec.history(user))})
        )

    @app.get(KNOWN_USER_ROUTE, summary="A known user's top-k (their history left out)")
    async def recommend_user(
        user: str,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        exclude: Annotated[list[str] | None, Query(max_length=MAX_LIST)] = None,
    ) -> JSONResponse:
        return await answer(service().recommend_user(user, k, exclude or []))

    @app.post("/recommendations", summary="The top-k of a history of a user unseen in training")
    async def recommend_history(query: HistoryQuery) -> JSONResponse:
        return await answer(service().recommend_history(query.history, query.k, query.exclude))

    @app.post("/users/{user}/interactions", summary="New interactions of a known user (journaled)")
    async def update(user: str, body: Interactions) -> JSONResponse:
        return await answer(service().update(user, body.items))

    @app.post("/items", summary="New items from their title and text (journaled)")
    async def add_items(body: NewItems) -> JSONResponse:
        return await answer(service().add_items([item.model_dump() for item in body.items]))

    @app.get("/items", summary="Items whose title contains q (case-insensitive), for picking a history")
    async def search(
        q: Annotated[str, Query(max_length=200)] = "", limit: Annotated[int, Query(ge=1, le=1000)] = 20
    ) -> JSONResponse:
        def find(rec: Recommender) -> dict[str, Any]:
            titles, needle = rec.catalogue.item_titles, q.casefold()
            found = [i for i, title in enumerate(titles) if needle in title.casefold()][:limit]
            return {"items": _items(rec, [rec.catalogue.item_ids[i] for i in found])}

        return await answer(service().call(find))

    @app.get("/items/{item}", summary="An item's record: index, title and text")
    async def item(item: str) -> JSONResponse:
        def record(rec: Recommender) -> dict[str, Any]:
            (index,) = rec.items([item])
            texts = rec.catalogue.item_texts
            return {
                "item": item,
                "index": index,
                "title": rec.catalogue.item_titles[index],
                "text": texts[index] if texts is not None else None,
            }

        return await answer(service().call(record))

    return app


def _items(rec: Recommender, raw_ids: list[str]) -> list[dict[str, str]]:
    indices = rec.items(raw_ids)
    return [
        {"item": raw, "title": rec.catalogue.item_titles[i]} for raw, i in zip(raw_ids, indices, strict=True)
    ]
