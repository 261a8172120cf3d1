"""Data: reading and validating the files, VLM label maps and the stratified split, chat messages,
tokenisation with answer-only labels, and the padding collator.

Used by:
    python main.py --task train      load_examples -> encode_all / EncodedDataset -> Collator
    python main.py --task evaluate   the same examples (VLM: the saved split.json) and Collator
    python main.py --task inference  to_messages + prompt_text for every question or image

One record type serves both modalities: Example(prompt, target, image, source). LLM and VLM differ in the
messages (an image part) and in who tokenises the prompt (tokenizer vs processor), nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config, UserError
from outputs import atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
IGNORE_INDEX = -100


@dataclass
class Example:
    prompt: str  # the question (LLM) or the optional instruction (VLM)
    target: str  # the answer text (VLM: the target JSON)
    image: str | None = None
    source: str = ""  # where it came from, for error messages: file[index] or the image path


# ----------------------------------------------------------------------------------------------------
# LLM files
def read_text(path: Path, what: str) -> str:
    """A user's text file as str (UTF-8, with or without a byte-order mark), or a UserError saying why not."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file")
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_json(path: Path, what: str):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def load_qa_file(path: Path) -> list[Example]:
    """A JSON array of {"text": ..., "target": ...} objects -> examples, every entry checked."""
    data = read_json(path, "data file")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of {{\"text\": ..., \"target\": ...}} objects, "
                        f"got a JSON {type(data).__name__}")
    if not data:
        raise UserError(f"{path}: the array is empty; add at least one {{\"text\", \"target\"}} entry")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise UserError(f"{path}: entry {i} is a {type(item).__name__}, expected an object with text and target")
        for key in ("text", "target"):
            value = item.get(key)
            if value is None:
                raise UserError(f"{path}: entry {i} has no \"{key}\" (keys: {', '.join(item) or 'none'})")
            if not isinstance(value, str):
                raise UserError(f"{path}: entry {i}: \"{key}\" must be a string, got {type(value).__name__}")
            if not value.strip():
                raise UserError(f"{path}: entry {i}: \"{key}\" is empty")
        out.append(Example(prompt=item["text"], target=item["target"], source=f"{path}[{i}]"))
    return out


def load_hub_dataset(cfg: Config) -> dict[str, list[Example]]:
    try:
        from datasets import load_dataset

        ds = load_dataset(cfg.dataset_name, cfg.dataset_config_name)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's dataset name or network
        raise UserError(f"could not load dataset {cfg.dataset_name!r}: {str(e)[:300]}. Offline, use local files "
                        "(dataset_name: null, data_dir with train.json and validation.json)") from None
    val_name = next((s for s in ("validation", "valid", "test") if s in ds), None)
    if "train" not in ds or val_name is None:
        raise UserError(f"dataset {cfg.dataset_name!r} needs a train and a validation/test split; has {list(ds)}")
    out = {}
    for split, name in (("train", "train"), ("validation", val_name)):
        missing = {"text", "target"} - set(ds[name].column_names)
        if missing:
            raise UserError(f"dataset {cfg.dataset_name!r} split {name} lacks columns {sorted(missing)}")
        out[split] = [Example(str(r["text"]), str(r["target"]), source=f"{cfg.dataset_name}[{name}][{i}]")
                      for i, r in enumerate(ds[name])]
    return out


# ----------------------------------------------------------------------------------------------------
# VLM files
def load_label_map(path: Path) -> dict:
    lm = read_json(path, "label map")
    if not isinstance(lm, dict):
        raise UserError(f"{path}: expected a JSON object with \"positions\"")
    kind = lm.get("mapping_type", "positional")
    if kind != "positional":
        raise UserError(f"{path}: mapping_type {kind!r} is not supported; use \"positional\"")
    positions = lm.get("positions")
    if not isinstance(positions, list) or not positions:
        raise UserError(f"{path}: \"positions\" must be a non-empty list of {{\"field\", \"map\"}} objects")
    for i, pos in enumerate(positions):
        if not isinstance(pos, dict) or not isinstance(pos.get("field"), str) or not pos.get("field"):
            raise UserError(f"{path}: positions[{i}] needs a \"field\" name (a string)")
        if not isinstance(pos.get("map"), dict) or not pos["map"]:
            raise UserError(f"{path}: positions[{i}] ({pos['field']}) needs a non-empty \"map\" object")
        bad = [k for k in pos["map"] if len(k) != 1]
        if bad:
            raise UserError(f"{path}: positions[{i}].map keys must be single characters, got {bad}")
    if not isinstance(lm.get("defaults", {}), dict):
        raise UserError(f"{path}: \"defaults\" must be an object")
    return lm


def label_code(image: Path) -> str:
    """The label code is the file-name prefix before the first underscore (`130_x.jpg` -> `130`)."""
    return image.stem.split("_", 1)[0]


def decode_code(code: str, label_map: dict) -> dict:
    """`130` -> {status: ..., sub_type: ..., is_night_mode: ...}; ValueError says what does not fit."""
    positions = label_map["positions"]
    if len(code) != len(positions):
        raise ValueError(f"code {code!r} has {len(code)} characters, the label map has {len(positions)} positions")
    out = {}
    for ch, pos in zip(code, positions):
        if ch not in pos["map"]:
            raise ValueError(f"character {ch!r} is not in the map of {pos['field']!r} ({', '.join(pos['map'])})")
        out[pos["field"]] = pos["map"][ch]
    return out


def target_json(code: str, label_map: dict) -> str:
    fields = decode_code(code, label_map)
    fields.update({k: v for k, v in label_map.get("defaults", {}).items() if k not in fields})
    return json.dumps(fields, ensure_ascii=False)


def load_prompt(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"prompt file {path} not found; write the system prompt there (plain text, or JSON "
                        "with \"system_prompt\"), or set --prompt_file")
    text = read_text(path, "prompt file").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:  # meant as JSON: using it as plain text would train on the typo
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. Fix it, or write "
                            "the prompt as plain text that does not start with {") from None
        if not isinstance(data, dict) or not isinstance(data.get("system_prompt"), str):
            raise UserError(f"{path}: JSON prompt files need a \"system_prompt\" string")
        return data["system_prompt"]
    return text


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found; put the images there or set --image_dir")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def check_image(path: Path) -> str | None:
    """None if the image decodes, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"


def vlm_examples(cfg: Config, files: list[Path], label_map: dict) -> list[Example]:
    bad_code, bad_image, out = [], [], []
    for f in files:
        try:
            target = target_json(label_code(f), label_map)
        except ValueError as e:
            bad_code.append(f"{f.name}: {e}")
            continue
        reason = check_image(f)
        if reason:
            bad_image.append(f"{f.name}: {reason}")
            continue
        out.append(Example(prompt=cfg.instruction or "", target=target, image=str(f), source=str(f)))
    groups = [(p, what) for p, what in ((bad_code, f"label codes that do not fit {cfg.label_map_file}"),
                                        (bad_image, "unreadable images")) if p]
    if groups and not cfg.skip_invalid_images:  # every kind of problem in one message
        parts = []
        for problems, what in groups:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            parts.append(f"{len(problems)} {what}:\n  - " + "\n  - ".join(problems[:20]) + more)
        raise UserError("\n".join(parts) + "\nRename/fix them, or set skip_invalid_images: true to skip them")
    for problems, what in groups:
        logger.warning("skipping %d %s (first: %s)", len(problems), what, problems[0])
    if not out:
        raise UserError(f"no usable images in {cfg.image_dir}")
    return out


def stratified_split(files: list[str], codes: list[str], fraction: float, seed: int):
    """Per-code split: every code with >= 2 images puts at least one in validation.

    sklearn's stratified train_test_split cannot promise that once codes outnumber the validation size,
    and small inspection data sets are exactly where every rare code must be validated.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for f, c in zip(files, codes):
        groups[c].append(f)
    rng = random.Random(seed)
    train, val, too_few = [], [], []
    for code in sorted(groups):
        members = sorted(groups[code])
        if len(members) < 2:
            too_few.append(code)
            train += members
            continue
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(len(members) * fraction)))
        val += members[:n_val]
        train += members[n_val:]
    if too_few:
        logger.warning("label codes with a single image go to training only (cannot be validated): %s",
                       ", ".join(too_few))
    return sorted(train), sorted(val)


