"""An OpenAI-compatible server for the trained model, with a small web page.

    python main.py --task serve --config configs/demo.yaml          http://127.0.0.1:8000 (page), /v1 (API)
    python main.py --task serve --use_original_model                the base model alone
    python main.py --task serve --host 0.0.0.0 --api_key SECRET     (or LORA_API_KEY=SECRET in the environment)

    python main.py --task serve --serve_runs line1=output/a/MODEL line2=output/b/MODEL    two adapters, one base
    python main.py --task serve --watch_adapter true                 reload the adapter when training replaces it

Routes: GET /health (no key needed), GET /v1/models (with each adapter's revision), POST /v1/chat/completions
(stream or not), POST /v1/models/reload, GET /v1/info (what the page needs to know), GET / (the page, static
files of web/); VLM runs: GET /v1/review, GET /v1/review/{id}/image, POST /v1/review/{id} (review_queue.py).
The base model loads once with each run's adapter (peft named adapters); a request's model picks one, and
the base model's name switches them all off. VLM answers are constrained to the run's label-map schema unless
the request asks otherwise, and carry field_confidence, confidence and needs_review on the choice, computed as
evaluate computes them; an answer that needs review leaves its image in the run's review queue. SIGTERM or
Ctrl-C: no new connections, in-flight requests finish, exit 0.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import AppStatus, EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

import thresholds
from batching import Job, Scheduler, ThreadStopped
from config import Config, UserError
from data_loading import system_prompt
from generation import ContextError, Engine, Row, vlm_label_map
from model_config import adapter_revision, adopt_training_settings, load_for_inference, require_adapter
from openai_api import (
    ApiError,
    ChatRequest,
    chunk,
    completion,
    completion_id,
    parse_request,
    pixel_bound,
    single_image,
    to_example,
)
from review_queue import ReviewError, ReviewQueue, least_confident_first
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


@dataclass
class Served:
    """One model name the server answers: a run's adapter on the shared base, or the base alone (adapter None)."""

    name: str
    cfg: Config
    engine: Engine
    adapter: str | None                 # the peft adapter's name now (a reload loads it under a new one)
    lora_dir: Path | None = None
    revision: str | None = None         # adapter_revision of the loaded adapter
    thresholds: dict | None = None      # thresholds.json: which answers need review
    queue: ReviewQueue | None = None
    loads: int = 0

    def flags(self, notes: dict) -> dict:
        return thresholds.flags(notes.get("field_confidence"), notes.get("confidence"), self.thresholds)

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "lora",
                "adapter": str(self.lora_dir) if self.lora_dir else None, "adapter_revision": self.revision}


