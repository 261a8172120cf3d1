"""Reading questions and images from files and stdin, writing prediction files: the I/O around the generation
engine that the batch and interactive tasks share.

    python main.py --task inference --input FILE --output preds.jsonl     prepare_batch -> run_batch
    python main.py --task compare   --input FILE --output compare.jsonl   the same, two answer columns
    python main.py --task inference | compare                             repl (lines from stdin)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from config import Config, UserError
from data_loading import IMAGE_SUFFIXES, Example, check_image, list_images, load_data_file, read_json, read_text
from metrics import text_metrics
from structured import parse_json

logger = logging.getLogger(__name__)
EXIT_WORDS = {"exit", "quit", ":q"}


# ----------------------------------------------------------------------------------------------------
# batch files
def _lines(text: str) -> list[str]:
    """Lines split at \n (and \r\n) only: str.splitlines also splits at U+2028, U+2029 and U+0085, which JSON
    strings and prompts may hold."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_text_inputs(path: Path) -> list[Example]:
    """.txt: one prompt per line; .jsonl: one object per line; .json: an array of objects (or strings) with
    "text" (and optional "target"), or any training data format."""
    text = read_text(path, "input file")
    if path.suffix.lower() == ".txt":
        lines = _lines(text)
        return [Example(line.strip(), None, source=f"{path}:{i + 1}") for i, line in enumerate(lines) if line.strip()]
    if path.suffix.lower() == ".jsonl":
        items = []
        for i, line in enumerate(_lines(text)):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {i + 1} is not valid JSON: {e.msg}") from None
    else:
        items = read_json(path, "input file")
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of objects with \"text\"")
    if items and all(isinstance(item, dict) and "text" not in item for item in items):
        return load_data_file(path)  # a training-format file (Alpaca, messages, ShareGPT): answered, and scored
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise UserError(f"{path}: entry {i} needs a non-empty \"text\" string")
        target = item.get("target")
        out.append(Example(item["text"], target if isinstance(target, str) else None, source=f"{path}[{i}]"))
    return out


def _read_image_inputs(path: Path, instruction: str | None = None) -> list[Example]:
    """A folder of images, or a .txt/.json list of image paths (relative to the list's folder)."""
    if path.is_dir():
        files = list_images(path)
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        files = [path]
    elif path.is_file():
        if path.suffix.lower() == ".json":
            names = read_json(path, "image list")
            if not isinstance(names, list):
                raise UserError(f"{path}: expected a JSON array of image paths, got a JSON {type(names).__name__}")
            for i, name in enumerate(names):
                if not isinstance(name, str) or not name.strip():
                    raise UserError(f"{path}: entry {i} is {json.dumps(name)[:60]}, not an image path (a string)")
        else:
            names = [n.strip() for n in _lines(read_text(path, "image list")) if n.strip()]
        files = [p if p.is_absolute() else (path.parent / p if (path.parent / p).exists() else p)
                 for p in map(Path, names)]
    else:
        raise UserError(f"--input {path} is neither an image folder nor a file listing images")
    out, bad = [], []
    for f in files:
        reason = "not found" if not f.is_file() else check_image(f)
        if reason:
            bad.append(f"{f}: {reason}")
        else:
            out.append(Example(instruction or "", None, image=str(f), source=str(f)))
    if bad:
        logger.warning("skipping %d unusable images: %s", len(bad), "; ".join(bad[:5]))
    if not out:
        raise UserError(f"no readable images in {path}")
    return out


