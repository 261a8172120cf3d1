"""An OpenAI-compatible server for the trained model, with a small web page.

    python main.py --task serve --config configs/demo.yaml          http://127.0.0.1:8000 (page), /v1 (API)
    python main.py --task serve --use_original_model                the base model alone
    python main.py --task serve --host 0.0.0.0 --api_key SECRET     (or LORA_API_KEY=SECRET in the environment)

Routes: GET /health (no key needed), GET /v1/models, POST /v1/chat/completions (stream or not), GET /v1/info
(what the page needs to know), GET / (the page, static files of web/). The model loads once with its adapter;
a request naming the base model is answered with the adapter switched off. VLM answers are constrained to the
run's label-map schema unless the request asks otherwise, and carry field_confidence and confidence on the
choice, computed as evaluate computes them. SIGTERM or Ctrl-C: no new connections, in-flight requests finish,
exit 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import AppStatus, EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from batching import Job, Scheduler, ThreadStopped
from config import Config, UserError
from data_loading import system_prompt
from generation import ContextError, Engine, Row, vlm_label_map
from model_config import adopt_training_settings, load_for_inference
from openai_api import ApiError, ChatRequest, chunk, completion, completion_id, parse_request, pixel_bound, to_example
from structured import json_span, label_schema

logger = logging.getLogger(__name__)
WEB = Path(__file__).resolve().parent / "web"
API_KEY_ENV = "LORA_API_KEY"


class _BodyLimit:
    """Refuses bodies over `limit` bytes with 413, by Content-Length or while reading (chunked uploads).
    Starlette and uvicorn have no body limit of their own."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, self._error())
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()  # answered by the app's ApiError handler
            return message

        await self.app(scope, limited, send)

    def _error(self) -> ApiError:
        return ApiError(413, f"the request body is over max_request_mb={self.limit / 2**20:g} MB; send a smaller "
                        "image or raise max_request_mb", code="request_too_large")


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Service:
    """What the routes need: the engine behind its scheduler, the model names and the request limits."""

    def __init__(self, cfg: Config, engine: Engine, scheduler: Scheduler):
        self.cfg, self.engine, self.scheduler = cfg, engine, scheduler
        self.vlm = cfg.model_type == "vlm"
        self.base_name = f"{cfg.model_name}-base"
        self.tuned_name = None if cfg.use_original_model else cfg.model_name
        self.image_folder = Path(cfg.image_folder) if cfg.image_folder else None
        self.max_pixels = pixel_bound(cfg.image_max_pixels)
        self._schemas: OrderedDict[str, object] = OrderedDict()  # compiled grammars, least recently used last
        self._schemas_lock = threading.Lock()  # requests are prepared on threads of their own

    def model_names(self) -> list[str]:
        return [n for n in (self.tuned_name, self.base_name) if n]

    def _grammar(self, schema: dict | None):
        key = json.dumps(schema, sort_keys=True)
        with self._schemas_lock:
            if key in self._schemas:
                self._schemas.move_to_end(key)
                return self._schemas[key]
        try:
            compiled = self.engine.compile_schema(schema)
        except Exception as e:  # noqa: BLE001 - xgrammar's message says what it cannot compile
            raise ApiError(400, f"response_format: the JSON schema does not compile: {str(e)[:200]}",
                           param="response_format") from None
        with self._schemas_lock:
            self._schemas[key] = compiled
            while len(self._schemas) > 32:
                self._schemas.popitem(last=False)
        return compiled

    def constraint(self, req: ChatRequest):
        """(compiled grammar or None, whether the label map's confidences apply): a VLM request without a
        response_format, or with the label map's own schema, gets the label-map answer and its confidences;
        text, json_object and other schemas are answered as asked (streamed as they are generated)."""
        fmt = req.response_format
        if fmt is None:
            if self.vlm and self.engine.label_constraint is not None:
                return self.engine.label_constraint.compiled, True
            return None, self.vlm and self.engine.label_map is not None
        if fmt.type == "text":
            return None, False
        if fmt.type == "json_object":
            return self._grammar(None), False
        schema = fmt.json_schema.schema_
        is_label = self.vlm and self.engine.label_map is not None and schema == label_schema(self.engine.label_map)
        return self._grammar(schema), is_label

    def job(self, req: ChatRequest, loop) -> tuple[Job, str]:
        """The request as a job, its images decoded and its prompt encoded here (a request thread), once."""
        model = req.model or self.model_names()[0]
        if model not in self.model_names():
            raise ApiError(404, f"the model `{model}` does not exist; this server has: "
                           f"{', '.join(self.model_names())}", param="model", code="model_not_found")
        example, images = to_example(req, self.vlm, self.cfg.instruction, self.image_folder, self.max_pixels)
        grammar, confidences = self.constraint(req)
        asked = req.max_completion_tokens or req.max_tokens
        row = Row(example=example, images=images, max_tokens=asked or self.cfg.max_new_tokens, stop=req.stop,
                  constraint=grammar, deadline=time.monotonic() + self.cfg.request_timeout)
        try:
            self.engine.encode_row(row, explicit=asked is not None)
        except ContextError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except Exception as e:  # noqa: BLE001 - a chat template or processor refusing these messages
            logger.warning("a request's messages could not be encoded: %s: %s", type(e).__name__, str(e)[:300])
            raise ApiError(400, f"the messages could not be encoded for this model ({type(e).__name__}: "
                           f"{str(e)[:200]})", param="messages") from None
        temperature = self.cfg.temperature if req.temperature is None else req.temperature
        top_p = self.cfg.top_p if req.top_p is None else req.top_p
        job = Job(row=row, temperature=temperature, top_p=top_p, seed=req.seed, adapter=model == self.tuned_name,
                  confidences=confidences, explicit_max_tokens=asked is not None, loop=loop,
                  future=loop.create_future())
        return job, model

    def submit(self, job: Job) -> None:
        if not self.scheduler.healthy:
            raise ApiError(503, f"the generation thread has stopped ({self.scheduler.failure}); restart the server",
                           kind="server_error", code="generation_stopped")
        if not self.scheduler.submit(job):
            raise ApiError(503, f"the server is busy ({self.cfg.max_queue} requests waiting); retry shortly",
                           kind="server_error", code="queue_full", headers={"Retry-After": "1"})


