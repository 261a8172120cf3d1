"""Reading and validating the user's data: LLM question/answer files, VLM images named by label code, the
label map, the system prompt, and the VLM train/validation split (split.json).

Used by:
    python main.py --task train      load_examples(cfg, for_training=True)  (writes or grows split.json)
    python main.py --task evaluate   load_examples(cfg, for_training=False) (reads split.json)
    python main.py --task inference  system_prompt, list_images, check_image, load_image

Every problem names the file and the entry; data errors surface before any model loads.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from config import Config, UserError
from outputs import atomic_write_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_ASPECT_RATIO = 200  # Qwen-VL processors refuse images more elongated than this


@dataclass
class Example:
    prompt: str  # the question (LLM) or the optional instruction (VLM); a conversation's last user turn
    target: str  # the answer text (VLM: the target JSON); a conversation's last assistant turn
    image: str | None = None
    source: str = ""  # where it came from, for error messages: file[index] or the image path
    system: str | None = None  # this sample's own system message (Alpaca "system", a conversation's system turn)
    messages: list[dict] | None = None  # a multi-turn conversation, whole: every assistant turn is trained


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
    except RecursionError:
        raise UserError(f"{path}: the JSON is nested too deeply to read; {what}s are flat lists of objects") from None


FORMATS = {  # name -> (keys that identify it, how the README shows it)
    "text/target": ({"text", "target"}, '{"text": ..., "target": ...}'),
    "alpaca": ({"instruction", "output"}, '{"instruction": ..., "input": ..., "output": ...}'),
    "messages": ({"messages"}, '{"messages": [{"role": "user", "content": ...}, ...]}'),
    "sharegpt": ({"conversations"}, '{"conversations": [{"from": "human", "value": ...}, ...]}'),
}
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "model": "assistant", "bot": "assistant"}


def _records(path: Path) -> list:
    """A JSON array, or JSON Lines (one object per line)."""
    if path.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(read_text(path, "data file").split("\n"), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}: line {n} is not valid JSON (column {e.colno}: {e.msg})") from None
                except RecursionError:
                    raise UserError(f"{path}: line {n} is nested too deeply to read") from None
        return rows
    data = read_json(path, "data file")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects (or a .jsonl file), got a JSON "
                        f"{type(data).__name__}")
    return data


def _format_of(item: dict) -> str | None:
    return next((name for name, (keys, _) in FORMATS.items() if keys <= set(item)), None)


def _text(path: Path, i: int, item: dict, key: str, required: bool = True) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise UserError(f"{path}: entry {i} has no \"{key}\" (keys: {', '.join(item) or 'none'})")
    if not isinstance(value, str):
        raise UserError(f"{path}: entry {i}: \"{key}\" must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{path}: entry {i}: \"{key}\" is empty")
    return value


def _conversation(path: Path, i: int, turns, role_key: str, content_key: str) -> list[dict]:
    where = f"{path}: entry {i}"
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: the conversation must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}, turn {j}: expected an object with {role_key!r} and {content_key!r}")
        role = _ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise UserError(f"{where}, turn {j}: {role_key} {turn.get(role_key)!r} is not one of "
                            f"{', '.join(sorted(_ROLES))}")
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}, turn {j}: {content_key!r} must be non-empty text")
        if role == "system" and j != 0:
            raise UserError(f"{where}, turn {j}: a system turn may only come first")
        if out and out[-1]["role"] == role:  # the chat template would drop or garble one of them
            raise UserError(f"{where}, turn {j}: two {role} turns in a row; merge them into one turn")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant" or not any(t["role"] == "user" for t in out):
        raise UserError(f"{where}: a training conversation needs a user turn and must end with an assistant turn")
    return out


def _alpaca_history(path: Path, i: int, history) -> list[dict]:
    """Alpaca's (LLaMA-Factory's) "history": earlier [instruction, response] pairs -> conversation turns."""
    if history is None:
        return []
    if not isinstance(history, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)
            for pair in history):
        raise UserError(f"{path}: entry {i}: \"history\" must be a list of [instruction, response] pairs of text")
    return [turn for q, a in history for turn in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def _example(path: Path, i: int, item: dict, kind: str) -> Example:
    source = f"{path}[{i}]"
    system = _text(path, i, item, "system", required=False) or None  # LLaMA-Factory's top-level system
    if kind == "text/target":
        return Example(_text(path, i, item, "text"), _text(path, i, item, "target"), source=source, system=system)
    if kind == "alpaca":
        prompt = _text(path, i, item, "instruction")
        extra = _text(path, i, item, "input", required=False)
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        output = _text(path, i, item, "output")
        history = _alpaca_history(path, i, item.get("history"))
        if not history:
            return Example(prompt, output, source=source, system=system)
        turns = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return Example(prompt, output, source=source, system=system, messages=turns)
    if kind == "messages":
        turns = _conversation(path, i, item["messages"], "role", "content")
    else:
        turns = _conversation(path, i, item["conversations"], "from", "value")
    if system is not None:
        if turns[0]["role"] == "system":
            raise UserError(f"{source}: has both a top-level \"system\" and a system turn; keep one")
        turns = [{"role": "system", "content": system}, *turns]
    system = turns[0]["content"] if turns[0]["role"] == "system" else None
    last_user = next(t["content"] for t in reversed(turns) if t["role"] == "user")
    multi = sum(t["role"] == "assistant" for t in turns) > 1 or turns[-2]["role"] != "user"
    return Example(last_user, turns[-1]["content"], source=source, system=system, messages=turns if multi else None)


def load_data_file(path: Path) -> list[Example]:
    """A training or validation file in any supported format (one format per file) -> examples, every entry
    checked: {text, target}, Alpaca, OpenAI-style messages, ShareGPT conversations; JSON array or JSONL."""
    data = _records(path)
    if not data:
        raise UserError(f"{path}: no entries; add at least one (README: Data)")
    kinds = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise UserError(f"{path}: entry {i} is a {type(item).__name__}, expected an object")
        kind = _format_of(item)
        if kind is None:
            near = max(FORMATS, key=lambda name: len(FORMATS[name][0] & set(item)))
            if FORMATS[near][0] & set(item):
                missing = sorted(FORMATS[near][0] - set(item))[0]
                raise UserError(f"{path}: entry {i} has no \"{missing}\" (keys: {', '.join(item)}; a {near} "
                                f"entry looks like {FORMATS[near][1]})")
            shown = "; ".join(f"{name} {example}" for name, (_, example) in FORMATS.items())
            raise UserError(f"{path}: entry {i} matches no supported format (keys: {', '.join(item) or 'none'}). "
                            f"Use one of: {shown}")
        kinds.append(kind)
    if len(set(kinds)) > 1:
        first = kinds[0]
        other = next(i for i, k in enumerate(kinds) if k != first)
        raise UserError(f"{path}: mixes formats: entry 0 is {first}, entry {other} is {kinds[other]}; "
                        "use one format per file")
    return [_example(path, i, item, kinds[0]) for i, item in enumerate(data)]


def data_file(root: Path, split: str) -> Path:
    """data_dir/<split>.json, or <split>.jsonl when only that exists."""
    path = root / f"{split}.json"
    jsonl = root / f"{split}.jsonl"
    return jsonl if not path.exists() and jsonl.exists() else path


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
        if any(p.get("field") == pos["field"] for p in positions[:i] if isinstance(p, dict)):
            raise UserError(f"{path}: positions[{i}] repeats the field name {pos['field']!r}; each position needs "
                            "its own field (one would silently overwrite the other)")
        bad = [k for k in pos["map"] if len(k) != 1]
        if bad:
            raise UserError(f"{path}: positions[{i}].map keys must be single characters, got {bad}")
        # A key is a character of a file name (the label code before the first underscore): these cannot be.
        bad = [k for k in pos["map"] if k in "_/\\\0" or not k.isprintable()]
        if bad:
            raise UserError(f"{path}: positions[{i}].map keys {bad} cannot stand in a file name's label code; use "
                            "letters or digits")
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


def encode_fields(fields: dict, label_map: dict) -> str:
    """The inverse of decode_code: {status: ..., sub_type: ...} -> `130`, the file-name prefix training reads.
    Values compare as JSON (true is not 1); ValueError names a missing field or a value the map lacks."""
    code = []
    for pos in label_map["positions"]:
        name = pos["field"]
        if name not in fields:
            raise ValueError(f"the field {name!r} is missing")
        wanted = json.dumps(fields[name], ensure_ascii=False)
        ch = next((k for k, v in pos["map"].items() if json.dumps(v, ensure_ascii=False) == wanted), None)
        if ch is None:
            allowed = ", ".join(json.dumps(v, ensure_ascii=False) for v in pos["map"].values())
            raise ValueError(f"{name!r} cannot be {wanted}; the label map allows {allowed}")
        code.append(ch)
    return "".join(code)


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
    """The images directly in `folder`, sorted; what is skipped (sub-folders, other file types, broken links)
    is logged with counts."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} not found; put the images there or set --image_dir")
    files, skipped = [], defaultdict(list)
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists():
            skipped["broken links"].append(p.name)
        elif p.is_dir():
            skipped["sub-folders (not searched)"].append(p.name)
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            if not p.name.startswith("."):
                skipped["files of other types"].append(p.name)
        else:
            files.append(p)
    for why, names in skipped.items():
        logger.warning("%s: skipping %d %s: %s", folder, len(names), why,
                       ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    if not files:
        raise UserError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def check_image(path: Path) -> str | None:
    """None if the image decodes completely and the processors accept its shape, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # a full decode: verify() passes truncated files that fail later in training
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return f"{w}x{h} pixels: more elongated than {MAX_ASPECT_RATIO}:1, which the image processors refuse"
    return None


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


def grow_split(saved: dict, new_files: list[str], fraction: float, seed: int) -> dict:
    """Add new images to an existing split without moving any image already assigned: per label code, each new
    image goes to validation while that code's validation share is below `fraction` (at least one once the
    code has two images), else to training."""
    groups: dict[str, list[str]] = defaultdict(list)
    for f in new_files:
        groups[label_code(Path(f))].append(f)
    train, val = list(saved["train"]), list(saved["validation"])
    rng = random.Random(seed)
    for code in sorted(groups):
        members = sorted(groups[code])
        rng.shuffle(members)
        n_train = sum(label_code(Path(f)) == code for f in train)
        n_val = sum(label_code(Path(f)) == code for f in val)
        for f in members:
            total = n_train + n_val + 1
            if total >= 2 and n_val < max(1, round(total * fraction)):
                val.append(f)
                n_val += 1
            else:
                train.append(f)
                n_train += 1
    return {**saved, "train": sorted(train), "validation": sorted(val)}


def read_split(path: Path) -> dict:
    data = read_json(path, "split file")
    ok = isinstance(data, dict) and all(isinstance(data.get(k), list) and all(isinstance(f, str) for f in data[k])
                                        for k in ("train", "validation"))
    if not ok:
        raise UserError(f"{path}: expected {{\"train\": [file, ...], \"validation\": [file, ...]}}; delete it to "
                        "make a new split (evaluate results of earlier runs then no longer compare)")
    return data


def vlm_split(cfg: Config, write: bool) -> dict[str, list[Example]]:
    """The train/validation split, owned by output_dir/<model>/split.json: made once (stratified, seeded), grown
    when images are added (no image ever changes side), kept when seed or validation_split change (warning)
    unless `resplit` is set."""
    load_prompt(Path(cfg.prompt_file))  # a missing prompt file is reported before any model loads
    label_map = load_label_map(Path(cfg.label_map_file))
    examples = vlm_examples(cfg, list_images(Path(cfg.image_dir)), label_map)
    by_file = {e.image: e for e in examples}
    split_file = cfg.run_dir / "split.json"
    saved = read_split(split_file) if split_file.is_file() and not (cfg.resplit and write) else None
    if cfg.resplit and write and split_file.is_file():
        logger.warning("resplit: making a new split.json; images may change sides, so earlier evaluations and "
                       "checkpoints no longer compare")
    if saved is not None:
        for key in ("seed", "validation_split"):
            if key in saved and saved[key] != getattr(cfg, key):
                logger.warning("`%s` = %r, but %s was made with %r; keeping that split (pass --resplit true to "
                               "make a new one)", key, getattr(cfg, key), split_file, saved[key])
        known = set(saved["train"]) | set(saved["validation"])
        new = sorted(set(by_file) - known)
        if new and write:
            saved = grow_split(saved, new, saved.get("validation_split", cfg.validation_split),
                               saved.get("seed", cfg.seed))
            atomic_write_text(split_file, json.dumps(saved, ensure_ascii=False, indent=1))
            logger.info("%d new images added to %s without moving any assigned image: now %d train, %d validation",
                        len(new), split_file, len(saved["train"]), len(saved["validation"]))
        elif new:
            logger.warning("%s does not list %d of the images (added after training); they are ignored here",
                           split_file, len(new))
        gone = [f for f in saved["validation"] if f not in by_file]
        if gone:
            logger.warning("%d validation images listed in %s are missing or unusable now, so evaluation covers %d "
                           "images: %s", len(gone), split_file, len(saved["validation"]) - len(gone),
                           ", ".join(Path(f).name for f in gone[:10]) + (" ..." if len(gone) > 10 else ""))
    else:
        train, val = stratified_split(list(by_file), [label_code(Path(f)) for f in by_file],
                                      cfg.validation_split, cfg.seed)
        saved = {"seed": cfg.seed, "validation_split": cfg.validation_split, "train": train, "validation": val}
        if write:
            split_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(split_file, json.dumps(saved, ensure_ascii=False, indent=1))
            logger.info("split %d images: %d train, %d validation -> %s", len(by_file), len(train), len(val),
                        split_file)
        else:
            logger.warning("no %s (train first); using the same seeded split", split_file)
    out = {k: [by_file[f] for f in saved[k] if f in by_file] for k in ("train", "validation")}
    if write and cfg.extra_image_dirs:
        out["train"] += extra_training_images(cfg, label_map, out["validation"])
    return out


def extra_training_images(cfg: Config, label_map: dict, validation: list[Example]) -> list[Example]:
    """The images of extra_image_dirs (corrections saved by the review queue), for training only: never in
    split.json, so the validation set, and every figure measured on it, stays what it was. A copy of a
    validation image (same bytes) is left out: training on it would inflate the validation figures."""
    import hashlib

    def digest(path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    held_out = {digest(e.image): e.image for e in validation}
    out = []
    for folder in map(Path, cfg.extra_image_dirs):
        if not folder.is_dir():
            raise UserError(f"`extra_image_dirs`: {folder} is not a folder; create it, or remove it from the list")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            logger.warning("`extra_image_dirs`: %s holds no images yet; training without it", folder)
            continue
        found = vlm_examples(cfg, list_images(folder), label_map)
        kept = []
        for e in found:
            twin = held_out.get(digest(e.image))
            if twin is not None:
                logger.warning("%s is a copy of the validation image %s: left out of training, so validation "
                               "stays held out", e.image, twin)
            else:
                kept.append(e)
        logger.info("%d corrected images from %s added to the training split (validation unchanged)", len(kept),
                    folder)
        out += kept
    return out


def stratified_subset(examples: list[Example], n: int, seed: int) -> list[Example]:
    """n examples with the label codes in proportion: codes take turns (each shuffled with `seed`), so a subset
    of a sorted image folder is not biased toward low codes."""
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        groups[label_code(Path(e.image)) if e.image else ""].append(e)
    rng = random.Random(seed)
    queues = []
    for code in sorted(groups):
        members = list(groups[code])
        rng.shuffle(members)
        queues.append(members)
    picked: list[Example] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def load_examples(cfg: Config, for_training: bool) -> dict[str, list[Example]]:
    """{'train': [...], 'validation': [...]} for the configured modality."""
    if cfg.model_type == "vlm":
        return vlm_split(cfg, write=for_training)
    if cfg.dataset_name:
        return load_hub_dataset(cfg)
    root = Path(cfg.data_dir)
    return {split: load_data_file(data_file(root, split)) for split in ("train", "validation")}


def system_prompt(cfg: Config) -> str | None:
    return load_prompt(Path(cfg.prompt_file)) if cfg.model_type == "vlm" else cfg.system_prompt


def load_image(path: str):
    """RGB for the processor. High-bit-depth images (16-bit PNG/TIFF, float) are scaled to 8 bits, not clipped
    (Pillow's plain convert would turn most of a 16-bit image white)."""
    from PIL import Image

    with Image.open(path) as im:
        return to_rgb(im)


def to_rgb(im):
    """An open PIL image decoded (once) into RGB, high bit depths scaled as load_image says."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and arr.max() <= 65535) else arr.max()
        arr = np.clip(arr / max(top, 1e-12) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return im.convert("RGB")
