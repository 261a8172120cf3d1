"""Evaluation on the validation set: loss, perplexity and generation metrics.

    python main.py --task evaluate                        the trained adapter
    python main.py --task evaluate --use_original_model   the base model, for comparison

LLM: exact_match, character-level ROUGE-L and BLEU-4 (character level, so Chinese needs no word splitter).
VLM: json_valid_rate, exact_match over the label fields, and per field accuracy, macro F1, per-class
precision/recall/support and a confusion matrix (also drawn as confusion_<field>.png).
VLM: thresholds.json too, the confidence per field (and overall) above which answers are accepted without
review (thresholds.py), and needs_review on every prediction row.
Writes output_dir/<model-name>/eval_results.json (eval_results_original_model.json for the base model)
and eval_predictions.jsonl.
"""

from __future__ import annotations

import logging
import re
import time

import distributed
import thresholds
from answer_io import report_empty
from config import Config, UserError
from data_loading import load_examples, stratified_subset
from data_processing import Encoder, build_dataset
from generation import answer_and_annotate, generate_batch, vlm_constraint, vlm_label_map
from metrics import (
    answer_loss_sums,
    calibration,
    field_metrics,
    perplexity,
    plot_confusion,
    plot_reliability,
    plot_risk_coverage,
    text_metrics,
)
from model_config import adapter_revision, adopt_training_settings, load_for_inference
from outputs import peak_memory_mb, reset_peak_memory, write_json, write_jsonl
from report import write_report
from structured import parse_and_check, parse_json
from vision_tower import normalise_pixels_on_model

logger = logging.getLogger(__name__)


def run(cfg: Config) -> int:
    adopt_training_settings(cfg)
    examples = load_examples(cfg, for_training=False)["validation"]
    if cfg.max_eval_samples and cfg.max_eval_samples < len(examples):
        # VLM: a stratified subset (the files are sorted by label code); LLM: the first N, in the file's order.
        examples = stratified_subset(examples, cfg.max_eval_samples, cfg.seed) if cfg.model_type == "vlm" \
            else examples[:cfg.max_eval_samples]
    if not examples:
        raise UserError("the validation set is empty; add samples (LLM: validation.json; VLM: more images)")
    label_map = vlm_label_map(cfg)  # read before the model loads
    rank, size = distributed.world()  # under torchrun: each process takes every size-th sample
    local = distributed.shard(examples, rank, size)
    reset_peak_memory()
    model, processor = load_for_inference(cfg)
    raw = normalise_pixels_on_model(model, processor)
    encoder = Encoder(processor, cfg, raw_pixels=raw)  # reads the system prompt once, for loss and generation
    started = time.time()
    # Training tokenised this validation set already: its cache (same data, tokenizer and settings) is read, never
    # written here (an evaluate beside a running training must not replace the training's files).
    samples = build_dataset(encoder, local, cfg.run_dir / "cache", "validation", write_cache=False) if local else []
    loss_sum, tokens = distributed.total(list(answer_loss_sums(model, processor, samples,
                                                               cfg.per_device_eval_batch_size)), size)
    loss = loss_sum / tokens if tokens else float("nan")
    gen_start = time.time()
    constraint = vlm_constraint(model, processor, cfg, label_map)
    notes = free = None
    if label_map is None:
        preds = generate_batch(model, processor, local, cfg, encoder.system, progress=True)
    else:
        preds, notes = answer_and_annotate(model, processor, local, cfg, encoder.system, label_map, constraint,
                                           progress=True)
        notes = distributed.gather(notes, rank, size)
        if cfg.report_unconstrained and constraint is not None:
            free = distributed.gather(generate_batch(model, processor, local, cfg, encoder.system, progress=True),
                                      rank, size)
    preds = distributed.gather(preds, rank, size)
    gen_seconds = time.time() - gen_start
    if rank != 0:  # process 0 writes the results
        return 0
    empty = report_empty(preds, cfg)
    results = {"model": cfg.model_name_or_path, "adapter": None if cfg.use_original_model else str(cfg.lora_dir),
               "num_samples": len(examples), "empty_predictions": empty, "eval_loss": loss,
               "perplexity": perplexity(loss)}
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_original_model" if cfg.use_original_model else ""
    if label_map is not None:
        rows = _vlm_results(cfg, examples, preds, notes, free, label_map, constraint, results)
        for name, m in results["fields"].items():
            plot_confusion(name, m, run_dir / f"confusion_{_safe(name)}{suffix}.png")
        plot_reliability(results["calibration"], run_dir / f"reliability{suffix}.png")
        review = thresholds.compute(rows, [p["field"] for p in label_map["positions"]], cfg.review_target_accuracy)
        thresholds.write(run_dir / f"thresholds{suffix}.json", review,
                         None if cfg.use_original_model else adapter_revision(cfg.lora_dir))
        plot_risk_coverage(review, run_dir / f"risk_coverage{suffix}.png")
        for r in rows:
            r.update(thresholds.flags(r["field_confidence"], r["confidence"], review))
        results["review"] = {name: {k: t[k] for k in ("threshold", "coverage", "accuracy", "accepted", "n")}
                             for name, t in [*review["fields"].items(), ("overall", review["confidence"])]}
        results["review_rate"] = sum(r["needs_review"] for r in rows) / len(rows)
        logger.info(thresholds.summary(review))
    else:
        results.update(text_metrics(preds, [e.target for e in examples]))
        rows = [{"text": e.prompt, "target": e.target, "prediction": p} for e, p in zip(examples, preds)]
    results.update(generation_seconds=round(gen_seconds, 2),
                   samples_per_second=round(len(examples) / max(gen_seconds, 1e-9), 3),
                   eval_wall_seconds=round(time.time() - started, 2), **peak_memory_mb())
    write_json(run_dir / f"eval_results{suffix}.json", results)
    write_jsonl(run_dir / f"eval_predictions{suffix}.jsonl", rows)
    write_report(run_dir / f"eval_report{suffix}.html", cfg, results, rows)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()
               if k not in ("fields", "calibration", "review")}
    logger.info("evaluation: %s", summary)
    for name, m in results.get("fields", {}).items():
        c = results["calibration"].get(name, {})
        logger.info("field %s: accuracy %.3f (majority baseline %.3f), macro F1 %.3f, ECE %s, Brier %s", name,
                    m["accuracy"], m["majority_baseline"], m["macro_f1"],
                    f"{c['ece']:.3f}" if "ece" in c else "-", f"{c['brier']:.3f}" if "brier" in c else "-")
    logger.info("results written to %s; report: %s", run_dir / f"eval_results{suffix}.json",
                run_dir / f"eval_report{suffix}.html")
    return 0


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip(".") or "field"  # field names are the user's text


