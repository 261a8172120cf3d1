"""The generation engine: batched, left-padded generation that stops where training's answers stop, JSON
constrained to a schema, and VLM field confidences from the model's own probabilities.

Used by every task that generates:
    python main.py --task inference | evaluate | compare   generate_batch / Answerer over a list of examples
    python main.py --task serve                            Engine.generate_rows: per-request limits, stop
                                                           strings, deadlines, cancellation and streaming

Both paths share the prompt encoding, the generation settings, the grammar processor and the confidence
computation, so an answer served over HTTP is the answer `--task inference` writes for the same prompt.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import thresholds
from config import Config
from data_loading import Example, load_image, load_label_map
from data_processing import end_of_turn_ids, has_chat_template, prompt_text, strip_thinking
from model_config import context_length
from structured import SchemaConstraint, field_confidences, parse_json, with_confidence

logger = logging.getLogger(__name__)


def generation_kwargs(model, processor, cfg: Config) -> dict:
    """generate() settings from the config: stop tokens (the template's end of turn too), greedy or sampling."""
    tok = getattr(processor, "tokenizer", processor)
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    eos += [i for i in end_of_turn_ids(processor) if i not in eos]  # stop where training's answers stop
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                  eos_token_id=eos)
    return {**kwargs, **sampling_kwargs(cfg.temperature, cfg.top_p)}


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    if temperature > 0:
        return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
    # greedy; unset the checkpoint's sampling defaults so transformers does not warn about them
    return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _flat_images(images: list | None) -> list | None:
    """One entry per example (an image, or a list of them for a request with several) -> the processor's list."""
    if images is None:
        return None
    return [im for item in images for im in (item if isinstance(item, list) else [item])]


def encode_prompts(processor, examples: list[Example], system: str | None, images: list | None) -> dict:
    """Left-padded model inputs for a batch of prompts (VLMs: with their decoded `images`; text: None)."""
    texts = [prompt_text(processor, e, system) for e in examples]
    if images is not None:
        return processor(text=texts, images=_flat_images(images), padding=True, return_tensors="pt")
    tok = getattr(processor, "tokenizer", processor)
    return tok(texts, padding=True, add_special_tokens=not has_chat_template(processor), return_tensors="pt")