def _outcome(job: Job, timeout: float) -> None:
    """Raise the ApiError a finished job ends in, if any."""
    if isinstance(job.error, ContextError):
        raise ApiError(400, str(job.error), param="max_tokens", code="context_length_exceeded")
    if isinstance(job.error, ThreadStopped):
        raise ApiError(503, f"the generation thread has stopped ({job.error}); restart the server",
                       kind="server_error", code="generation_stopped")
    if job.error is not None:
        raise ApiError(500, f"generation failed: {type(job.error).__name__}", kind="server_error")
    if job.row.finish_reason == "timeout":
        raise ApiError(504, f"the request took longer than request_timeout={timeout:g} s",
                       kind="server_error", code="timeout")


def _content(job: Job, cfg: Config) -> str:
    """The answer; a VLM answer's "confidence" is the one computed from the model's probabilities (as evaluate
    writes it), unless keep_model_confidence."""
    parsed = (job.notes or {}).get("parsed")
    if parsed is None or cfg.keep_model_confidence or "confidence" not in parsed:
        return job.row.text
    span = json_span(job.row.text)
    if span is None:
        return job.row.text
    start, end = span  # words the model wrote around the object stay; the object gets training's layout
    return job.row.text[:start] + json.dumps(parsed, ensure_ascii=False) + job.row.text[end:]


def _usage(row: Row) -> dict:
    return {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens}


def _finish(row: Row) -> str:
    return "length" if row.finish_reason == "length" else "stop"