def prepare_batch(cfg: Config) -> tuple[list[Example], Path]:
    """Read and check the inputs and the output path before any model loads."""
    path = Path(cfg.input)
    examples = _read_image_inputs(path, cfg.instruction) if cfg.model_type == "vlm" else _read_text_inputs(path)
    if not examples:
        raise UserError(f"--input {path} holds no inputs; give a file with at least one question (or image)")
    for e in examples:
        if len(e.prompt) > cfg.max_input_chars:
            logger.warning("%s: input longer than max_input_chars=%d, truncated", e.source, cfg.max_input_chars)
            e.prompt = e.prompt[:cfg.max_input_chars]
    output = Path(cfg.output) if cfg.output else cfg.run_dir / "predictions.jsonl"
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; name a file, e.g. {output / 'predictions.jsonl'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(_partial(output), "w", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"cannot write --output {output}: {e.strerror or e}") from None
    return examples, output


def _partial(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _prediction_row(cfg: Config, e: Example, answers: dict[str, str]) -> dict:
    """One output line: the input, each model's answer (VLM: parsed JSON, plus the raw text) and the target."""
    if cfg.model_type == "vlm":
        row = {"file": e.image}
        for key, text in answers.items():
            row[key] = parse_json(text)
            row["raw" if key == "prediction" else f"{key}_raw"] = text
        return row
    return {"text": e.prompt, **answers, **({"target": e.target} if e.target is not None else {})}


def run_batch(cfg: Config, examples: list[Example], output: Path, answer) -> dict[str, list[str]]:
    """answer(examples) -> {column: answers}. Rows are appended to OUTPUT.partial chunk by chunk (a late failure
    keeps what was done) and the file is renamed to OUTPUT when complete; text columns are scored against
    targets when the input has them."""
    chunk = cfg.per_device_eval_batch_size * 8
    columns: dict[str, list[str]] = {}
    partial, done = _partial(output), 0
    with open(partial, "w", encoding="utf-8") as f, tqdm(total=len(examples), desc="generating", unit="input") as bar:
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            try:
                answers = answer(part)
            except Exception:
                logger.error("stopped after %d of %d inputs; their predictions are in %s", done, len(examples),
                             partial)
                raise
            extra = answers.pop("_extra", None)  # per-row additions (VLM: confidences, the annotated JSON)
            for i, e in enumerate(part):
                row = _prediction_row(cfg, e, {k: v[i] for k, v in answers.items()})
                row.update(extra[i] if extra else {})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            for k, v in answers.items():
                columns.setdefault(k, []).extend(v)
            done += len(part)
            bar.update(len(part))
    os.replace(partial, output)
    logger.info("%d predictions written to %s", len(examples), output)
    for key, preds in columns.items():
        report_empty(preds, cfg)
        scored = [(p, e.target) for p, e in zip(preds, examples) if e.target is not None]
        if scored and cfg.model_type == "llm":
            m = text_metrics([p for p, _ in scored], [t for _, t in scored])
            exact = round(m["exact_match"] * len(scored))
            label = "" if key == "prediction" else f"{key}: "
            logger.info("%s%d/%d exact (exact_match %.3f, rouge_l %.3f, bleu %.3f) against the input's targets",
                        label, exact, len(scored), m["exact_match"], m["rouge_l"], m["bleu"])
    return columns


def report_empty(preds: list[str], cfg: Config) -> int:
    """Warn when answers came back empty (a base model often stops at once on an unfamiliar prompt)."""
    empty = sum(not p.strip() for p in preds)
    if empty:
        who = "the base model (--use_original_model)" if cfg.use_original_model else "the fine-tuned model"
        logger.warning("%d of %d answers from %s are empty: it ended its turn at once. Check the prompt format "
                       "(system_prompt, chat template) or raise max_new_tokens", empty, len(preds), who)
    return empty


# ----------------------------------------------------------------------------------------------------
# REPL
def _read_line(stream) -> str | None:
    """One line from stdin as text; None at EOF. Undecodable bytes raise UnicodeDecodeError."""
    raw = stream.readline()
    if not raw:
        return None
    return raw.decode("utf-8").rstrip("\r\n") if isinstance(raw, bytes) else raw.rstrip("\r\n")


def line_example(cfg: Config, line: str) -> Example | None:
    """A REPL line as an example: an image path (VLM) or a question (LLM); None after telling what is wrong."""
    if cfg.model_type == "vlm":
        path = Path(line.strip().strip("'\"")).expanduser()
        if not path.is_file():
            print(f"[image not found: {path}]", flush=True)
            return None
        reason = check_image(path)
        if reason:
            print(f"[cannot read image {path}: {reason}]", flush=True)
            return None
        return Example(cfg.instruction or "", None, image=str(path))
    if len(line) > cfg.max_input_chars:
        print(f"[input is {len(line)} characters; truncated to max_input_chars={cfg.max_input_chars}]", flush=True)
        line = line[:cfg.max_input_chars]
    return Example(line, None)


def show_answer(cfg: Config, raw: str) -> str:
    """VLM answers are shown as indented JSON when they parse."""
    parsed = parse_json(raw) if cfg.model_type == "vlm" else None
    return json.dumps(parsed, ensure_ascii=False, indent=2) if parsed is not None else raw


def repl(cfg: Config, label: str, answer, stream=None) -> int:
    """Read lines until exit/quit/EOF; answer(line) prints the answer. A failed answer does not end the session."""
    stream = stream if stream is not None else sys.stdin.buffer
    what = "an image path" if cfg.model_type == "vlm" else "a question"
    print(f"Ready ({label}). Type {what}; exit, quit or Ctrl-D to leave.", flush=True)
    while True:
        print("> ", end="", flush=True)
        try:
            line = _read_line(stream)
        except UnicodeDecodeError:
            print("[that line is not valid UTF-8 text; try again]", flush=True)
            continue
        except KeyboardInterrupt:
            print()
            return 0
        if line is None:
            print()
            return 0
        if not line.strip():
            continue
        if line.strip().lower() in EXIT_WORDS:
            return 0
        try:
            answer(line)
        except KeyboardInterrupt:
            print("\n[generation interrupted]", flush=True)
        except Exception as e:  # noqa: BLE001 - the session outlives one failed answer
            logger.debug("generation failed", exc_info=True)
            print(f"[could not answer: {type(e).__name__}: {e}]", flush=True)
