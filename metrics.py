"""Metrics shared by evaluate, batch inference and training: text metrics, VLM field metrics and plots, and
the answer-token loss.

    python main.py --task evaluate      all of them
    python main.py --task inference --input FILE   text metrics when the input has targets
    python main.py --task train         answer_loss on the validation set at the end (train_results.json)

LLM: exact_match, character-level ROUGE-L and BLEU-4 (character level, so Chinese needs no word splitter).
VLM: per field accuracy, macro F1, per-class precision/recall/support and a confusion matrix.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data_processing import IGNORE_INDEX, Collator

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# text metrics (character level)
# By hand, not rouge-score / sacrebleu: rouge-score's tokenizer keeps only [a-z0-9] (a Chinese answer scores 0)
# and Chinese has no word boundaries; character-level LCS and n-grams take a dozen lines and no dependency.
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


def calibration(distributions: list[dict], truths: list, predictions: list, n_bins: int = 10) -> dict:
    """For one field: expected calibration error (equal-width bins over the predicted value's probability) and
    the multi-class Brier score, from each sample's distribution {json value: p}, the true and the predicted
    value."""
    import json

    conf, correct, brier = [], [], []
    for dist, truth, pred in zip(distributions, truths, predictions):
        if not dist:
            continue
        truth_key = json.dumps(truth, ensure_ascii=False)
        chosen = json.dumps(pred, ensure_ascii=False)
        if chosen not in dist:
            continue
        conf.append(dist[chosen])
        correct.append(chosen == truth_key)
        brier.append(sum((p - (v == truth_key)) ** 2 for v, p in dist.items()) + (0 if truth_key in dist else 1))
    if not conf:
        return {"n": 0}
    bins = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if lo < c <= hi or (b == 0 and c == 0)]
        if idx:
            bins.append({"from": lo, "to": hi, "n": len(idx), "confidence": sum(conf[i] for i in idx) / len(idx),
                         "accuracy": sum(correct[i] for i in idx) / len(idx)})
    ece = sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / len(conf)
    return {"n": len(conf), "ece": ece, "brier": sum(brier) / len(brier),
            "mean_confidence": sum(conf) / len(conf), "accuracy": sum(correct) / len(correct), "bins": bins}


def plot_reliability(calib: dict[str, dict], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per field; the diagonal is perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk_font()

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    for field, c in calib.items():
        if c.get("bins"):
            ax.plot([b["confidence"] for b in c["bins"]], [b["accuracy"] for b in c["bins"]], "o-",
                    label=f"{field} (ECE {c['ece']:.3f})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (probability of the chosen value)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    _save_figure(fig, path)


def plot_risk_coverage(thresholds: dict, path: Path) -> None:
    """Accuracy of the accepted answers against coverage (share accepted), per field and overall, with each
    field's chosen threshold marked and the target accuracy drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk_font()

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.axhline(thresholds["target_accuracy"], ls=":", color="gray", label=f"target {thresholds['target_accuracy']:g}")
    items = [*thresholds["fields"].items(), ("overall", thresholds["confidence"])]
    for name, t in items:
        pts = t["curve"]
        if not pts:
            continue
        line, = ax.plot([0] + [p["coverage"] for p in pts], [pts[0]["accuracy"]] + [p["accuracy"] for p in pts],
                        "-", drawstyle="steps-post", lw=2 if name == "overall" else 1.2)
        label = f"{name}: " + (f">= {t['threshold']:.3f}, coverage {t['coverage']:.2f}" if t["reached"]
                               else "target not reached")
        line.set_label(label)
        if t["reached"]:
            ax.plot([t["coverage"]], [t["accuracy"]], "o", color=line.get_color(), ms=7)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (share of answers accepted without review)")
    ax.set_ylabel("accuracy of the accepted answers")
    ax.set_title(f"accuracy against coverage ({thresholds['num_samples']} validation samples)")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    _save_figure(fig, path)


_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "SimHei", "Microsoft YaHei", "PingFang SC", "Hiragino Sans GB", "AR PL UMing CN")
_missing_glyphs_said = False


def cjk_font() -> str | None:
    """An installed font with Chinese characters, put first in matplotlib's list (label maps may be Chinese)."""
    import matplotlib
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in _CJK_FONTS if name in installed), None)
    if found and matplotlib.rcParams["font.sans-serif"][:1] != [found]:
        matplotlib.rcParams["font.sans-serif"] = [found, *matplotlib.rcParams["font.sans-serif"]]
    return found


def _save_figure(fig, path: Path) -> None:
    """Written under a temporary name and renamed: never a half-written PNG. Characters no installed font has
    (Chinese field names without a CJK font) are said once per run, not once per glyph and figure."""
    import warnings

    import matplotlib.pyplot as plt

    global _missing_glyphs_said
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=r"Glyph \d+ .* missing from font")
        fig.tight_layout()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
    for w in caught:
        if "missing from font" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif not _missing_glyphs_said:
            _missing_glyphs_said = True
            logger.warning("the PNG plots show some label characters as boxes: no installed font has them. Install "
                           "a CJK font (Debian/Ubuntu: apt-get install fonts-noto-cjk); the JSON results and the "
                           "report's text are unaffected")
    plt.close(fig)
    tmp.replace(path)


def plot_loss_curves(log_history: list[dict], path: Path) -> None:
    """Training and validation loss against the step, with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk_font()

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    lr = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), ":", color="tab:gray", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="upper center", frameon=False)
    ax.legend(loc="upper right", frameon=False)
    ax.set_title("loss curves")
    _save_figure(fig, path)


def plot_confusion(name: str, m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk_font()

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
    _save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def answer_loss(model, processor, samples, batch_size: int, desc: str = "eval loss") -> float:
    """Mean loss per answer token (token-weighted over the whole set) of encoded samples.

    The one definition of validation loss: train_results.json and eval_results.json both use it.
    """
    total, count = answer_loss_sums(model, processor, samples, batch_size, desc)
    return total / count if count else float("nan")


@torch.inference_mode()
def answer_loss_sums(model, processor, samples, batch_size: int, desc: str = "eval loss") -> tuple[float, int]:
    """(summed loss over answer tokens, number of answer tokens): adds up across processes."""
    collate = Collator(processor)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch"):
        batch = [samples[j] for j in range(i, min(i + batch_size, len(samples)))]
        batch = [b for b in batch if b is not None]
        if not batch:
            continue
        inputs = {k: v.to(device) for k, v in collate(batch).items()}
        n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**inputs).loss) * n
        count += n
    model.train(was_training)
    return total, count


def perplexity(loss: float) -> float | None:
    return math.exp(min(loss, 50)) if loss == loss else None
