"""Interactive and batch inference with the trained adapter (or the base model).

    python main.py --task inference                                  REPL: a question (LLM) or an image path (VLM)
    python main.py --task inference --use_original_model             the same with the base model
    python main.py --task inference --input questions.json --output preds.jsonl
    python main.py --task inference --input data/vlm/images --output preds.jsonl
                                  (VLM rows carry needs_review and review_fields, from thresholds.json)

The REPL reads lines from stdin (a pipe works), streams LLM answers as they are generated, ignores empty lines
and ends on exit, quit or EOF. A bad line gets a message; the loaded model stays loaded. Generation is the
engine's (generation.py); files and the REPL loop are answer_io.py's.
"""

from __future__ import annotations

import json
import sys

import thresholds
from answer_io import line_example, prepare_batch, repl, run_batch, show_answer
from config import Config
from data_loading import system_prompt
from generation import Answerer, generate_batch, vlm_label_map
from model_config import adapter_revision, adopt_training_settings, load_for_inference


def _answer_one(answerer: Answerer, line: str) -> None:
    from transformers import TextStreamer

    cfg = answerer.cfg
    example = line_example(cfg, line)
    if example is None:
        return
    if example.image is not None:
        out = answerer.columns([example])
        note = out["_extra"][0]
        print(show_answer(cfg, json.dumps(note["prediction"], ensure_ascii=False) if note["prediction"] is not None
                          else out["prediction"][0]), flush=True)
        if note["field_confidence"]:
            print("field confidence: " + ", ".join(f"{k} {v:.3f}" for k, v in note["field_confidence"].items()),
                  flush=True)
        return
    model, processor, system = answerer.model, answerer.processor, answerer.system
    tok = getattr(processor, "tokenizer", processor)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    generate_batch(model, processor, [example], cfg, system, streamer=streamer)
    sys.stdout.flush()


def run(cfg: Config) -> int:
    adopt_training_settings(cfg)
    system = system_prompt(cfg)  # read once; a missing prompt file is reported before the model loads
    label_map = vlm_label_map(cfg)
    batch = prepare_batch(cfg) if cfg.input else None
    model, processor = load_for_inference(cfg)
    review = thresholds.load(thresholds.path(cfg), adapter_revision(cfg.lora_dir)) \
        if label_map is not None and batch is not None else None
    answerer = Answerer(model, processor, cfg, system, label_map, review)
    if batch is not None:
        run_batch(cfg, *batch, answerer.columns)
        return 0
    label = "base model" if cfg.use_original_model else "fine-tuned model"
    return repl(cfg, label, lambda line: _answer_one(answerer, line))
