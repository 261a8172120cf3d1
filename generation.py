"""The one generate function (batched, left-padded) used by evaluate, the REPL and batch inference,
and the tolerant JSON parser for VLM answers.

Used by:
    python main.py --task evaluate    generate_batch over the validation set
    python main.py --task inference   generate_batch for each REPL line (streamed) or each --input batch
"""

from __future__ import annotations

import json
import logging
import re

import torch
from tqdm.auto import tqdm

from config import Config
from data_processing import Example, has_chat_template, load_image, prompt_text, strip_thinking

logger = logging.getLogger(__name__)


def generation_kwargs(model, processor, cfg: Config) -> dict:
    tok = getattr(processor, "tokenizer", processor)
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) or tok.eos_token_id
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                  eos_token_id=eos)
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
    else:  # greedy; unset the checkpoint's sampling defaults so transformers does not warn about them
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _device(model) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def encode_prompts(processor, examples: list[Example], system: str | None) -> dict:
    """Left-padded model inputs for a batch of prompts (images decoded here, for VLMs)."""
    texts = [prompt_text(processor, e, system) for e in examples]
    if examples[0].image is not None:
        images = [load_image(e.image) for e in examples]
        return processor(text=texts, images=images, padding=True, return_tensors="pt")
    tok = getattr(processor, "tokenizer", processor)
    return tok(texts, padding=True, add_special_tokens=not has_chat_template(processor), return_tensors="pt")


@torch.inference_mode()
def generate_batch(model, processor, examples: list[Example], cfg: Config, system: str | None,
                   streamer=None, progress: bool = False) -> list[str]:
    """Answers for `examples`, in order, per_device_eval_batch_size at a time."""
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    kwargs = generation_kwargs(model, processor, cfg)
    size = 1 if streamer is not None else cfg.per_device_eval_batch_size
    # Sorting by prompt length keeps padding (wasted compute) small; answers are put back in order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    answers: list[str] = [""] * len(examples)
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    device = _device(model)
    for idx in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
        inputs = encode_prompts(processor, [examples[i] for i in idx], system).to(device)
        out = model.generate(**inputs, streamer=streamer, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
            answers[i] = strip_thinking(text)
    return answers


def parse_json(text: str) -> dict | None:
    """The first JSON object in `text`, tolerating code fences and words around it; None if there is none."""
    text = re.sub(r"```(?:json)?", "", text)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None
