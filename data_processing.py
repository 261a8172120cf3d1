"""Encoding data for the model: chat messages, templating, tokenisation with answer-only labels, online image
augmentation of VLM training images, the on-disk token cache, datasets, the padding collator, and image pixels
carried as bytes (vision_tower.py normalises them on the model's device). Reading and validating the files is
data_loading.py.

Used by:
    python main.py --task train      Encoder -> build_dataset (cached) -> Collator
    python main.py --task train --model_type vlm --augmentation hflip,color --augmentation_p 0.5
    python main.py --task evaluate   the same Encoder and Collator for the loss; prompt_text for generation
    python main.py --task inference  to_messages + prompt_text for every question or image

One record type serves both modalities: Example(prompt, target, image, source). LLM and VLM differ in the
messages (an image part) and in who tokenises the prompt (tokenizer vs processor), nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from array import array
from collections import Counter
from pathlib import Path

import torch

from config import Config, UserError
from data_loading import Example, load_image, system_prompt
from outputs import atomic_write_text

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------------
# messages and tokenisation
# name -> what it does and which labels it can falsify (the README repeats the warnings)
AUGMENTATIONS = {
    "hflip": "mirror left-right (wrong if a label depends on left/right)",
    "vflip": "mirror top-bottom (wrong if a label depends on up/down, e.g. a jet's direction)",
    "rotate": "rotate up to 10 degrees (wrong for orientation labels)",
    "crop": "zoom into a random crop of 80-100% and resize back (can cut a small defect out of the frame)",
    "color": "jitter brightness, contrast and saturation by 20% (wrong for day/night, colour or lighting labels)",
    "blur": "Gaussian blur, sigma 0.1-1.5 (wrong for focus or sharpness labels)",
}


def augmentation(cfg: Config):
    """A torchvision v2 transform (PIL in, PIL out) applying each chosen augmentation with probability
    `augmentation_p`, or None when none is chosen."""
    if not cfg.augmentation:
        return None
    if cfg.model_type != "vlm":
        raise UserError("`augmentation` transforms images; set augmentation: [] for model_type llm")
    unknown = [a for a in cfg.augmentation if a not in AUGMENTATIONS]
    if unknown:
        raise UserError(f"`augmentation` {unknown} unknown; choose from {', '.join(AUGMENTATIONS)}")
    from torchvision.transforms import v2

    p = cfg.augmentation_p
    parts = {
        "hflip": lambda: v2.RandomHorizontalFlip(p),
        "vflip": lambda: v2.RandomVerticalFlip(p),
        "rotate": lambda: v2.RandomApply([v2.RandomRotation(10)], p),
        "crop": lambda: v2.RandomApply([v2.RandomAffine(degrees=0, scale=(1.0, 1.25))], p),
        "color": lambda: v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)], p),
        "blur": lambda: v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p),
    }
    logger.info("augmenting training images online (p=%.2f each): %s", p,
                "; ".join(f"{a}: {AUGMENTATIONS[a]}" for a in cfg.augmentation))
    return v2.Compose([parts[a]() for a in cfg.augmentation])


def to_messages(ex: Example, system: str | None) -> list[dict]:
    """Chat messages for the prompt side of an example (no final assistant turn). The sample's own system
    message wins over the configured one; a conversation keeps its earlier turns."""
    system = ex.system if ex.system is not None else system
    if ex.messages:
        msgs = [dict(m) for m in ex.messages[:-1]]
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs
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
    turns = [m["content"] for m in to_messages(ex, system)] if ex.messages else \
        ([ex.system or system] if (ex.system or system) else []) + [ex.prompt]
    return "\n".join(turns) + "\n"


def conversation_text(processor, ex: Example, system: str | None) -> str:
    """Prompt and answer as the chat template writes the whole exchange (what follows the answer included)."""
    return _apply_template(processor, to_messages(ex, system) + [{"role": "assistant", "content": ex.target}])


def completion_text(processor, ex: Example, system: str | None, prompt: str) -> str:
    """The answer as the template writes it, end-of-turn included, so the model learns to stop."""
    tok = _tokenizer(processor)
    if has_chat_template(processor):
        full = conversation_text(processor, ex, system)
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


def _end_of_turn_text(processor) -> str:
    """What the template writes right after an answer's text (ChatML: `<|im_end|>`)."""
    if template_mismatch(processor):
        return ""
    prompt = prompt_text(processor, _PROBE, None)
    return completion_text(processor, _PROBE, None, prompt).split(_PROBE.target, 1)[-1]


