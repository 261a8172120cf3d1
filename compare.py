"""Base model and fine-tuned model side by side, from one model load (the adapter is switched off for the base
answers with PEFT's disable_adapter).

    python main.py --task compare                                   REPL: both answers to each question/image
    python main.py --task compare --input questions.json --output compare.jsonl
    python main.py --task compare --input data/vlm/images --output compare.jsonl

Batch rows: {"text" | "file", "base", "finetuned"[, "target"]} (VLM: parsed JSON, plus base_raw/finetuned_raw);
when the input has targets, both are scored and the difference is logged.
"""

from __future__ import annotations

import logging

from answer_io import line_example, prepare_batch, repl, run_batch, show_answer
from config import Config, UserError
from data_loading import system_prompt
from generation import Answerer, vlm_label_map
from metrics import text_metrics
from model_config import adopt_training_settings, load_for_inference

logger = logging.getLogger(__name__)


def both_answers(answerer: Answerer, examples) -> dict[str, list[str]]:
    finetuned = answerer.texts(examples)
    with answerer.model.disable_adapter():
        base = answerer.texts(examples)
    return {"base": base, "finetuned": finetuned}


def run(cfg: Config) -> int:
    if cfg.use_original_model:
        raise UserError("--task compare runs the base and the fine-tuned model together; drop --use_original_model")
    adopt_training_settings(cfg)
    system = system_prompt(cfg)
    label_map = vlm_label_map(cfg)
    batch = prepare_batch(cfg) if cfg.input else None
    model, processor = load_for_inference(cfg)
    answerer = Answerer(model, processor, cfg, system, label_map)  # VLM: both answers constrained to the label map
    if batch is not None:
        examples, _ = batch
        columns = run_batch(cfg, *batch, lambda part: both_answers(answerer, part))
        targets = [e.target for e in examples]
        if cfg.model_type == "llm" and all(t is not None for t in targets):
            base, tuned = (text_metrics(columns[k], targets) for k in ("base", "finetuned"))
            logger.info("fine-tuned minus base: %s", ", ".join(f"{k} {tuned[k] - base[k]:+.3f}" for k in base))
        return 0

    def answer(line: str) -> None:
        example = line_example(cfg, line)
        if example is not None:
            out = both_answers(answerer, [example])
            print(f"[base]\n{show_answer(cfg, out['base'][0])}\n[fine-tuned]\n{show_answer(cfg, out['finetuned'][0])}",
                  flush=True)

    return repl(cfg, "base and fine-tuned model", answer)
