"""The FastAPI application: routes, API-key check, error mapping and the engine's lifetime."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from parallm import __version__
from parallm.engine.core.client import EngineCoreClient
from parallm.engine.engine import LLMEngine
from parallm.server.async_engine import (
    RETRY_AFTER_S,
    AsyncEngine,
    EngineOverloaded,
    EngineUnavailable,
    RequestFailed,
)
from parallm.server.body_limit import BodySizeLimit
from parallm.server.chars_per_token import max_chars_per_token
from parallm.server.chat import create_chat_completion
from parallm.server.completions import create_completion
from parallm.server.errors import APIError, bad_request, error_from, from_validation_error
from parallm.server.limits import DEFAULT_MAX_REQUEST_BODY_BYTES
from parallm.server.metrics import CONTENT_TYPE, ServerMetrics
from parallm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    VersionResponse,
)
from parallm.server.serving import ServingContext
from parallm.server.stats_log import DEFAULT_INTERVAL_S, StatsLog, log_stats_every
from parallm.server.tokenization import create_detokenize, create_tokenize

M = TypeVar("M", bound=BaseModel)


def build_app(
    engine: LLMEngine | EngineCoreClient | list[EngineCoreClient],
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_num_waiting: int = 1024,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
    log_stats: bool = True,
    log_stats_interval_s: float = DEFAULT_INTERVAL_S,
) -> FastAPI:
    """An OpenAI-compatible app around ``engine``: an engine core in its own process
    (``EngineCoreClient``, stopped with the app), several (a list: data-parallel replicas), or
    an ``LLMEngine`` run on a thread here.

    A request body over ``max_request_body_bytes`` is refused (413) before it is read.
    ``log_stats`` logs a throughput and usage line every ``log_stats_interval_s`` seconds
    while the server is busy (see ``parallm.server.stats_log``).
    """
    if max_request_body_bytes < 1:
        raise ValueError(f"max_request_body_bytes must be >= 1, got {max_request_body_bytes}")
    if not log_stats_interval_s > 0:
        raise ValueError(f"log_stats_interval_s must be > 0 seconds, got {log_stats_interval_s}")
    async_engine = AsyncEngine(engine, max_num_waiting)
    view = async_engine.engine  # limits, tokenizer and prompt checks of either kind
    name = served_model_name or view.config.model or "parallm"
    metrics = ServerMetrics(lambda: async_engine.snapshots, name, view.max_model_len)
    async_engine.metrics = metrics
    ctx = ServingContext(
        async_engine, [name], view.config.model, max_chars_per_token(view.tokenizer)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        stats_task = None
        if log_stats:
            stats = StatsLog(lambda: async_engine.snapshot)
            stats_task = asyncio.create_task(log_stats_every(stats, log_stats_interval_s))
        yield
        if stats_task is not None:
            stats_task.cancel()
            await asyncio.gather(stats_task, return_exceptions=True)
        # uvicorn has drained the connections (requests past the drain deadline were aborted,
        # or, as a last resort, cancelled) by now; fail what is left.
        await asyncio.to_thread(async_engine.stop)

    app = FastAPI(title="parallm", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    # What the launcher calls at the drain deadline: streams then end with "abort" and [DONE].
    app.state.abort_all_requests = async_engine.abort_all
    # What the launcher polls: once the engine core has died, the server exits (non-zero).
    app.state.engine_error = lambda: async_engine.error
    app.add_middleware(BodySizeLimit, max_bytes=max_request_body_bytes)
    _add_error_handlers(app)
    app.include_router(_v1_router(ctx, api_key))
    # As in vLLM, the API key guards /v1 only: these routes run no model.
    _add_tokenization_routes(app, ctx)
    _add_ops_routes(app, ctx, metrics)
    _add_profile_routes(app, ctx)
    return app


def _v1_router(ctx: ServingContext, api_key: str | None) -> APIRouter:
    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.",
                401,
                code="invalid_api_key",
            )

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @router.get("/models")
    async def models() -> ModelList:
        return ModelList(
            data=[ModelCard(id=n, root=ctx.model_path, max_model_len=ctx.max_model_len)
                  for n in ctx.served_model_names]
        )  # fmt: skip

    @router.post("/completions")
    async def completions(request: Request) -> Any:
        req = await _parse(request, CompletionRequest)
        return await _unless_disconnected(request, create_completion(ctx, req))

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = await _parse(request, ChatCompletionRequest)
        return await _unless_disconnected(request, create_chat_completion(ctx, req))

    return router


def _add_tokenization_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        return await create_tokenize(ctx, await _parse(request, TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Any:
        return await create_detokenize(ctx, await _parse(request, DetokenizeRequest))


def _add_ops_routes(app: FastAPI, ctx: ServingContext, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if ctx.engine.is_healthy else 503)

    # vLLM's liveness route (SageMaker's name for it): the same answer as /health.
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    @app.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=__version__)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_profile_routes(app: FastAPI, ctx: ServingContext) -> None:
    """vLLM's profiling routes: record the engine's steps between the two calls (the server
    started with --profiler-config; otherwise a 400 that says so)."""

    @app.post("/start_profile")
    async def start_profile() -> Response:
        await ctx.engine.start_profile()
        return Response(status_code=200)

    @app.post("/stop_profile")
    async def stop_profile() -> dict[str, list[str]]:
        return {"traces": await ctx.engine.stop_profile()}


async def _parse(request: Request, model: type[M]) -> M:
    """Strict JSON parsing of the body: malformed JSON or a wrong type is a 400 naming it."""
    body = await request.body()
    if not body:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client left before the response was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``, cancelling it (and so aborting its requests) if the client disconnects.

    Streaming responses are cancelled by Starlette itself; this covers the wait for a
    non-streaming answer, during which nothing else would notice the client leaving.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its ``finally`` closes the request stream, which aborts
    # A response that was ready anyway is returned even if the client left: dropping it
    # unsent would leave its stream open.
    if not task.done() or task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI) -> None:
    def handle(exc_type: type[Exception], to_error: Any) -> None:
        async def handler(request: Request, exc: Exception) -> Response:
            return to_error(exc).response()

        app.add_exception_handler(exc_type, handler)

    handle(APIError, lambda e: e)
    handle(
        EngineOverloaded,
        lambda e: APIError(str(e), 429, code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}),
    )  # fmt: skip
    handle(EngineUnavailable, lambda e: APIError(str(e), 503, code="service_unavailable"))
    handle(RequestFailed, error_from)
    handle(RequestValidationError, lambda e: bad_request(str(e)))
    handle(HTTPException, lambda e: APIError(str(e.detail), e.status_code, code=str(e.status_code)))
    handle(ClientDisconnected, lambda e: APIError("client disconnected", 499, code="499"))
    handle(Exception, error_from)