def build_app(service: Service):
    cfg = service.cfg
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    app = FastAPI(title="LoRA serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err):
        return JSONResponse(ApiError(400, str(err.errors()[0].get("msg", "invalid request"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, err):  # never a traceback to the client; the log has it
        logger.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").body(),
                            status_code=500)

    def json_body(request: Request) -> None:
        """Only JSON bodies: a browser page on another site can POST text/plain or a form without asking
        (no CORS preflight), never application/json."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the request body must be sent as Content-Type: application/json (got "
                           f"{kind or 'none'!r})", code="unsupported_media_type")

    def authorized(request: Request) -> None:
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <api_key>",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        s = service.scheduler
        counts = {"waiting": len(s.pending), "running": s.running, "served": s.served, "batches": s.batches,
                  "cancelled": s.cancelled}
        if not s.healthy:
            return JSONResponse({"status": "generation thread stopped", "reason": s.failure, **counts},
                                status_code=503)
        return {"status": "ok", **counts}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lora"}
                                           for n in service.model_names()]}

    @app.get("/v1/info", dependencies=[Depends(authorized)])
    async def info():
        lm = service.engine.label_map
        return {"model_type": cfg.model_type, "models": service.model_names(),
                "fields": [p["field"] for p in lm["positions"]] if lm else [],
                "schema": label_schema(lm) if lm else None, "api_key_required": key is not None}

    def prepare(raw: bytes, loop) -> tuple[ChatRequest, Job, str]:
        """JSON, validation, images and the prompt's tokens: on a request thread, neither on the event loop
        nor on the generation thread."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON (UTF-8)") from None
        req = parse_request(body)
        return req, *service.job(req, loop)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized), Depends(json_body)])
    async def chat(request: Request):
        loop = asyncio.get_running_loop()
        req, job, model = await asyncio.to_thread(prepare, await request.body(), loop)
        cid = completion_id()
        if not req.stream:
            service.submit(job)
            await _wait(job, request)
            _outcome(job, cfg.request_timeout)
            return completion(cid, model, _content(job, cfg), _finish(job.row), _usage(job.row), job.notes)
        deltas: asyncio.Queue = asyncio.Queue()
        if not job.confidences:  # a VLM answer comes whole at the end, with its computed confidence written in
            job.row.on_text = lambda text: loop.call_soon_threadsafe(deltas.put_nowait, text)
        service.submit(job)

        async def events():
            try:
                yield {"data": json.dumps(chunk(cid, model, {"role": "assistant", "content": ""}))}
                while not job.future.done() or not deltas.empty():
                    getter = asyncio.ensure_future(deltas.get())
                    done, _ = await asyncio.wait({getter, job.future}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        text = getter.result()
                        yield {"data": json.dumps(chunk(cid, model, {"content": text}), ensure_ascii=False)}
                    else:
                        getter.cancel()
                try:
                    _outcome(job, cfg.request_timeout)
                except ApiError as e:
                    yield {"data": json.dumps(e.body())}
                    return
                if job.confidences:
                    yield {"data": json.dumps(chunk(cid, model, {"content": _content(job, cfg)}), ensure_ascii=False)}
                yield {"data": json.dumps(chunk(cid, model, {}, _finish(job.row), job.notes), ensure_ascii=False)}
                if req.stream_options and req.stream_options.include_usage:
                    yield {"data": json.dumps(chunk(cid, model, {}, usage=_usage(job.row)))}
                yield {"data": "[DONE]"}
            finally:
                job.row.cancelled.set()  # a client that left mid-stream frees its batch row

        return EventSourceResponse(events(), ping=15)

    @app.get("/")
    async def page():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg))
    return _BodyLimit(app, int(cfg.max_request_mb * 2**20))


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def allowed_hosts(cfg: Config) -> list[str]:
    """Host header names answered: loopback names, --host itself unless it is every interface, and
    allowed_hosts. A page on another site that rebinds its own name to 127.0.0.1 sends that name: refused."""
    names = [*LOOPBACK_NAMES, *cfg.allowed_hosts]
    if cfg.host not in ("0.0.0.0", "::", ""):
        names.append(f"[{cfg.host}]" if ":" in cfg.host else cfg.host)
    return ["*"] if "*" in names else names


async def _wait(job: Job, request) -> None:
    """Wait for the job; a client that hangs up cancels it (its row stops at the next token)."""
    while True:
        try:
            await asyncio.wait_for(asyncio.shield(job.future), timeout=0.5)
            return
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.row.cancelled.set()
                await job.future
                return


def _check_web() -> None:
    if not (WEB / "index.html").is_file():
        raise UserError(f"the web page is missing ({WEB / 'index.html'}); restore the repository's web/ folder")


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be listened on."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (or --host)") \
            from None


def run(cfg: Config) -> int:
    import uvicorn

    adopt_training_settings(cfg)
    system = system_prompt(cfg)
    label_map = vlm_label_map(cfg)
    _check_web()
    _check_port(cfg.host, cfg.port)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_key or os.environ.get(API_KEY_ENV)):
        logger.warning("serving on %s without an API key: anyone who reaches this address can use the model "
                       "(set --api_key or %s)", cfg.host, API_KEY_ENV)
    if cfg.host in ("0.0.0.0", "::") and not cfg.allowed_hosts:
        logger.warning("serving on every interface, but only loopback Host names are answered: clients on other "
                       "machines need --allowed_hosts NAME,... (this machine's name or address, or *)")
    from PIL import Image

    # PIL's own bomb check as a backstop behind the request's header check (which refuses first, naming the
    # size); what PIL would only warn about is refused there anyway.
    Image.MAX_IMAGE_PIXELS = 8 * pixel_bound(cfg.image_max_pixels)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    model, processor = load_for_inference(cfg)
    engine = Engine(model, processor, cfg, system, label_map)
    scheduler = Scheduler(engine, cfg.per_device_eval_batch_size, cfg.max_queue)
    service = Service(cfg, engine, scheduler)
    app = build_app(service)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=True,
                                           timeout_graceful_shutdown=int(cfg.request_timeout) + 5))
    # sse-starlette cuts open streams at SIGTERM by default; ours end with their request (request_timeout at
    # the latest), which is what draining means here.
    AppStatus.disable_automatic_graceful_drain()
    scheduler.start()
    logger.info("serving %s on http://%s:%d (page: /, API: /v1; models: %s); batches up to %d, queue %d",
                "the base model" if cfg.use_original_model else "the fine-tuned model", cfg.host, cfg.port,
                ", ".join(service.model_names()), cfg.per_device_eval_batch_size, cfg.max_queue)
    # uvicorn re-raises the signal that stopped it once it has drained; a handler of ours turns that into exit 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        scheduler.stop()
    logger.info("stopped after %d requests in %d batches", scheduler.served, scheduler.batches)
    return 0
