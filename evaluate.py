"""Evaluation on the validation set: loss, perplexity and generation metrics.

    python main.py --task evaluate                        the trained adapter
    python main.py --task evaluate --use_original_model   the base model, for comparison

LLM: exact_match, character-level ROUGE-L and BLEU-4 (character level, so Chinese needs no word splitter).
VLM: json_valid_rate, exact_match over the label fields, and per field accuracy, macro F1, per-class
precision/recall/support and a confusion matrix (also drawn as confusion_<field>.png).
Writes output_dir/<model-name>/eval_results.json (eval_results_original_model.json for the base model)
and eval_predictions.jsonl.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import Config, UserError
from data_processing import Collator, Encoder, Example, load_examples, load_label_map
from inference import generate_batch, parse_json
from model_config import load_for_inference
from outputs import peak_memory_mb, reset_peak_memory, write_json, write_jsonl

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# text metrics (character level)
def lcs_length(a: str, b: str) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over characters."""
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def bleu(pred: str, ref: str, n: int = 4) -> float:
    """Sentence BLEU-n over characters, with add-one smoothing for higher orders (Lin & Och 2004)."""
    if not pred or not ref:
        return 0.0
    log_p = 0.0
    for k in range(1, n + 1):
        pc = Counter(pred[i:i + k] for i in range(len(pred) - k + 1))
        rc = Counter(ref[i:i + k] for i in range(len(ref) - k + 1))
        match, total = sum((pc & rc).values()), max(sum(pc.values()), 0)
        if k > 1:
            match, total = match + 1, total + 1
        if match == 0 or total == 0:
            return 0.0
        log_p += math.log(match / total) / n
    bp = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return bp * math.exp(log_p)


def text_metrics(preds: list[str], refs: list[str]) -> dict:
    n = max(len(refs), 1)
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / n,
        "rouge_l": sum(rouge_l(p.strip(), r.strip()) for p, r in zip(preds, refs)) / n,
        "bleu": sum(bleu(p.strip(), r.strip()) for p, r in zip(preds, refs)) / n,
    }


# ----------------------------------------------------------------------------------------------------
# VLM field metrics
INVALID = "<invalid>"


def field_metrics(parsed: list[dict | None], targets: list[dict], fields: list[str]) -> dict:
    """Per-field accuracy, macro F1, per-class report and confusion matrix (rows = truth)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    out = {}
    for name in fields:
        truth = [str(t.get(name)) for t in targets]
        pred = [str(p.get(name)) if isinstance(p, dict) and name in p else INVALID for p in parsed]
        labels = sorted(set(truth)) + sorted(set(pred) - set(truth))
        p, r, f, s = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
        majority = Counter(truth).most_common(1)[0][1] / len(truth)
        out[name] = {
            "accuracy": accuracy_score(truth, pred),
            "majority_baseline": majority,
            "macro_f1": f1_score(truth, pred, labels=sorted(set(truth)), average="macro", zero_division=0),
            "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                "support": int(s[i])} for i, lab in enumerate(labels)},
            "labels": labels,
            "confusion_matrix": confusion_matrix(truth, pred, labels=labels).tolist(),
        }
    return out


def plot_confusion(name: str, m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, cm = m["labels"], m["confusion_matrix"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 1.0 + 0.8 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name}: accuracy {m['accuracy']:.2f}")
    top = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def _eval_loss(model, encoder: Encoder, cfg: Config, examples: list[Example]) -> float:
    """Mean loss per answer token over the validation set (the same encoding and masking as training)."""
    collate = Collator(encoder.processor)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    total, count = 0.0, 0
    size = cfg.per_device_eval_batch_size
    for i in tqdm(range(0, len(examples), size), desc="eval loss", unit="batch"):
        batch = [x for x in (encoder(e) for e in examples[i:i + size]) if x is not None]
        if not batch:
            continue
        inputs = {k: v.to(device) for k, v in collate(batch).items()}
        n = int((inputs["labels"][:, 1:] != -100).sum())
        total += float(model(**inputs).loss) * n
        count += n
    encoder.report(len(examples), "validation")
    return total / count if count else float("nan")


def run(cfg: Config) -> int:
    examples = load_examples(cfg, for_training=False)["validation"]
    if cfg.max_eval_samples:
        examples = examples[:cfg.max_eval_samples]
    if not examples:
        raise UserError("the validation set is empty; add samples (LLM: validation.json; VLM: more images)")
    reset_peak_memory()
    model, processor = load_for_inference(cfg)
    encoder = Encoder(processor, cfg)  # reads the system prompt once, for loss and generation
    started = time.time()
    loss = _eval_loss(model, encoder, cfg, examples)
    gen_start = time.time()
    preds = generate_batch(model, processor, examples, cfg, encoder.system, progress=True)
    gen_seconds = time.time() - gen_start
    results = {"model": cfg.model_name_or_path, "adapter": None if cfg.use_original_model else str(cfg.lora_dir),
               "num_samples": len(examples), "eval_loss": loss,
               "perplexity": math.exp(min(loss, 50)) if loss == loss else None}
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_original_model" if cfg.use_original_model else ""
    if cfg.model_type == "vlm":
        label_map = load_label_map(Path(cfg.label_map_file))
        fields = [p["field"] for p in label_map["positions"]]
        parsed = [parse_json(p) for p in preds]
        targets = [parse_json(e.target) for e in examples]
        results["json_valid_rate"] = sum(p is not None for p in parsed) / len(parsed)
        results["exact_match"] = sum(
            isinstance(p, dict) and all(str(p.get(f)) == str(t.get(f)) for f in fields)
            for p, t in zip(parsed, targets)) / len(parsed)
        results["fields"] = field_metrics(parsed, targets, fields)
        for name, m in results["fields"].items():
            plot_confusion(name, m, run_dir / f"confusion_{name}{suffix}.png")
        rows = [{"file": e.image, "target": t, "raw": p, "parsed": q}
                for e, t, p, q in zip(examples, targets, preds, parsed)]
    else:
        results.update(text_metrics(preds, [e.target for e in examples]))
        rows = [{"text": e.prompt, "target": e.target, "prediction": p} for e, p in zip(examples, preds)]
    results.update(generation_seconds=round(gen_seconds, 2),
                   samples_per_second=round(len(examples) / max(gen_seconds, 1e-9), 3),
                   eval_wall_seconds=round(time.time() - started, 2), **peak_memory_mb())
    write_json(run_dir / f"eval_results{suffix}.json", results)
    write_jsonl(run_dir / f"eval_predictions{suffix}.jsonl", rows)
    summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items() if k != "fields"}
    logger.info("evaluation: %s", summary)
    for name, m in results.get("fields", {}).items():
        logger.info("field %s: accuracy %.3f (majority baseline %.3f), macro F1 %.3f", name, m["accuracy"],
                    m["majority_baseline"], m["macro_f1"])
    logger.info("results written to %s", run_dir / f"eval_results{suffix}.json")
    return 0