class Service:
    """What the routes need: the served models behind one scheduler, and the request limits."""

    def __init__(self, cfg: Config, served: list[Served], scheduler: Scheduler):
        self.cfg, self.scheduler = cfg, scheduler
        self.models = {s.name: s for s in served}
        self.vlm = cfg.model_type == "vlm"
        self.image_folder = Path(cfg.image_folder) if cfg.image_folder else None
        self.max_pixels = pixel_bound(cfg.image_max_pixels)
        self._schemas: OrderedDict[str, object] = OrderedDict()  # compiled grammars, least recently used last
        self._schemas_lock = threading.Lock()  # requests are prepared on threads of their own
        self._reloading = threading.Lock()

    def model_names(self) -> list[str]:
        return list(self.models)

    def queues(self) -> list[ReviewQueue]:
        return [s.queue for s in self.models.values() if s.queue is not None]

    def _grammar(self, engine: Engine, schema: dict | None):
        key = json.dumps(schema, sort_keys=True)
        with self._schemas_lock:
            if key in self._schemas:
                self._schemas.move_to_end(key)
                return self._schemas[key]
        try:
            compiled = engine.compile_schema(schema)
        except Exception as e:  # noqa: BLE001 - xgrammar's message says what it cannot compile
            raise ApiError(400, f"response_format: the JSON schema does not compile: {str(e)[:200]}",
                           param="response_format") from None
        with self._schemas_lock:
            self._schemas[key] = compiled
            while len(self._schemas) > 32:
                self._schemas.popitem(last=False)
        return compiled

    def constraint(self, req: ChatRequest, engine: Engine):
        """(compiled grammar or None, whether the label map's confidences apply): a VLM request without a
        response_format, or with the label map's own schema, gets the label-map answer and its confidences;
        text, json_object and other schemas are answered as asked (streamed as they are generated)."""
        fmt = req.response_format
        if fmt is None:
            if self.vlm and engine.label_constraint is not None:
                return engine.label_constraint.compiled, True
            return None, self.vlm and engine.label_map is not None
        if fmt.type == "text":
            return None, False
        if fmt.type == "json_object":
            return self._grammar(engine, None), False
        schema = fmt.json_schema.schema_
        is_label = self.vlm and engine.label_map is not None and schema == label_schema(engine.label_map)
        return self._grammar(engine, schema), is_label

    def job(self, req: ChatRequest, loop) -> tuple[Job, str]:
        """The request as a job, its images decoded and its prompt encoded here (a request thread), once."""
        model = req.model or self.model_names()[0]
        if model not in self.models:
            raise ApiError(404, f"the model `{model}` does not exist; this server has: "
                           f"{', '.join(self.model_names())}", param="model", code="model_not_found")
        served = self.models[model]
        engine = served.engine
        example, images = to_example(req, self.vlm, served.cfg.instruction, self.image_folder, self.max_pixels)
        grammar, confidences = self.constraint(req, engine)
        asked = req.max_completion_tokens or req.max_tokens
        row = Row(example=example, images=images, max_tokens=asked or self.cfg.max_new_tokens, stop=req.stop,
                  constraint=grammar, deadline=time.monotonic() + self.cfg.request_timeout)
        try:
            engine.encode_row(row, explicit=asked is not None)
        except ContextError as e:
            raise ApiError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except Exception as e:  # noqa: BLE001 - a chat template or processor refusing these messages
            logger.warning("a request's messages could not be encoded: %s: %s", type(e).__name__, str(e)[:300])
            raise ApiError(400, f"the messages could not be encoded for this model ({type(e).__name__}: "
                           f"{str(e)[:200]})", param="messages") from None
        temperature = self.cfg.temperature if req.temperature is None else req.temperature
        top_p = self.cfg.top_p if req.top_p is None else req.top_p
        job = Job(row=row, temperature=temperature, top_p=top_p, seed=req.seed, served=served,
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

    def queue_for_review(self, req: ChatRequest, job: Job) -> None:
        """An answer that needs review leaves its image (and the answer) in its run's queue: job.notes gains
        review_id (null when the queue had no room or the request was not one image)."""
        served, notes = job.served, job.notes
        if served.queue is None or not notes or not notes.get("needs_review") or notes.get("parsed") is None:
            return
        raw = single_image(req, self.image_folder)
        if raw is None:
            return
        try:
            notes["review_id"] = served.queue.add(raw, notes["parsed"], notes["field_confidence"],
                                                  notes["confidence"], notes["review_fields"])
        except OSError as e:  # a full disk must not cost the answer
            logger.error("could not queue an answer for review in %s: %s", served.queue.folder, e)
            notes["review_id"] = None

    # ---------------------------------------------------------------------------------------------
    # adapters: reloaded on the generation thread, between batches
    def reload(self, names: list[str] | None = None) -> list[dict]:
        """Reload each named run's adapter (every run's when None) whose files changed; one entry per run."""
        runs = [s for s in self.models.values() if s.lora_dir is not None and (names is None or s.name in names)]
        with self._reloading:  # one reload at a time (the watcher and a POST)
            return [self.scheduler.call(lambda s=s: self._reload(s)).result() for s in runs]

    def _reload(self, s: Served) -> dict:
        out = {"id": s.name, "reloaded": False, "adapter_revision": s.revision}
        revision = adapter_revision(s.lora_dir)
        if revision is None:
            return {**out, "error": f"no adapter at {s.lora_dir} now; kept the loaded one"}
        if revision == s.revision:
            s.thresholds = thresholds.load(thresholds.path(s.cfg), revision)
            return out
        model = s.engine.model
        label_map = s.lora_dir / "label_map.json"
        try:
            other = s.engine.label_map is not None and label_map.is_file() \
                and json.loads(label_map.read_text(encoding="utf-8")) != s.engine.label_map
        except (OSError, ValueError) as e:  # a folder being replaced, or a damaged copy
            return {**out, "error": f"{label_map} is not readable now ({e}); kept the loaded adapter"}
        if other:
            return {**out, "error": f"the new adapter in {s.lora_dir} was trained with another label map; kept the "
                    "loaded one (restart the server to serve it)"}
        s.loads += 1
        new = f"{s.adapter.split('__')[0]}__r{s.loads}"
        try:
            model.load_adapter(str(s.lora_dir), adapter_name=new, is_trainable=False)
        except Exception as e:  # noqa: BLE001 - the old adapter stays; the caller is told why
            if new in getattr(model, "peft_config", {}):
                model.delete_adapter(new)
            logger.warning("reloading %s from %s failed (%s: %s); still serving revision %s", s.name, s.lora_dir,
                           type(e).__name__, str(e)[:300], s.revision)
            return {**out, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        old, s.adapter = s.adapter, new
        model.set_adapter(new)
        model.delete_adapter(old)
        model.eval()
        s.revision = revision
        s.thresholds = thresholds.load(thresholds.path(s.cfg), revision)
        logger.info("%s: reloaded the adapter from %s (revision %s)", s.name, s.lora_dir, revision)
        return {**out, "reloaded": True, "adapter_revision": revision}


def _stamp(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _adapter_stamp(lora_dir: Path):
    return _stamp(lora_dir / "adapter_model.safetensors")


def watch_adapters(service: Service, stop: threading.Event, every: float = 2.0) -> None:
    """--watch_adapter: a run whose adapter file changed, and then stayed the same for one more look, is
    reloaded (training replaces the folder whole, but a copy by hand may take a while); new thresholds.json
    files are read as they appear."""
    runs = [s for s in service.models.values() if s.lora_dir is not None]
    seen = {s.name: _adapter_stamp(s.lora_dir) for s in runs}
    judged = {s.name: _stamp(thresholds.path(s.cfg)) for s in runs}
    changed: set[str] = set()
    while not stop.wait(every):
        for s in runs:
            stamp = _stamp(thresholds.path(s.cfg))
            if stamp != judged[s.name]:  # evaluate wrote new thresholds: read them (no model work)
                judged[s.name] = stamp
                s.thresholds = thresholds.load(thresholds.path(s.cfg), s.revision) if s.engine.label_map else None
                logger.info("%s: read the new %s", s.name, thresholds.path(s.cfg))
            stamp = _adapter_stamp(s.lora_dir)
            if stamp != seen[s.name]:
                seen[s.name] = stamp
                changed.add(s.name)
            elif s.name in changed and stamp is not None:
                changed.discard(s.name)
                try:
                    service.reload([s.name])
                except ThreadStopped:
                    return
                except Exception:  # noqa: BLE001 - the watcher must outlive any one failed reload
                    logger.exception("reloading %s failed", s.name)


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
        return {"object": "list", "data": [s.describe() for s in service.models.values()]}

    @app.post("/v1/models/reload", dependencies=[Depends(authorized), Depends(json_body)])
    async def reload(request: Request):
        body = await _json(request)
        wanted = body.get("model") if isinstance(body, dict) else None
        if wanted is not None and wanted not in service.models:
            raise ApiError(404, f"the model `{wanted}` does not exist; this server has: "
                           f"{', '.join(service.model_names())}", param="model", code="model_not_found")
        try:
            done = await asyncio.to_thread(service.reload, None if wanted is None else [wanted])
        except ThreadStopped as e:
            raise ApiError(503, f"the generation thread has stopped ({e}); restart the server", kind="server_error",
                           code="generation_stopped") from None
        return {"object": "list", "data": done}

    @app.get("/v1/info", dependencies=[Depends(authorized)])
    async def info():
        first = next(iter(service.models.values()))
        lm = first.engine.label_map
        per_model = {}
        for s in service.models.values():
            m = s.engine.label_map
            per_model[s.name] = {"fields": {p["field"]: list(p["map"].values()) for p in m["positions"]} if m else {},
                                 "label_map": m, "review": s.queue is not None}
        return {"model_type": cfg.model_type, "models": service.model_names(),
                "fields": [p["field"] for p in lm["positions"]] if lm else [],
                "schema": label_schema(lm) if lm else None, "api_key_required": key is not None,
                "per_model": per_model}

    # review queue (VLM runs)
    def queue_of(item_id: str) -> ReviewQueue:
        for q in service.queues():
            if (q.folder / f"{item_id}.json").is_file():
                return q
        raise ApiError(404, f"no review item {item_id!r} is waiting (reviewed already, or never queued)",
                       kind="not_found_error")

    @app.get("/v1/review", dependencies=[Depends(authorized)])
    async def review_list(model: str | None = None, limit: int = 100):
        if model is not None and model not in service.models:
            raise ApiError(404, f"the model `{model}` does not exist; this server has: "
                           f"{', '.join(service.model_names())}", param="model", code="model_not_found")
        limit = max(1, min(limit, 1000))
        queues = [q for q in service.queues() if model is None or q.model == model]
        waiting = await asyncio.to_thread(lambda: [i for q in queues for i in q.waiting()])
        items = sorted(waiting, key=least_confident_first)  # several runs' queues in one list
        return {"object": "list", "total": len(items),
                "data": [{**{k: i[k] for k in ("id", "model", "created", "answer", "field_confidence",
                                               "confidence", "review_fields")},
                          "image_url": f"/v1/review/{i['id']}/image"} for i in items[:limit]]}

    @app.get("/v1/review/{item_id}/image", dependencies=[Depends(authorized)])
    async def review_image(item_id: str):
        try:
            path, media = queue_of(item_id).image(item_id)
        except ReviewError as e:
            raise ApiError(e.status, str(e), kind="not_found_error") from None
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-store"})

    @app.post("/v1/review/{item_id}", dependencies=[Depends(authorized), Depends(json_body)])
    async def review_resolve(item_id: str, request: Request):
        body = await _json(request)
        if not isinstance(body, dict) or set(body) - {"fields", "accept"} \
                or (body.get("accept") is True) == ("fields" in body):
            raise ApiError(400, 'send {"fields": {field: value, ...}} to correct the answer, or {"accept": true} '
                           "to keep it")
        queue = queue_of(item_id)
        try:
            return await asyncio.to_thread(queue.resolve, item_id, None if body.get("accept") else body["fields"])
        except ReviewError as e:
            raise ApiError(e.status, str(e), param="fields" if e.status == 400 else None) from None
        except OSError as e:
            raise ApiError(500, f"could not save the reviewed image in {queue.reviewed}: {e.strerror or e}",
                           kind="server_error") from None

    def prepare(raw: bytes, loop) -> tuple[ChatRequest, Job, str]:
        """JSON, validation, images and the prompt's tokens: on a request thread, neither on the event loop
        nor on the generation thread."""
        req = parse_request(_parse_json(raw))
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
            await asyncio.to_thread(service.queue_for_review, req, job)
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
                    await asyncio.to_thread(service.queue_for_review, req, job)
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


def _parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON (UTF-8)") from None


async def _json(request: Request):
    """A small JSON body (reload, review); an empty one is {}."""
    raw = await request.body()
    return _parse_json(raw) if raw.strip() else {}


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


def _run_configs(cfg: Config) -> list[tuple[str, Config]]:
    """(model name, the run's config) per served run: this config's own run, or each of serve_runs (whose
    adapters, label maps and prompts are their own); none with --use_original_model."""
    if cfg.use_original_model:
        if cfg.serve_runs:
            raise UserError("`serve_runs` serves trained adapters; drop --use_original_model (the base model is "
                            f"served beside them anyway, as {cfg.model_name}-base)")
        return []
    if not cfg.serve_runs:
        adopt_training_settings(cfg)
        return [(cfg.model_name, cfg)]
    out: list[tuple[str, Config]] = []
    for entry in cfg.serve_runs:
        name, _, folder = entry.partition("=")
        folder = Path(folder).expanduser()
        if name in (n for n, _ in out) or name == f"{cfg.model_name}-base":
            raise UserError(f"`serve_runs`: the name {name!r} is used twice; give each run its own")
        if not (folder / "lora_model" / "adapter_config.json").is_file():
            raise UserError(f"`serve_runs`: {folder} holds no trained adapter (lora_model/adapter_config.json); name "
                            "a run folder, output_dir/<model-name>, that --task train wrote")
        if folder.resolve().name != cfg.model_name:
            raise UserError(f"`serve_runs`: {folder} is not a run of {cfg.model_name_or_path}: run folders are named "
                            f"after their base model (.../{cfg.model_name}), and one server holds one base model")
        run_cfg = copy.copy(cfg)
        run_cfg.output_dir, run_cfg.serve_runs = str(folder.resolve().parent), []
        adopt_training_settings(run_cfg)
        require_adapter(run_cfg)
        if out and any(getattr(run_cfg, k) != getattr(out[0][1], k) for k in ("image_min_pixels", "image_max_pixels")):
            raise UserError(f"`serve_runs`: {folder} was trained with other image_min_pixels/image_max_pixels than "
                            f"{out[0][0]}; runs on one server share the image processor: serve it on another port")
        out.append((name, run_cfg))
    return out


def _review_dir(run_cfg: Config, name: str, several: bool) -> Path:
    if run_cfg.review_dir is None:
        return run_cfg.run_dir / "reviewed"
    return Path(run_cfg.review_dir) / name if several else Path(run_cfg.review_dir)  # runs never share corrections


def _load_served(cfg: Config, runs: list[tuple[str, Config]]) -> list[Served]:
    """The base model once, each run's adapter on it under a name of its own, and an engine per run."""
    first = runs[0][1] if runs else cfg
    model, processor = load_for_inference(first)  # the first run's adapter is peft's "default"
    served = []
    for i, (name, run_cfg) in enumerate(runs):
        adapter = "default" if i == 0 else f"run{i}"
        if i:
            try:
                model.load_adapter(str(run_cfg.lora_dir), adapter_name=adapter, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as e:
                raise UserError(f"`serve_runs`: the adapter in {run_cfg.lora_dir} does not fit "
                                f"{cfg.model_name_or_path}: {str(e)[:300]}") from None
            logger.info("loaded LoRA adapter %s from %s", name, run_cfg.lora_dir)
        label_map = vlm_label_map(run_cfg)
        engine = Engine(model, processor, run_cfg, system_prompt(run_cfg), label_map)
        revision = adapter_revision(run_cfg.lora_dir)
        queue = ReviewQueue(name, run_cfg.run_dir / "review", _review_dir(run_cfg, name, len(runs) > 1), label_map,
                            run_cfg.review_max_items) if label_map is not None else None
        review = thresholds.load(thresholds.path(run_cfg), revision) if label_map is not None else None
        served.append(Served(name, run_cfg, engine, adapter, run_cfg.lora_dir, revision, review, queue))
    model.eval()
    if served:
        model.set_adapter("default")
    base_engine = served[0].engine if served else Engine(model, processor, cfg, system_prompt(cfg), vlm_label_map(cfg))
    base_cfg = copy.copy(first)
    base_cfg.use_original_model = True
    path = thresholds.path(base_cfg)  # the base model's own thresholds, when evaluate made them
    served.append(Served(f"{cfg.model_name}-base", base_cfg, base_engine, None,
                         thresholds=thresholds.load(path) if cfg.model_type == "vlm" and path.is_file() else None))
    return served


def run(cfg: Config) -> int:
    import uvicorn

    runs = _run_configs(cfg)
    for _, run_cfg in runs or [(None, cfg)]:
        system_prompt(run_cfg)  # a missing prompt or label map is reported before the model loads
        vlm_label_map(run_cfg)
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
    served = _load_served(cfg, runs)
    scheduler = Scheduler(cfg.per_device_eval_batch_size, cfg.max_queue)
    service = Service(cfg, served, scheduler)
    app = build_app(service)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=True,
                                           timeout_graceful_shutdown=int(cfg.request_timeout) + 5))
    # sse-starlette cuts open streams at SIGTERM by default; ours end with their request (request_timeout at
    # the latest), which is what draining means here.
    AppStatus.disable_automatic_graceful_drain()
    scheduler.start()
    stop_watching = threading.Event()
    if cfg.watch_adapter and runs:
        threading.Thread(target=watch_adapters, args=(service, stop_watching), name="adapter-watch",
                         daemon=True).start()
    logger.info("serving on http://%s:%d (page: /, API: /v1; models: %s); batches up to %d, queue %d%s", cfg.host,
                cfg.port, ", ".join(service.model_names()), cfg.per_device_eval_batch_size, cfg.max_queue,
                "; reloading adapters when training replaces them" if cfg.watch_adapter and runs else "")
    for q in service.queues():
        logger.info("%s: answers that need review wait in %s; reviewed images are saved in %s", q.model, q.folder,
                    q.reviewed)
    # uvicorn re-raises the signal that stopped it once it has drained; a handler of ours turns that into exit 0.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop_watching.set()
        scheduler.stop()
    logger.info("stopped after %d requests in %d batches", scheduler.served, scheduler.batches)
    return 0