def _vlm_results(cfg: Config, examples, preds, notes, free, label_map, constraint, results) -> list:
    """json_valid_rate, exact match, per-field metrics, field confidences and their calibration; -> rows.
    `free`: the unconstrained answers, when asked for."""
    fields = [p["field"] for p in label_map["positions"]]
    parsed = [n["parsed"] for n in notes]
    targets = [parse_json(e.target) for e in examples]
    n = len(parsed)
    results["constrained_decoding"] = constraint is not None
    results["json_valid_rate"] = sum(p is not None for p in parsed) / n
    results["schema_valid_rate"] = sum(parse_and_check(p, label_map) is not None for p in preds) / n
    if constraint is not None and results["schema_valid_rate"] < 1:
        logger.warning("%d constrained answers stopped at max_new_tokens=%d before the JSON closed; raise "
                       "max_new_tokens", round(n * (1 - results["schema_valid_rate"])), cfg.max_new_tokens)
    if free is not None:
        results["json_valid_rate_unconstrained"] = sum(parse_json(p) is not None for p in free) / n
        results["schema_valid_rate_unconstrained"] = sum(parse_and_check(p, label_map) is not None for p in free) / n
    results["exact_match"] = sum(
        isinstance(p, dict) and all(str(p.get(f)) == str(t.get(f)) for f in fields)
        for p, t in zip(parsed, targets)) / n
    results["fields"] = field_metrics(parsed, targets, fields)
    results["calibration"] = {f: calibration([x["distributions"].get(f, {}) for x in notes],
                                             [t.get(f) for t in targets],
                                             [(p or {}).get(f) for p in parsed]) for f in fields}
    return [{"file": e.image, "target": t, "prediction": x["parsed"], "raw": p,
             "field_confidence": x["field_confidence"], "confidence": x["confidence"]}
            for e, t, p, x in zip(examples, targets, preds, notes)]
