"""Confidence thresholds that decide which VLM answers a person must review (selective prediction).

    python main.py --task evaluate     compute() on the validation predictions -> <run>/thresholds.json
    python main.py --task inference --input DIR    flags() on every row (needs_review, review_fields)
    python main.py --task serve        flags() on every VLM answer; the doubtful ones go to the review queue

For each label-map field, and for the overall confidence (the product of the fields'), the risk-coverage curve
on held-out data: answers are accepted from the most confident down, and the threshold is the lowest
confidence at which the accepted answers are still at least review_target_accuracy correct. Where no
threshold reaches the target the field accepts nothing (coverage 0): every answer goes to review. A threshold
is only as good as the validation set behind it; the file says how many samples that was.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from outputs import write_json

logger = logging.getLogger(__name__)
OVERALL = "confidence"  # the key of the overall confidence in answers, and of its threshold here


def curve(confidences: list[float | None], correct: list[bool]) -> list[dict]:
    """The risk-coverage curve: one point per distinct confidence t (highest first) with the coverage and
    accuracy of the answers whose confidence is >= t. An answer without a confidence is never accepted."""
    n = len(confidences)
    ranked = sorted(((c, ok) for c, ok in zip(confidences, correct) if c is not None), key=lambda x: -x[0])
    points, accepted, right = [], 0, 0
    for i, (c, ok) in enumerate(ranked):
        accepted += 1
        right += ok
        if i + 1 < len(ranked) and ranked[i + 1][0] == c:
            continue  # ties are accepted together
        points.append({"threshold": c, "coverage": accepted / n, "accuracy": right / accepted, "accepted": accepted})
    return points


def choose(points: list[dict], n: int, target: float) -> dict:
    """The lowest threshold whose accepted answers reach `target` accuracy (the most coverage that does)."""
    best = None
    for p in points:
        if p["accuracy"] >= target:
            best = p
    if best is None:
        return {"threshold": None, "reached": False, "coverage": 0.0, "accuracy": None, "accepted": 0, "n": n}
    return {"threshold": best["threshold"], "reached": True, "coverage": best["coverage"],
            "accuracy": best["accuracy"], "accepted": best["accepted"], "n": n}


def compute(rows: list[dict], fields: list[str], target: float) -> dict:
    """Thresholds from evaluate's prediction rows (prediction, target, field_confidence, confidence)."""
    out = {"target_accuracy": target, "num_samples": len(rows), "fields": {}}

    def same(pred, truth, name):
        return isinstance(pred, dict) and name in pred and json.dumps(pred[name]) == json.dumps(truth.get(name))

    for name in fields:
        conf = [(r.get("field_confidence") or {}).get(name) for r in rows]
        ok = [same(r.get("prediction"), r["target"], name) for r in rows]
        points = curve(conf, ok)
        out["fields"][name] = {**choose(points, len(rows), target), "curve": points}
    conf = [r.get("confidence") if isinstance(r.get("confidence"), (int, float)) else None for r in rows]
    ok = [all(same(r.get("prediction"), r["target"], f) for f in fields) for r in rows]
    points = curve(conf, ok)
    out[OVERALL] = {**choose(points, len(rows), target), "curve": points}
    return out


def write(path: Path, thresholds: dict, adapter_revision: str | None) -> None:
    write_json(path, {**thresholds, "adapter_revision": adapter_revision,
                      "computed": time.strftime("%Y-%m-%dT%H:%M:%S")})


def path(cfg) -> Path:
    """The run's thresholds.json (thresholds_original_model.json for the base model)."""
    return cfg.run_dir / ("thresholds_original_model.json" if cfg.use_original_model else "thresholds.json")


def load(path: Path, adapter_revision: str | None = None) -> dict | None:
    """thresholds.json, or None (said once) when there is none: then every answer needs review."""
    if not path.is_file():
        logger.warning("no %s: every answer is marked needs_review; run `python main.py --task evaluate` to compute "
                       "the thresholds", path)
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["fields"], data[OVERALL]  # noqa: B018 - the two parts every use needs
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s is not readable (%s): every answer is marked needs_review; run evaluate again", path, e)
        return None
    if adapter_revision and data.get("adapter_revision") not in (None, adapter_revision):
        logger.warning("%s was computed for an earlier adapter (revision %s, now %s): run evaluate again for "
                       "thresholds of this one", path, data.get("adapter_revision"), adapter_revision)
    return data


def flags(field_confidence: dict | None, confidence: float | None, thresholds: dict | None) -> dict:
    """{"needs_review", "review_fields"}: the fields (and "confidence" for the overall one) under their threshold.
    No thresholds, or an answer without confidences: it needs review."""
    if thresholds is None or not field_confidence:
        return {"needs_review": True, "review_fields": sorted(thresholds["fields"]) + [OVERALL]
                if thresholds else [OVERALL]}
    doubtful = []
    for name, t in thresholds["fields"].items():
        c = field_confidence.get(name)
        if c is None or t["threshold"] is None or c < t["threshold"]:
            doubtful.append(name)
    t = thresholds[OVERALL]
    if confidence is None or t["threshold"] is None or confidence < t["threshold"]:
        doubtful.append(OVERALL)
    return {"needs_review": bool(doubtful), "review_fields": doubtful}


def summary(thresholds: dict) -> str:
    parts = []
    for name, t in [*thresholds["fields"].items(), (f"overall {OVERALL}", thresholds[OVERALL])]:
        parts.append(f"{name} >= {t['threshold']:.4f}: coverage {t['coverage']:.2f}, accuracy {t['accuracy']:.3f}"
                     if t["reached"] else f"{name}: not reached (coverage 0)")
    return (f"review thresholds for accuracy {thresholds['target_accuracy']:g} on {thresholds['num_samples']} "
            "validation samples: " + "; ".join(parts))