@torch.inference_mode()
def generate_batch(model, processor, examples: list[Example], cfg: Config, system: str | None,
                   streamer=None, progress: bool = False, constraint=None, on_batch=None) -> list[str]:
    """Answers for `examples`, in order, per_device_eval_batch_size at a time; `constraint` (a
    structured.SchemaConstraint) restricts them to the label map's JSON schema. `on_batch(indices, answers,
    images)` is called after each batch, with its decoded images (None for text)."""
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    kwargs = generation_kwargs(model, processor, cfg)
    size = 1 if streamer is not None else cfg.per_device_eval_batch_size
    # Sorting by prompt length keeps padding (wasted compute) small; answers are put back in order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    answers: list[str] = [""] * len(examples)
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    device = model_device(model)
    for idx in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
        batch = [examples[i] for i in idx]
        images = [load_image(e.image) for e in batch] if batch[0].image is not None else None
        inputs = encode_prompts(processor, batch, system, images).to(device)
        if constraint is not None:
            vocab = model.get_output_embeddings().weight.shape[0]  # fresh matcher state per call
            kwargs["logits_processor"] = [GrammarProcessor([constraint.compiled] * len(batch), vocab)]
        out = model.generate(**inputs, streamer=streamer, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
            answers[i] = strip_thinking(text)
        if on_batch is not None:
            on_batch(idx, [answers[i] for i in idx], images)
    return answers


def vlm_label_map(cfg: Config) -> dict | None:
    """The label map a VLM answers in (read before the model loads, so a bad file costs nothing)."""
    return load_label_map(Path(cfg.label_map_file)) if cfg.model_type == "vlm" else None


def vlm_constraint(model, processor, cfg: Config, label_map: dict | None):
    """The schema constraint for VLM answers, unless constrained_decoding is off."""
    if cfg.model_type != "vlm" or not cfg.constrained_decoding or label_map is None:
        return None
    return SchemaConstraint(processor, model, label_map)


def annotate_vlm(model, processor, examples: list[Example], answers: list[str], cfg: Config, system: str | None,
                 label_map: dict, images: list, encoded: list | None = None) -> list[dict]:
    """Per answer (with its decoded image, or its prompt already `encoded` alone): the parsed JSON (its confidence
    replaced unless keep_model_confidence), field_confidence, confidence, and each field's distribution over its
    allowed values."""
    out = []
    for k, (e, answer) in enumerate(zip(examples, answers)):
        parsed = parse_json(answer)
        dists = {}
        if parsed is not None:
            inputs = encoded[k] if encoded else encode_prompts(processor, [e], system, [images[k]])
            dists = field_confidences(model, processor, inputs, answer, label_map)
        out.append({"parsed": parsed, "distributions": dists,
                    **with_confidence(parsed, dists, cfg.keep_model_confidence)})
    return out


def answer_and_annotate(model, processor, examples: list[Example], cfg: Config, system: str | None,
                        label_map: dict, constraint, progress: bool = False) -> tuple[list[str], list[dict]]:
    """VLM answers and their annotations (annotate_vlm), batch by batch: each image is decoded once for both."""
    notes: list = [None] * len(examples)

    def annotate(idx, answers, images):
        batch = [examples[i] for i in idx]
        for i, note in zip(idx, annotate_vlm(model, processor, batch, answers, cfg, system, label_map, images)):
            notes[i] = note

    answers = generate_batch(model, processor, examples, cfg, system, progress=progress, constraint=constraint,
                             on_batch=annotate)
    return answers, notes


class Answerer:
    """Answers for examples with one loaded model: VLM answers constrained to the label map's schema (unless
    constrained_decoding is off) and annotated with field confidences from the model's probabilities."""

    def __init__(self, model, processor, cfg: Config, system: str | None, label_map: dict | None,
                 review: dict | None = None):
        self.model, self.processor, self.cfg, self.system = model, processor, cfg, system
        self.label_map, self.review = label_map, review  # review: thresholds.json's content
        self.constraint = vlm_constraint(model, processor, cfg, self.label_map)

    def texts(self, examples: list[Example], **kw) -> list[str]:
        return generate_batch(self.model, self.processor, examples, self.cfg, self.system,
                              constraint=self.constraint, **kw)

    def columns(self, examples: list[Example]) -> dict:
        if self.label_map is None:
            return {"prediction": self.texts(examples)}
        texts, notes = answer_and_annotate(self.model, self.processor, examples, self.cfg, self.system,
                                           self.label_map, self.constraint)
        return {"prediction": texts, "_extra": [{"prediction": n["parsed"], "field_confidence": n["field_confidence"],
                                                 "confidence": n["confidence"],
                                                 **thresholds.flags(n["field_confidence"], n["confidence"],
                                                                    self.review)} for n in notes]}


# ----------------------------------------------------------------------------------------------------
# rows with limits of their own (the server's requests)
@dataclass
class Row:
    """One request inside a shared generate() call. `on_text(delta)` receives the answer as it grows (never
    a part of a stop string, never half a character); `cancelled` ends it early (a client that left)."""
    example: Example
    images: list | None = None          # decoded images of this prompt (VLM)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    constraint: object | None = None    # a compiled xgrammar grammar
    deadline: float = float("inf")      # time.monotonic() after which generation stops
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    inputs: dict | None = None          # the prompt encoded alone (Engine.encode_row), batch 1
    # filled in by generate_rows
    text: str = ""
    finish_reason: str | None = None    # stop, length, cancelled, timeout
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _sent: int = 0


class _RowControl:
    """A stopping criterion that runs once per generated token for the whole batch: it ends each row at its
    own max_tokens, stop strings, deadline or cancellation, and streams each row's new text.

    Written here because transformers' stopping criteria and streamers all assume one setting (and, for
    streamers, one sequence) per generate call; a dynamic batch mixes requests that each have their own."""

    def __init__(self, rows: list[Row], prompt_len: int, tok, eos: set[int]):
        self.rows, self.prompt_len, self.tok, self.eos = rows, prompt_len, tok, eos
        self.done = [False] * len(rows)
        self.holdback = [max((len(s) for s in r.stop), default=1) - 1 for r in rows]
        self.last = [""] * len(rows)

    def _finish(self, i: int, reason: str, text: str) -> None:
        row = self.rows[i]
        self.done[i] = True
        row.finish_reason, row.text = reason, text
        self._send(row, text, len(text))

    @staticmethod
    def _send(row: Row, text: str, upto: int) -> None:
        if row.on_text is not None and upto > row._sent:
            row.on_text(text[row._sent:upto])
            row._sent = upto

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        new = input_ids[:, self.prompt_len:]
        for i, row in enumerate(self.rows):
            if self.done[i]:
                continue
            ids = new[i].tolist()
            ended = ids[-1] in self.eos
            if ended:
                ids = ids[:-1]
            row.completion_tokens = len(ids)
            text = self.last[i] = self.tok.decode(ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in row.stop if s in text), default=-1)
            if cut >= 0:
                self._finish(i, "stop", text[:cut])
            elif ended:
                self._finish(i, "stop", text)
            elif row.cancelled.is_set():
                self._finish(i, "cancelled", text)
            elif now > row.deadline:
                self._finish(i, "timeout", text)
            elif len(ids) >= row.max_tokens:
                self._finish(i, "length", text)
            else:  # stream what can no longer turn into a stop string or a character still being decoded
                self._send(row, text, len(text.rstrip("\ufffd")) - self.holdback[i])
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class GrammarProcessor:
    """xgrammar's token masks, one grammar per row (None: unconstrained), skipping rows that `control` has
    ended (xgrammar's own transformers processor would feed such a row's pad tokens to its grammar)."""

    def __init__(self, grammars: list, vocab: int, control: _RowControl | None = None):
        import xgrammar as xgr

        self.xgr, self.control = xgr, control
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab)
        self.started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        done = self.control.done if self.control is not None else [False] * len(self.matchers)
        live = [i for i, m in enumerate(self.matchers) if m is not None and not done[i]]
        if self.started:
            for i in live:
                if not self.matchers[i].is_terminated():
                    self.matchers[i].accept_token(int(input_ids[i, -1]))
        self.started = True
        self.bitmask.fill_(-1)  # all tokens allowed (rows without a grammar, rows that ended)
        for i in live:
            if not self.matchers[i].is_terminated():
                self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores


