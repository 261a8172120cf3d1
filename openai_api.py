"""The OpenAI chat-completions protocol as `--task serve` speaks it: request validation (unknown fields refused),
messages -> the Example training rendered, images from data: URLs, and the response and stream-chunk layouts.

    python main.py --task serve        every POST /v1/chat/completions passes through here

No HTTP and no model here: serve.py routes, batching.py schedules, generation.py answers.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_loading import MAX_ASPECT_RATIO, Example

MAX_IMAGES = 8  # per request; training saw one
MAX_MESSAGES = 2048  # per request, as OpenAI's API allows


def pixel_bound(image_max_pixels: int) -> int:
    """The most pixels the server decodes for one request (all its images together): 64x what the processor
    keeps of an image (it scales larger ones down), at least 16 megapixels. A 26 KB PNG can declare 13000x13000
    pixels (500 MB decoded): its header is read and refused before any decoding."""
    return max(64 * image_max_pixels, 16 * 2**20)


class ApiError(Exception):
    """An error answered in OpenAI's layout: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None
    name: str | None = None


class JsonSchema(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=10_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # torch.manual_seed's range
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted for compatibility; not used


SUPPORTED_FIELDS = ", ".join(ChatRequest.model_fields)


def parse_request(body) -> ChatRequest:
    """The validated request, or an ApiError (400) naming the first bad field and the fix."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unsupported field `{loc}`; this server supports: {SUPPORTED_FIELDS}",
                           param=loc) from None
        if loc == "n":
            raise ApiError(400, "only n=1 is supported (one answer per request)", param="n") from None
        raise ApiError(400, f"`{loc}`: {err['msg']}", param=loc) from None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "`stop`: up to 4 non-empty strings", param="stop")
    req.stop = stops
    if req.response_format and req.response_format.type == "json_schema":
        js = req.response_format.json_schema
        if js is None or not isinstance(js.schema_, dict):
            raise ApiError(400, "response_format json_schema needs json_schema.schema (a JSON schema object)",
                           param="response_format")
    if len(req.messages) > MAX_MESSAGES:
        raise ApiError(400, f"{len(req.messages)} messages: at most {MAX_MESSAGES} per request", param="messages")
    if req.messages[-1].role != "user":
        raise ApiError(400, "the last message must be the user's (the model answers it)", param="messages")
    return req


# ----------------------------------------------------------------------------------------------------
# messages -> Example
def _image_source(url: str, image_folder: Path | None, where: str):
    """A data: URL's bytes (BytesIO), or the path of an image inside the folder the operator allowed."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise ApiError(400, f"{where}: expected a data:image/...;base64, URL (got {head[:40]!r})", param=where)
        try:
            return io.BytesIO(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the base64 data does not decode", param=where) from None
    parsed = urlparse(url)
    if image_folder is None or parsed.scheme not in ("", "file"):
        raise ApiError(400, f"{where}: only data: URLs are accepted (the server fetches nothing); the operator "
                       "may allow a local folder with --image_folder", param=where)
    root = image_folder.resolve()
    path = Path(unquote(parsed.path if parsed.scheme else url))
    path = (path if path.is_absolute() else root / path).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(400, f"{where}: not an image file inside the allowed folder {image_folder}", param=where)
    return path


def single_image(req: ChatRequest, image_folder: Path | None) -> bytes | None:
    """The bytes of a request's image, when it has exactly one (what the review queue keeps)."""
    urls = [p.image_url.url for m in req.messages if isinstance(m.content, list) for p in m.content
            if p.type == "image_url" and p.image_url is not None]
    if len(urls) != 1:
        return None
    source = _image_source(urls[0], image_folder, "image_url")
    return source.getvalue() if isinstance(source, io.BytesIO) else source.read_bytes()


def _decode_image(url: str, image_folder: Path | None, where: str, budget: list[int]):
    """A PIL image from a data: URL (or, when the operator allowed a folder, a path inside it), decoded once,
    after its header's size is checked against what is left of the request's pixel budget (`budget[0]`)."""
    from PIL import Image

    from data_loading import to_rgb

    source = _image_source(url, image_folder, where)
    try:
        with Image.open(source) as im:  # reads the header only
            w, h = im.size
            if w * h > budget[0]:
                raise ApiError(400, f"{where}: {w}x{h} pixels is more than this request may decode ({budget[0]} "
                               "pixels left of its bound); send a smaller image", param=where,
                               code="image_too_large")
            if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                raise ApiError(400, f"{where}: {w}x{h} pixels is more elongated than {MAX_ASPECT_RATIO}:1",
                               param=where)
            budget[0] -= w * h
            return to_rgb(im)
    except ApiError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own check (serve sets it at the bound) fires on open
        raise ApiError(400, f"{where}: {e}; send a smaller image", param=where, code="image_too_large") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for data that is not an image
        raise ApiError(400, f"{where}: not a readable image ({type(e).__name__}: {str(e)[:120]})",
                       param=where) from None


def _image_parts(req: ChatRequest) -> int:
    return sum(1 for m in req.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")


def to_example(req: ChatRequest, vlm: bool, instruction: str | None, image_folder: Path | None,
               max_pixels: int = 16 * 2**20):
    """(Example, images) for a request, rendered as training rendered its samples: a lone user turn (with its
    image) becomes exactly the sample evaluate builds; with no system message the run's own is used. Images are
    counted before any is decoded, and decoded within `max_pixels` for the whole request."""
    if _image_parts(req) > MAX_IMAGES:
        raise ApiError(400, f"{_image_parts(req)} images: at most {MAX_IMAGES} per request", param="messages")
    turns, images, system, budget = [], [], None, [max_pixels]
    for i, m in enumerate(req.messages):
        parts = [] if m.content is None else \
            [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        text_parts, turn_images = [], []
        for j, p in enumerate(parts):
            part = p if isinstance(p, dict) else p.model_dump()
            if part["type"] == "text":
                if part.get("text") is None:
                    raise ApiError(400, f"messages.{i}.content.{j}: a text part needs \"text\"", param="messages")
                text_parts.append(part["text"])
                continue
            where = f"messages.{i}.content.{j}.image_url"
            if not vlm:
                raise ApiError(400, f"{where}: this model reads text only", param=where)
            if m.role != "user":
                raise ApiError(400, f"{where}: images go in user messages", param=where)
            if part.get("image_url") is None:
                raise ApiError(400, f"{where}: an image_url part needs image_url.url", param=where)
            turn_images.append(_decode_image(part["image_url"]["url"], image_folder, where, budget))
        text = "\n".join(text_parts)
        role = "system" if m.role == "developer" else m.role
        if role == "system":
            if turns:
                raise ApiError(400, f"messages.{i}: a system message goes first", param="messages")
            system = text if system is None else system + "\n" + text
            continue
        if turns and turns[-1]["role"] == role:
            raise ApiError(400, f"messages.{i}: two {role} messages in a row; merge them into one",
                           param="messages")
        turns.append({"role": role, "text": text, "images": turn_images})
        images += turn_images
    if vlm and not images:
        raise ApiError(400, "this model answers images: add a user content part {\"type\": \"image_url\", "
                       "\"image_url\": {\"url\": \"data:image/png;base64,...\"}}", param="messages")
    last = turns[-1]
    if len(turns) == 1 and len(images) <= 1:
        prompt = last["text"] or (instruction or "" if vlm else "")
        return Example(prompt, "", image="request" if images else None, system=system), (images or None)
    msgs = []
    if system is not None:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}] if vlm else system})
    for t in turns:
        if vlm:
            content = [{"type": "image"} for _ in t["images"]] + ([{"type": "text", "text": t["text"]}]
                                                                  if t["text"] else [])
        else:
            content = t["text"]
        msgs.append({"role": t["role"], "content": content})
    msgs.append({"role": "assistant", "content": ""})  # the turn to answer (to_messages drops it)
    return Example(last["text"], "", system=system, messages=msgs), (images or None)


# ----------------------------------------------------------------------------------------------------
# responses
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _extras(notes: dict | None) -> dict:
    """What a VLM choice carries beside the message: confidences, and whether (and why) it needs review."""
    if not notes:
        return {}
    return {k: notes[k] for k in ("field_confidence", "confidence", "needs_review", "review_fields", "review_id")
            if k in notes}


def completion(cid: str, model: str, text: str, finish: str, usage: dict, notes: dict | None) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish, **_extras(notes)}],
            "usage": usage}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, notes: dict | None = None,
          usage: dict | None = None) -> dict:
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                              **_extras(notes)}]
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out
