"""The review queue of `--task serve` (VLM runs): images whose answers need review, waiting for a person, and
the corrections that become training files.

    python main.py --task serve --config configs/demo_vlm.yaml
        GET /v1/review, GET /v1/review/{id}/image, POST /v1/review/{id}   (serve.py's routes; the page's tab)
    python main.py --task train --config configs/demo_vlm.yaml --extra_image_dirs output/<model>/reviewed

Each waiting item is two files in <run>/review/: <id>.json (the answer, its confidences, the doubtful fields)
and <id>.<ext> (the image's own bytes), each written atomically; the ids are the server's own (16 hex digits),
so no request names a path. A reviewed image is saved in review_dir under the name training reads:
<label code>_<id>.<ext>, the code encoded from the corrected values through the label map
(data_loading.encode_fields, the inverse of the decoding training does); an existing file is never replaced.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

from data_loading import encode_fields
from outputs import atomic_write_bytes, write_json

logger = logging.getLogger(__name__)
ID = re.compile(r"[0-9a-f]{16}")
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
MEDIA = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".bmp": "image/bmp",
         ".gif": "image/gif", ".tif": "image/tiff"}


def least_confident_first(item: dict) -> tuple:
    """The queue's order: answers without a confidence, then the least confident, the oldest first on ties."""
    return item.get("confidence") is not None, item.get("confidence") or 0, item.get("created", 0)


class ReviewError(ValueError):
    """A review request that cannot be done: `status` 404 (no such item) or 400 (values the label map lacks)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_file(raw: bytes) -> tuple[bytes, str]:
    """(bytes, suffix) to store: the image as sent when its format is one training reads, else a PNG of it."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        suffix = SUFFIXES.get(im.format or "")
        if suffix is not None:
            return raw, suffix
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), ".png"


class ReviewQueue:
    """One run's queue (serve_runs: one per run). Safe across the server's request threads."""

    def __init__(self, model: str, folder: Path, reviewed: Path, label_map: dict, max_items: int):
        self.model, self.folder, self.reviewed = model, Path(folder), Path(reviewed)
        self.label_map, self.max_items = label_map, max_items
        self.fields = {p["field"]: list(p["map"].values()) for p in label_map["positions"]}
        self._lock = threading.Lock()
        self._full_said = False
        self._tidy()

    def _tidy(self) -> None:
        """What a killed server left here: images whose item file was never written, and its temporary files
        (only names this queue gives, never another file)."""
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            orphan = ID.fullmatch(p.stem) and p.suffix in MEDIA and not (self.folder / f"{p.stem}.json").exists()
            temporary = p.name.startswith(".") and p.name.endswith(".tmp") and ID.match(p.name[1:])
            if (orphan or temporary) and p.is_file():
                p.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------------
    def _meta(self, item_id: str) -> Path:
        return self.folder / f"{item_id}.json"

    def _read(self, path: Path) -> dict | None:
        try:
            item = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # half-removed or foreign: not an item
        if not isinstance(item, dict) or not ID.fullmatch(str(item.get("id", ""))):
            return None
        # The image is <id><suffix> beside it, nothing else: an edited file names no other path to read or remove.
        if item.get("image") not in {item["id"] + s for s in MEDIA}:
            return None
        return item

    def waiting(self) -> list[dict]:
        """Every waiting item, least confident first."""
        if not self.folder.is_dir():
            return []
        items = [i for p in self.folder.glob("*.json") if ID.fullmatch(p.stem) and (i := self._read(p))
                 and i["id"] == p.stem]
        for i in items:  # queued under another name (an earlier server of this run): listed under today's
            i["model"] = self.model
        return sorted(items, key=least_confident_first)

    def add(self, raw: bytes, answer: dict, field_confidence: dict, confidence: float | None,
            review_fields: list[str]) -> str | None:
        """Queue an image with its answer; the id, or None when the queue is full of less confident items."""
        data, suffix = image_file(raw)
        with self._lock:
            items = self.waiting()
            if len(items) >= self.max_items:
                top = items[-1]  # the most confident waiting item makes room for a less confident one
                if confidence is None or (top.get("confidence") or 0) <= confidence:
                    if not self._full_said:
                        self._full_said = True
                        logger.warning("the review queue %s holds review_max_items=%d items, all less confident "
                                       "than new ones: those are answered but not queued until items are reviewed",
                                       self.folder, self.max_items)
                    return None
                self._remove(top)
            item_id = uuid.uuid4().hex[:16]
            image = f"{item_id}{suffix}"
            atomic_write_bytes(self.folder / image, data, overwrite=False)
            write_json(self._meta(item_id), {
                "id": item_id, "model": self.model, "created": time.time(), "image": image,
                "answer": answer, "field_confidence": field_confidence, "confidence": confidence,
                "review_fields": review_fields})
            self._full_said = False
            return item_id

    def item(self, item_id: str) -> dict:
        item = self._read(self._meta(item_id)) if ID.fullmatch(item_id) else None
        if item is None:
            raise ReviewError(404, f"no review item {item_id!r} is waiting (reviewed already, or never queued)")
        return item

    def image(self, item_id: str) -> tuple[Path, str]:
        item = self.item(item_id)
        path = self.folder / item["image"]
        if not path.is_file():
            raise ReviewError(404, f"the image of review item {item_id} is gone")
        return path, MEDIA.get(path.suffix, "application/octet-stream")

    def corrected(self, item: dict, fields: dict | None) -> dict:
        """The answer's label fields with `fields` put over them; ReviewError names what the label map refuses."""
        if fields is not None and not isinstance(fields, dict):
            raise ReviewError(400, "`fields` must be an object {field: value}")
        unknown = [k for k in fields or {} if k not in self.fields]
        if unknown:
            raise ReviewError(400, f"unknown fields {unknown}: the label map has {list(self.fields)}")
        answer = item.get("answer") if isinstance(item.get("answer"), dict) else {}
        values = {k: answer[k] for k in self.fields if k in answer}
        values.update(fields or {})
        try:
            encode_fields(values, self.label_map)
        except ValueError as e:
            raise ReviewError(400, f"{e}") from None
        return values

    def resolve(self, item_id: str, fields: dict | None = None) -> dict:
        """Save the item's image as a training file named by the corrected values (the answer's own when `fields`
        is None), and take it off the queue. -> {"id", "file", "fields", "code"}."""
        with self._lock:
            item = self.item(item_id)
            values = self.corrected(item, fields)
            code = encode_fields(values, self.label_map)
            source = self.folder / item["image"]
            try:
                data = source.read_bytes()
            except OSError:
                raise ReviewError(404, f"the image of review item {item_id} is gone") from None
            target = self._save(code, item_id, Path(item["image"]).suffix, data)
            self._remove(item)
        logger.info("review %s: %s saved as %s", item_id, json.dumps(values, ensure_ascii=False), target)
        return {"id": item_id, "file": str(target), "fields": values, "code": code}

    def _save(self, code: str, item_id: str, suffix: str, data: bytes) -> Path:
        for n in range(1, 1000):
            target = self.reviewed / (f"{code}_{item_id}{suffix}" if n == 1 else f"{code}_{item_id}-{n}{suffix}")
            try:
                atomic_write_bytes(target, data, overwrite=False)
                return target
            except FileExistsError:
                continue
        raise ReviewError(409, f"{self.reviewed} already holds 999 files for item {item_id}")

    def _remove(self, item: dict) -> None:
        for name in (f"{item['id']}.json", item["image"]):
            try:
                os.unlink(self.folder / name)
            except FileNotFoundError:
                pass