def vlm_split(cfg: Config, write: bool) -> dict[str, list[Example]]:
    load_prompt(Path(cfg.prompt_file))  # a missing prompt file is reported before any model loads
    label_map = load_label_map(Path(cfg.label_map_file))
    examples = vlm_examples(cfg, list_images(Path(cfg.image_dir)), label_map)
    by_file = {e.image: e for e in examples}
    split_file = cfg.run_dir / "split.json"
    saved = None
    if split_file.is_file():
        saved = read_json(split_file, "split file")
        known = set(saved.get("train", [])) | set(saved.get("validation", []))
        if set(by_file) - known:  # new images arrived: the old split no longer covers the data
            if write:
                logger.info("%d images are not in %s; making a new split", len(set(by_file) - known), split_file)
                saved = None
            else:
                logger.warning("%s does not list %d of the images; they are ignored here",
                               split_file, len(set(by_file) - known))
    if saved is None:
        train, val = stratified_split(list(by_file), [label_code(Path(f)) for f in by_file],
                                      cfg.validation_split, cfg.seed)
        saved = {"train": train, "validation": val}
        if write:
            split_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(split_file, json.dumps(saved, ensure_ascii=False, indent=1))
            logger.info("split %d images: %d train, %d validation -> %s", len(by_file), len(train), len(val),
                        split_file)
        else:
            logger.warning("no %s (train first); using the same seeded split", split_file)
    return {k: [by_file[f] for f in saved[k] if f in by_file] for k in ("train", "validation")}