def end_of_turn_ids(processor) -> list[int]:
    """The special token(s) the chat template closes an answer with (ChatML: <|im_end|>), else the EOS.

    Generation must stop there whatever generation_config.json says: that is the token training taught.
    """
    tok = _tokenizer(processor)
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if has_chat_template(processor) and not template_mismatch(processor):
        after = _end_of_turn_text(processor)
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        first = next((i for i in tok(after, add_special_tokens=False)["input_ids"] if i in special), None)
        if first is not None and first not in ids:
            ids.append(first)
    return ids


class Encoder:
    """Example -> {input_ids, labels[, pixel_values, image_grid_thw, ...]}; labels are -100 on the prompt."""

    def __init__(self, processor, cfg: Config, transform=None, raw_pixels: bool = False):
        self.processor, self.tok, self.cfg = processor, _tokenizer(processor), cfg
        self.transform = transform  # training images only: augmentation() above
        # uint8 pixel values, for a model that vision_tower.normalise_pixels_on_model() prepared
        self.image_kwargs = dict(RAW_PIXELS) if raw_pixels else {}
        self.system = system_prompt(cfg)
        self.stats = Counter()
        self.end_of_turn = _end_of_turn_text(processor) if has_chat_template(processor) else ""
        if template_mismatch(processor):
            logger.warning("the chat template of %s renders a conversation that does not start with its rendered "
                           "prompt, so the answer cannot be told apart from the prompt; training on the answer "
                           "followed by the EOS token instead", cfg.model_name_or_path)

    def __call__(self, ex: Example) -> dict | None:
        if ex.messages and has_chat_template(self.processor):
            encoded = self._conversation(ex)
            if encoded is not False:
                return encoded
        prompt = prompt_text(self.processor, ex, self.system)
        completion = completion_text(self.processor, ex, self.system, prompt)
        extra = {}
        if ex.image is not None:
            image = load_image(ex.image)
            if self.transform is not None:
                image = self.transform(image)
            out = self.processor(text=[prompt], images=[image], return_tensors="pt", **self.image_kwargs)
            if self.image_kwargs and out["pixel_values"].dtype != torch.uint8:  # a processor that resizes in float
                self.image_kwargs = {}
                out = self.processor(text=[prompt], images=[image], return_tensors="pt")
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
        for key, value in extra.items():
            # Per-token tensors (mm_token_type_ids, token_type_ids, ...) cover the prompt: extend them over the
            # answer with zeros (text). Everything else (pixel_values, image_grid_thw, image_sizes,
            # pixel_attention_mask, ...) is per image and passes through as the processor made it.
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, len(prompt_ids)):
                extra[key] = torch.cat([value[0], value.new_zeros(len(answer_ids))])
        return {"input_ids": ids, "labels": labels, **extra}

    def _conversation(self, ex: Example) -> dict | None | bool:
        """Every assistant turn of a conversation is trained (its text and the end-of-turn token after it), every
        other token masked. The conversation is rendered once, as the model will see it, and the turns are found
        in it by their text; False when that is not possible (then only the last turn is trained)."""
        msgs = to_messages(ex, self.system) + [{"role": "assistant", "content": ex.target}]
        full = _apply_template(self.processor, msgs)
        after = self.end_of_turn
        spans, cursor = [], 0
        for message in msgs:
            start = full.find(message["content"], cursor)
            if start < 0:
                return self._cannot_split()
            cursor = start + len(message["content"])
            if message["role"] == "assistant":
                if after and full.startswith(after, cursor):
                    cursor += len(after)
                spans.append((start, cursor))
        try:
            enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
            return self._cannot_split()
        ids = enc["input_ids"]
        labels = [t if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
                  for t, (a, b) in zip(ids, enc["offset_mapping"])]
        if len(ids) > self.cfg.max_length:
            ids, labels = ids[:self.cfg.max_length], labels[:self.cfg.max_length]
            if all(t == IGNORE_INDEX for t in labels[1:]):
                self.stats["dropped"] += 1
                return None
            self.stats["cut"] += 1
        return {"input_ids": ids, "labels": labels}

    def _cannot_split(self) -> bool:
        if not self.stats["whole_turns"]:
            logger.warning("the chat template of %s changes the turns' text, so multi-turn samples train on their "
                           "last assistant turn only", self.cfg.model_name_or_path)
        self.stats["whole_turns"] += 1
        return False

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
        h.update(json.dumps([e.prompt, e.target, e.image, e.system, e.messages], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def encode_all(encoder: Encoder, examples: list[Example], cache_dir: Path | None, what: str,
               write: bool = True) -> list[dict]:
    """Tokenise text-only examples once, cached on disk under a fingerprint of data and tokenizer (`write` False:
    use a cached file, never create or replace one)."""
    key = fingerprint(encoder.processor, examples, encoder.cfg)
    path = cache_dir / f"{what}-{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            logger.info("%s: using cached tokenisation %s", what, path.name)
            return cached
        except (ValueError, UnicodeDecodeError):
            logger.warning("%s is damaged (cut short by a crash?); tokenising again", path)
    encoded = [x for x in (encoder(e) for e in examples) if x is not None]
    encoder.report(len(examples), what)
    encoder.stats.clear()
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{what}-*.json"):
            old.unlink()
        atomic_write_text(path, json.dumps(encoded))
    return encoded


class LazyImageDataset(torch.utils.data.Dataset):
    """VLM samples are encoded when drawn: pixel values are too large to keep for a whole data set.

    With `features` (vision_tower.FeatureCache) each sample names its image (`image_keys`), and once the model
    holds an image's features the sample leaves its pixels out (`image_omitted`): its tokens are kept from the first
    draw, so no image is decoded or resized again."""

    def __init__(self, encoder: Encoder, examples: list[Example], what: str = "images", features=None):
        self.encoder, self.examples, self.features, self.tokens = encoder, examples, features, {}
        counts = [image_tokens(encoder.processor, e.image) for e in examples]
        self.lengths = [n + len(encoder.tok(e.target + e.prompt, add_special_tokens=False)["input_ids"])
                        for n, e in zip(counts, examples)]
        # The longest sample decides whether max_length holds prompt and answer: fail now, not mid-epoch.
        longest = encoder(examples[self.lengths.index(max(self.lengths))])
        longest = len(longest["input_ids"]) if longest else max(self.lengths)
        cfg = encoder.cfg
        batch = cfg.per_device_train_batch_size if what == "train" else cfg.per_device_eval_batch_size
        merge = getattr(getattr(encoder.processor, "image_processor", None), "merge_size", 1)
        # What peak memory follows: the padded batch through the language model, the patches through the tower.
        logger.info("%s: %d images, %d to %d image tokens each (image_min_pixels=%d, image_max_pixels=%d); the "
                    "longest sample is %d tokens, so a batch of %d runs up to %d tokens through the language model "
                    "and up to %d patches through the vision tower", what, len(examples), min(counts), max(counts),
                    cfg.image_min_pixels, cfg.image_max_pixels, longest, batch, batch * longest,
                    batch * max(counts) * merge ** 2)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        if self.features is None:
            return self.encoder(self.examples[i])
        from vision_tower import image_key  # vision_tower imports losses, which imports this module

        key = image_key(self.examples[i].image)
        if i in self.tokens and key in self.features:
            sample, no_pixels = self.tokens[i]
            return {**sample, "pixel_values": no_pixels,
                    "image_keys": torch.tensor([key]), "image_omitted": torch.tensor([True])}
        sample = self.encoder(self.examples[i])
        if sample is not None:
            pixels = sample["pixel_values"]
            # ids as 8-byte arrays, not lists of Python ints (36 bytes a token, each walked by the collector)
            self.tokens[i] = ({k: array("q", v) if isinstance(v, list) else v for k, v in sample.items()
                               if k != "pixel_values"}, pixels.new_empty((0, pixels.shape[-1])))
            sample.update(image_keys=torch.tensor([key]), image_omitted=torch.tensor([False]))
        return sample


def image_tokens(processor, path: str) -> int:
    """Image tokens an image costs after resizing, from its header alone (no decoding)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    try:
        return int(processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0])
    except (AttributeError, KeyError, TypeError):  # processors without the helper: Qwen's 32x32 per token
        return max(1, (h * w) // (32 * 32))


def build_dataset(encoder: Encoder, examples: list[Example], cache_dir: Path | None, what: str,
                  write_cache: bool = True, features=None):
    """A list of encoded samples (text) or a LazyImageDataset (images); both expose per-sample lengths."""
    if examples and examples[0].image is not None:
        return LazyImageDataset(encoder, examples, what, features)
    return EncodedList(encode_all(encoder, examples, cache_dir, what, write_cache))


class EncodedList(list):
    @property
    def lengths(self):
        return [len(x["input_ids"]) for x in self]


class Collator:
    """Pads a batch: input_ids with the pad id, labels with -100, other per-token tensors with 0; every other
    tensor the processor returned (pixel values, grids, image sizes, masks) is concatenated along the image axis."""

    TEXT_KEYS = ("input_ids", "labels")

    def __init__(self, processor, pad_to_multiple_of: int | None = None):
        tok = _tokenizer(processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict]) -> dict:
        batch = [b for b in batch if b is not None]
        longest = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            longest = -(-longest // self.multiple) * self.multiple
        result = {
            "input_ids": torch.tensor([list(b["input_ids"]) + [self.pad_id] * (longest - len(b["input_ids"]))
                                       for b in batch], dtype=torch.long),
            "labels": torch.tensor([list(b["labels"]) + [IGNORE_INDEX] * (longest - len(b["labels"]))
                                    for b in batch], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (longest - len(b["input_ids"]))
                                            for b in batch], dtype=torch.long),
        }
        return join_extras(batch, result,
                           lambda values: torch.stack([torch.nn.functional.pad(v, (0, longest - len(v)))
                                                       for v in values]))


def join_extras(batch: list[dict], result: dict, join_per_token) -> dict:
    """Adds every tensor of `batch` besides the text to `result`: per-token ones (one value per input id, e.g.
    mm_token_type_ids) through `join_per_token` (padded rows, or one packed row), per-image ones (pixel values,
    grids, image keys) concatenated along the image axis."""
    for key in batch[0]:
        if key in Collator.TEXT_KEYS or key == "attention_mask":
            continue
        values = [b[key] for b in batch]
        per_token = all(torch.is_tensor(v) and v.dim() == 1 and len(v) == len(b["input_ids"])
                        for v, b in zip(values, batch))
        if per_token:
            result[key] = join_per_token(values)
        elif all(torch.is_tensor(v) for v in values):
            result[key] = torch.cat(values, dim=0)
    return result


# ----------------------------------------------------------------------------------------------------
# pixels as bytes

# The processor's resize and patchify without its rescale and normalise: the patches stay uint8.
RAW_PIXELS = {"do_rescale": False, "do_normalize": False}


def strip_thinking(text: str) -> str:
    """Drop a `<think>...</think>` block (Qwen3) from a generated answer."""
    return re.sub(r"<think>.*?</think>\s*", "", text, flags=re.S).strip()
