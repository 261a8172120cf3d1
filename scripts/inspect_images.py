"""Send every image of a folder to a running `--task serve` (as an inspection station's camera would) and print
each answer, its confidence and whether it needs review; the doubtful ones wait in the server's review queue.

    python scripts/inspect_images.py data/vlm_shapes/incoming [--url http://127.0.0.1:8000] [--model NAME]

When the file names carry label codes (as training images do), each answer is also checked against the name,
and the count of right answers is printed. The API key, if the server needs one, is read from LORA_API_KEY.
Standard library only: it runs in any Python 3.10+.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

SUFFIXES = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".gif": "gif"}


def call(url: str, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("LORA_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["LORA_API_KEY"]
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        message = json.loads(e.read() or b"{}").get("error", {}).get("message", e.reason)
        raise SystemExit(f"{url}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise SystemExit(f"cannot reach {url} ({e.reason}): is `python main.py --task serve` running?") from None


def expected(name: str, label_map: dict | None) -> dict | None:
    """The values a label-coded file name stands for, through the server's label map (None when it does not fit)."""
    if not label_map:
        return None
    code, positions = Path(name).stem.split("_", 1)[0], label_map["positions"]
    if len(code) != len(positions) or any(ch not in p["map"] for ch, p in zip(code, positions)):
        return None
    return {p["field"]: p["map"][ch] for ch, p in zip(code, positions)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="the served model (default: the server's first)")
    args = p.parse_args(argv)
    files = sorted(f for f in args.folder.iterdir() if f.suffix.lower() in SUFFIXES) if args.folder.is_dir() else []
    if not files:
        raise SystemExit(f"{args.folder}: no images ({', '.join(SUFFIXES)})")
    info = call(args.url.rstrip("/") + "/v1/info")
    model = args.model or info["models"][0]
    label_map = (info.get("per_model", {}).get(model) or {}).get("label_map")
    right = checked = queued = 0
    for f in files:
        url = f"data:image/{SUFFIXES[f.suffix.lower()]};base64," + base64.b64encode(f.read_bytes()).decode()
        reply = call(args.url.rstrip("/") + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                       "image_url": {"url": url}}]}]})
        choice = reply["choices"][0]
        answer = json.loads(choice["message"]["content"])
        truth = expected(f.name, label_map)
        mark = ""
        if truth is not None:
            ok = all(answer.get(k) == v for k, v in truth.items())
            right, checked, mark = right + ok, checked + 1, "right " if ok else "WRONG "
        review = f"needs review ({', '.join(choice.get('review_fields') or [])})" if choice.get("needs_review") \
            else "accepted"
        queued += bool(choice.get("review_id"))
        conf = choice.get("confidence")
        print(f"{f.name}: {mark}{json.dumps({k: answer[k] for k in answer if k != 'confidence'}, ensure_ascii=False)}"
              f" confidence {conf:.3f} {review}" if conf is not None else f"{f.name}: {choice['message']['content']}")
    if checked:
        print(f"{right}/{checked} answers match their file names")
    print(f"{queued} images queued for review: open {args.url} and the Review tab")
    return 0


if __name__ == "__main__":
    sys.exit(main())