def load_examples(cfg: Config, for_training: bool) -> dict[str, list[Example]]:
    """{'train': [...], 'validation': [...]} for the configured modality."""
    if cfg.model_type == "vlm":
        return vlm_split(cfg, write=for_training)
    if cfg.dataset_name:
        return load_hub_dataset(cfg)
    root = Path(cfg.data_dir)
    return {"train": load_qa_file(root / "train.json"), "validation": load_qa_file(root / "validation.json")}


def system_prompt(cfg: Config) -> str | None:
    return load_prompt(Path(cfg.prompt_file)) if cfg.model_type == "vlm" else cfg.system_prompt


# ----------------------------------------------------------------------------------------------------
# messages and tokenisation
def to_messages(ex: Example, system: str | None) -> list[dict]:
    """Chat messages for the prompt side of an example (no assistant turn)."""
    msgs = []
    if ex.image is not None:
        if system:
            msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
        content = [{"type": "image", "image": ex.image}]
        if ex.prompt:
            content.append({"type": "text", "text": ex.prompt})
        msgs.append({"role": "user", "content": content})
    else:
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": ex.prompt})
    return msgs


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def has_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None) or _tokenizer(processor).chat_template)


def _apply_template(processor, messages: list[dict], **kwargs) -> str:
    from jinja2 import TemplateError

    try:
        return processor.apply_chat_template(messages, tokenize=False, enable_thinking=False, **kwargs)
    except TemplateError as e:  # e.g. templates that allow no system turn
        raise UserError(f"the model's chat template refused the messages: {e}. If it allows no system message, "
                        "unset system_prompt (LLM) or use a plain-text prompt file") from None


def prompt_text(processor, ex: Example, system: str | None) -> str:
    """The text the model sees before its answer (chat template with thinking disabled, or plain)."""
    if has_chat_template(processor):
        return _apply_template(processor, to_messages(ex, system), add_generation_prompt=True)
    return (f"{system}\n" if system else "") + f"{ex.prompt}\n"


def completion_text(processor, ex: Example, system: str | None, prompt: str) -> str:
    """The answer as the template writes it, end-of-turn included, so the model learns to stop."""
    tok = _tokenizer(processor)
    if has_chat_template(processor):
        msgs = to_messages(ex, system) + [{"role": "assistant", "content": ex.target}]
        full = _apply_template(processor, msgs)
        if full.startswith(prompt):
            return full[len(prompt):].rstrip("\n")
        return ex.target + (tok.eos_token or "")
    return ex.target + (tok.eos_token or "")


