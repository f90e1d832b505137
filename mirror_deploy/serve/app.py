"""The OpenAI-compatible HTTP routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding.config import GenerationConfig
from ..decoding.engine import Engine, encode_chat
from ..errors import MirrorDeployError
from .metrics import ServerMetrics
from .schemas import ChatRequest, CompletionRequest, error_body
from .worker import Delta, Done, EngineWorker, Failed, Job, QueueFull, ShuttingDown

MIRROR_FIGURES = ("mode", "schedule", "tokens_per_s", "mean_accepted_tokens", "reuse_rate", "fallback_frequency",
                  "exit_hit_rate", "steps", "prefill_s", "decode_s", "lookup_windows")
DISCONNECT_POLL_S = 0.05   # a client gone mid-request frees the engine within ~one step


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, kind, param, code), headers


def _error_json(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status, headers=error.headers)


def _describe_validation(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return ApiError(400, "the request body must be a JSON object", code="invalid_body")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code=first.get("type"))


class Server:
    """The routes' shared state: one engine (on its worker thread), its model name, its figures."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int, mode: str, lookup: bool | None = None):
        if engine.tokenizer is None:
            raise MirrorDeployError("this artifact has no tokenizer, so it cannot serve text",
                                    "re-export from a checkpoint that has a tokenizer")
        self.engine, self.model_name, self.mode, self.lookup = engine, model_name, mode, lookup
        self.tokenizer = engine._load_tokenizer()   # the request side's own copy: tokenizers are not shared
        self.metrics = ServerMetrics(lambda: self.worker.depth(), lambda: int(self.worker.busy))
        self.worker = EngineWorker(engine, max_queue, self._record)
        self.created = int(time.time())

    def _record(self, done: Done) -> None:
        self.metrics.record_generation(done.finish_reason, done.summary, done.seconds, done.waited)

    # ---- request -> job -------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _config(self, req, prompt_len: int) -> GenerationConfig:
        cfg = GenerationConfig(max_new_tokens=1, temperature=req.temperature, top_p=req.top_p,
                               seed=req.seed if req.seed is not None else secrets.randbelow(2**31), mode=self.mode,
                               lookup=self.lookup)
        room = self.engine.room(prompt_len, cfg)
        limit = req.token_limit()
        if room < 1 or (limit is not None and limit > room):
            capacity = self.engine.manifest.max_context
            asked = f"{prompt_len} prompt tokens" + (f" + max_tokens {limit}" if limit is not None else "")
            raise ApiError(400, f"{asked} do not fit this model's capacity of {capacity} tokens "
                           f"(at most {max(room, 0)} new tokens fit after this prompt); shorten the prompt "
                           "or lower max_tokens", param="max_tokens" if room >= 1 else "messages",
                           code="context_length_exceeded")
        cfg.max_new_tokens = limit if limit is not None else room
        return cfg

    def _prompt_ids(self, req) -> list[int]:
        try:
            if isinstance(req, ChatRequest):
                return encode_chat(self.tokenizer, [m.as_template_input() for m in req.messages])
            if isinstance(req.prompt, list) and isinstance(req.prompt[0], int):
                vocab = self.engine.manifest.target.get("vocab_size") or len(self.tokenizer)
                if not all(0 <= t < vocab for t in req.prompt):
                    raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                return list(req.prompt)
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            return list(self.tokenizer.encode(text))
        except MirrorDeployError as e:
            raise ApiError(400, f"{e.problem}; {e.fix}" if e.fix else e.problem) from e

    def submit(self, req, loop) -> tuple[Job, int]:
        self._check_model(req.model)
        ids = self._prompt_ids(req)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        job = Job(ids, self._config(req, len(ids)), req.stops(), loop, stream=req.stream)
        try:
            self.worker.submit(job)
        except QueueFull as full:
            raise ApiError(429, f"the server is busy ({self.worker.depth()} requests waiting); retry after "
                           f"{full.retry_after} s", kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down") from None
        return job, len(ids)

    def mirror_figures(self, done: Done, cfg: GenerationConfig) -> dict:
        figures = {k: done.summary.get(k) for k in MIRROR_FIGURES}
        return {**figures, "queue_s": done.waited, "engine_s": done.seconds, "seed": cfg.seed}


def _usage(prompt_tokens: int, done: Done) -> dict:
    n = len(done.tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


async def _wait_done(job: Job, request: Request):
    """The job's last event (Done or Failed); cancels the job if the client goes away while we wait.
    (A streamed response needs no polling: Starlette cancels its generator when the client leaves.)"""
    next_check = time.monotonic() + DISCONNECT_POLL_S
    while True:
        try:
            event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            if isinstance(event, (Done, Failed)):
                return event
        except asyncio.TimeoutError:
            pass
        if time.monotonic() >= next_check:
            if await request.is_disconnected():
                job.cancel()
                raise ApiError(499, "the client closed the request", code="client_closed_request")
            next_check = time.monotonic() + DISCONNECT_POLL_S


def _failure(error: BaseException) -> ApiError:
    if isinstance(error, MirrorDeployError):
        return ApiError(500, f"generation failed: {error.problem}", kind="server_error", code="generation_failed")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error",
                    code="generation_failed")


class Shapes:
    """Response and chunk bodies of one endpoint (chat or plain completions)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def full(self, text: str, finish: str, usage: dict, mirror: dict) -> dict:
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage=usage,
                              mirror=mirror)

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _complete(server: Server, req, request: Request, chat: bool):
    job, prompt_tokens = server.submit(req, asyncio.get_running_loop())
    shapes = Shapes(chat, server.model_name)
    if req.stream:
        return StreamingResponse(_stream(server, job, req, shapes, prompt_tokens),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        event = await _wait_done(job, request)
    finally:
        job.cancel()    # a no-op once done; stops the engine if this handler is torn down early
    if isinstance(event, Failed):
        raise _failure(event.error)
    return shapes.full(event.text, event.finish_reason, _usage(prompt_tokens, event),
                       server.mirror_figures(event, job.cfg))


async def _stream(server: Server, job: Job, req, shapes: Shapes, prompt_tokens: int):
    try:
        if shapes.chat:
            yield _sse(shapes.chunk(first=True))
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                yield _sse(shapes.chunk(event.text))
            elif isinstance(event, Failed):
                yield _sse(_failure(event.error).body)
                return
            else:
                usage = _usage(prompt_tokens, event)
                yield _sse(shapes.chunk(finish=event.finish_reason, mirror=server.mirror_figures(event, job.cfg)))
                if req.include_usage:
                    yield _sse(shapes.usage_chunk(usage))
                yield _sse("[DONE]")
                return
    finally:
        job.cancel()    # the client went away (or we are done): the engine stops at its next step


def create_app(engine: Engine, model_name: str, max_queue: int = 16, mode: str = "mirror",
               lookup: bool | None = None) -> FastAPI:
    server = Server(engine, model_name, max_queue, mode, lookup)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        yield
        await asyncio.to_thread(server.worker.close)   # uvicorn has drained the requests by now

    app = FastAPI(title="mirror-deploy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        endpoint = request.url.path
        server.metrics.requests.labels(endpoint, str(exc.status)).inc()
        return _error_json(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return await api_error(request, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return _error_json(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return await api_error(request, ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        response = await _complete(server, req, request, chat=True)
        server.metrics.requests.labels(request.url.path, "200").inc()
        return response

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        response = await _complete(server, req, request, chat=False)
        server.metrics.requests.labels(request.url.path, "200").inc()
        return response

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "mirror-deploy"}]}

    @app.get("/health")
    async def health():
        ok = server.worker.alive and not server.worker.closing
        body = {"status": "ok" if ok else "unavailable", "model": server.model_name, "mode": server.mode,
                "busy": server.worker.busy, "queue_depth": server.worker.depth(),
                "max_context": engine.manifest.max_context}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return app