def collate_encoded(encoded: list[dict], pad_id: int) -> dict:
    """One left-padded batch from prompts encoded alone (batch 1 each): per-token tensors padded on the left
    (input_ids with `pad_id`, masks and token types with 0), the rest (pixel patches, image grids) concatenated
    in order, as the processor lays out a batch."""
    width = max(e["input_ids"].shape[1] for e in encoded)
    batch = {}
    for key in encoded[0]:
        parts = [e[key] for e in encoded]
        if torch.is_tensor(parts[0]) and parts[0].dim() == 2 and parts[0].shape[:2] == encoded[0]["input_ids"].shape:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=fill) for t in parts])
        elif torch.is_tensor(parts[0]):
            batch[key] = torch.cat(parts)
    return batch


class ContextError(ValueError):
    """A prompt (with its max_tokens) longer than the model's context."""


class Engine:
    """One loaded model (with its adapter, switchable off) answering rows in shared generate() calls."""

    def __init__(self, model, processor, cfg: Config, system: str | None, label_map: dict | None):
        self.model, self.processor, self.cfg, self.system, self.label_map = model, processor, cfg, system, label_map
        self.tok = getattr(processor, "tokenizer", processor)
        self.tok.padding_side = "left"
        self.base_kwargs = generation_kwargs(model, processor, cfg)
        self.eos = set(self.base_kwargs["eos_token_id"])
        self.label_constraint = vlm_constraint(model, processor, cfg, label_map)
        self.context = context_length(model)
        self._compiler = None
        # Requests are encoded on their own threads, never on the generation thread: with a processor of their
        # own (a fast tokenizer is not safe to share between threads) and one at a time.
        self._request_processor = copy.deepcopy(processor)
        self._encoding = threading.Lock()
        self._compiling = threading.Lock()

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter") and not self.cfg.use_original_model

    def compile_schema(self, schema: dict | None):
        """A compiled grammar for a JSON schema (None: any JSON object), in training's compact layout."""
        import json

        import xgrammar as xgr

        with self._compiling:  # requests compile on their own threads
            if self._compiler is None:
                vocab = self.model.get_output_embeddings().weight.shape[0]
                self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=vocab))
            if schema is None:
                return self._compiler.compile_builtin_json_grammar()
            return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                      separators=(", ", ": "))

    def encode_row(self, row: Row, explicit: bool) -> None:
        """Encode the row's prompt (and images) once, into row.inputs, on the caller's thread, and bound
        row.max_tokens by the context left after it; ContextError when an explicit max_tokens (or the prompt
        alone) does not fit. The decoded images are let go: the patches are what generation needs."""
        with self._encoding:
            row.inputs = dict(encode_prompts(self._request_processor, [row.example], self.system,
                                             [row.images] if row.images is not None else None))
        row.prompt_tokens = used = int(row.inputs["input_ids"].shape[1])
        row.images = None
        if self.context is None:
            return
        room = self.context - used
        if room < 1 or (explicit and row.max_tokens > room):
            raise ContextError(f"this model's context is {self.context} tokens; the messages use {used}"
                               + (f" and max_tokens asks for {row.max_tokens}" if room >= 1 else "")
                               + ": shorten the messages or lower max_tokens")
        row.max_tokens = min(row.max_tokens, room)

    @torch.inference_mode()
    def generate_rows(self, rows: list[Row], temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                      adapter: str | None = "default") -> None:
        """Answer `rows` together (same sampling settings, same adapter: a peft adapter name, None for the base
        model); each row ends on its own. Rows come encoded (encode_row); their batch is only padded here."""
        for r in rows:
            if r.inputs is None:
                self.encode_row(r, explicit=False)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.base_kwargs["pad_token_id"]
        device = model_device(self.model)
        inputs = {k: v.to(device) for k, v in collate_encoded([r.inputs for r in rows], pad).items()}
        prompt_len = inputs["input_ids"].shape[1]
        control = _RowControl(rows, prompt_len, self.tok, self.eos)
        kwargs = {**self.base_kwargs, **sampling_kwargs(temperature, top_p),
                  "max_new_tokens": max(r.max_tokens for r in rows), "stopping_criteria": [control]}
        if any(r.constraint is not None for r in rows):
            vocab = self.model.get_output_embeddings().weight.shape[0]
            kwargs["logits_processor"] = [GrammarProcessor([r.constraint for r in rows], vocab, control)]
        if seed is not None:
            torch.manual_seed(seed)
        with self._adapter(adapter):
            self.model.generate(**inputs, **kwargs)
        for i, r in enumerate(rows):
            if not control.done[i]:  # generate ended before this row did (it cannot, but never lose a row)
                control._finish(i, "length", control.last[i])
            r.text = strip_thinking(r.text)

    def _adapter(self, name: str | None):
        """The adapter a request's model names, made active (several may be loaded on the one base), or every
        adapter switched off for the call (the base model)."""
        if not self.has_adapter:
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
        return contextlib.nullcontext()

    def confidences(self, row: Row, adapter: str | None = "default") -> dict:
        """parsed, field_confidence and confidence of a VLM row's answer: annotate_vlm, as evaluate computes them."""
        with self._adapter(adapter):
            return annotate_vlm(self.model, self.processor, [row.example], [row.text], self.cfg, self.system,
                                self.label_map, [None], encoded=[row.inputs])[0]