_PROBE = Example(prompt="ping", target="pong")


def template_mismatch(processor) -> bool:
    """True when the rendered conversation does not start with the rendered prompt (no answer-only masking)."""
    if not has_chat_template(processor):
        return False
    prompt = prompt_text(processor, _PROBE, None)
    full = _apply_template(processor, to_messages(_PROBE, None) + [{"role": "assistant", "content": _PROBE.target}])
    return not full.startswith(prompt)


def end_of_turn_ids(processor) -> list[int]:
    """The special token(s) the chat template closes an answer with (ChatML: <|im_end|>), else the EOS.

    Generation must stop there whatever generation_config.json says: that is the token training taught.
    """
    tok = _tokenizer(processor)
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if has_chat_template(processor) and not template_mismatch(processor):
        prompt = prompt_text(processor, _PROBE, None)
        after = completion_text(processor, _PROBE, None, prompt).split(_PROBE.target, 1)[-1]
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        first = next((i for i in tok(after, add_special_tokens=False)["input_ids"] if i in special), None)
        if first is not None and first not in ids:
            ids.append(first)
    return ids


def load_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class Encoder:
    """Example -> {input_ids, labels[, pixel_values, image_grid_thw, ...]}; labels are -100 on the prompt."""

    def __init__(self, processor, cfg: Config):
        self.processor, self.tok, self.cfg = processor, _tokenizer(processor), cfg
        self.system = system_prompt(cfg)
        self.stats = Counter()
        if template_mismatch(processor):
            logger.warning("the chat template of %s renders a conversation that does not start with its rendered "
                           "prompt, so the answer cannot be told apart from the prompt; training on the answer "
                           "followed by the EOS token instead", cfg.model_name_or_path)

    def __call__(self, ex: Example) -> dict | None:
        prompt = prompt_text(self.processor, ex, self.system)
        completion = completion_text(self.processor, ex, self.system, prompt)
        extra = {}
        if ex.image is not None:
            out = self.processor(text=[prompt], images=[load_image(ex.image)], return_tensors="pt")
            prompt_ids = out["input_ids"][0].tolist()
            extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        else:
            # A chat template writes its own BOS; plain text gets the tokenizer's (OPT and Llama expect one).
            prompt_ids = self.tok(prompt, add_special_tokens=not has_chat_template(self.processor))["input_ids"]
        answer_ids = self.tok(completion, add_special_tokens=False)["input_ids"]
        room = self.cfg.max_length - len(prompt_ids)
        if ex.image is not None and room < len(answer_ids):  # a cut JSON answer would teach broken JSON
            raise UserError(f"{ex.source}: the prompt needs {len(prompt_ids)} tokens (image tokens included, "
                            f"never truncated) and the answer {len(answer_ids)}, but max_length is "
                            f"{self.cfg.max_length}; raise max_length or lower image_max_pixels")
        if room < 1:
            self.stats["dropped"] += 1
            return None
        if len(answer_ids) > room:
            self.stats["cut"] += 1
            answer_ids = answer_ids[:room]
        ids = prompt_ids + answer_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat(
                [extra["mm_token_type_ids"][0], torch.zeros(len(answer_ids), dtype=torch.long)])
        return {"input_ids": ids, "labels": labels, **extra}

    def report(self, total: int, what: str) -> None:
        if self.stats["cut"] or self.stats["dropped"]:
            logger.warning("%s: %d of %d samples are longer than max_length=%d: %d answers cut at the limit, "
                           "%d dropped (the prompt alone is too long); raise max_length to keep them whole",
                           what, self.stats["cut"] + self.stats["dropped"], total, self.cfg.max_length,
                           self.stats["cut"], self.stats["dropped"])


def fingerprint(processor, examples: list[Example], cfg: Config) -> str:
    """Changes when the data, the tokenizer, the template or the length limit change."""
    h = hashlib.sha256()
    tok = _tokenizer(processor)
    h.update(json.dumps([tok.name_or_path, len(tok), tok.chat_template, cfg.max_length, cfg.system_prompt,
                         getattr(tok, "eos_token", None)], ensure_ascii=False).encode())
    try:
        h.update(tok.backend_tokenizer.to_str().encode())
    except AttributeError:
        h.update(str(sorted(tok.get_vocab().items())[:5000]).encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.target, e.image], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def encode_all(encoder: Encoder, examples: list[Example], cache_dir: Path | None, what: str) -> list[dict]:
    """Tokenise text-only examples once, cached on disk under a fingerprint of data and tokenizer."""
    key = fingerprint(encoder.processor, examples, encoder.cfg)
    path = cache_dir / f"{what}-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        logger.info("%s: using cached tokenisation %s", what, path.name)
        return json.loads(path.read_text(encoding="utf-8"))
    encoded = [x for x in (encoder(e) for e in examples) if x is not None]
    encoder.report(len(examples), what)
    encoder.stats.clear()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{what}-*.json"):
            old.unlink()
        atomic_write_text(path, json.dumps(encoded))
    return encoded


class LazyImageDataset(torch.utils.data.Dataset):
    """VLM samples are encoded when drawn: pixel values are too large to keep for a whole data set."""

    def __init__(self, encoder: Encoder, examples: list[Example], what: str = "images"):
        self.encoder, self.examples = encoder, examples
        counts = [image_tokens(encoder.processor, e.image) for e in examples]
        self.lengths = [n + len(encoder.tok(e.target + e.prompt, add_special_tokens=False)["input_ids"])
                        for n, e in zip(counts, examples)]
        logger.info("%s: %d images, %d to %d image tokens each (image_min_pixels=%d, image_max_pixels=%d)",
                    what, len(examples), min(counts), max(counts), encoder.cfg.image_min_pixels,
                    encoder.cfg.image_max_pixels)
        # The longest sample decides whether max_length holds prompt and answer: fail now, not mid-epoch.
        encoder(examples[self.lengths.index(max(self.lengths))])

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.encoder(self.examples[i])


def image_tokens(processor, path: str) -> int:
    """Image tokens an image costs after resizing, from its header alone (no decoding)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    try:
        return int(processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0])
    except (AttributeError, KeyError, TypeError):  # processors without the helper: Qwen's 32x32 per token
        return max(1, (h * w) // (32 * 32))


def build_dataset(encoder: Encoder, examples: list[Example], cache_dir: Path | None, what: str):
    """A list of encoded samples (text) or a LazyImageDataset (images); both expose per-sample lengths."""
    if examples and examples[0].image is not None:
        return LazyImageDataset(encoder, examples, what)
    return EncodedList(encode_all(encoder, examples, cache_dir, what))


class EncodedList(list):
    @property
    def lengths(self):
        return [len(x["input_ids"]) for x in self]


class Collator:
    """Pads a batch: input_ids with the pad id, labels with -100; image tensors are concatenated."""

    def __init__(self, processor, pad_to_multiple_of: int | None = None):
        tok = _tokenizer(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        batch = [b for b in batch if b is not None]
        longest = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        has_tt = "mm_token_type_ids" in batch[0]
        if has_tt:
            out["mm_token_type_ids"] = []
        for b in batch:
            n = len(b["input_ids"])
            pad = longest - n
            out["input_ids"].append(list(b["input_ids"]) + [self.pad_id] * pad)
            out["labels"].append(list(b["labels"]) + [IGNORE_INDEX] * pad)
            out["attention_mask"].append([1] * n + [0] * pad)
            if has_tt:
                out["mm_token_type_ids"].append(torch.nn.functional.pad(b["mm_token_type_ids"], (0, pad)))
        result = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items() if k != "mm_token_type_ids"}
        if has_tt:
            result["mm_token_type_ids"] = torch.stack(out["mm_token_type_ids"])
        for key in ("pixel_values", "image_grid_thw"):
            if key in batch[0]:
                result[key] = torch.cat([b[key] for b in batch], dim=0)
        return result


def strip_thinking(text: str) -> str:
    """Drop a `<think>...</think>` block (Qwen3) from a generated answer."""
    return re.sub(r"<think>.*?</think>\s*", "", text, flags=re.S).strip()
