"""Shaping the VLM training set: class balancing over label codes and online image augmentation.

    python main.py --task train --model_type vlm --balance oversample
    python main.py --task train --model_type vlm --balance weighted --augmentation hflip,color --augmentation_p 0.5

Both touch the training split only; validation, evaluate and inference never see them. Both are seeded
(`seed`): the same run draws the same copies, samples and transforms.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

from config import Config, UserError
from data_files import Example, label_code

logger = logging.getLogger(__name__)

# name -> what it does and which labels it can falsify (the README repeats the warnings)
AUGMENTATIONS = {
    "hflip": "mirror left-right (wrong if a label depends on left/right)",
    "vflip": "mirror top-bottom (wrong if a label depends on up/down, e.g. a jet's direction)",
    "rotate": "rotate up to 10 degrees (wrong for orientation labels)",
    "crop": "zoom into a random crop of 80-100% and resize back (can cut a small defect out of the frame)",
    "color": "jitter brightness, contrast and saturation by 20% (wrong for day/night, colour or lighting labels)",
    "blur": "Gaussian blur, sigma 0.1-1.5 (wrong for focus or sharpness labels)",
}


def _code(e: Example) -> str:
    return label_code(Path(e.image)) if e.image else ""


def _counts(examples: list[Example]) -> str:
    return ", ".join(f"{code}: {n}" for code, n in sorted(Counter(map(_code, examples)).items()))


def balance(examples: list[Example], cfg: Config) -> tuple[list[Example], list[float] | None]:
    """-> (training examples, per-sample weights for a weighted sampler or None). `oversample` repeats images of
    rarer codes (seeded choice) until every code has as many as the most common; `weighted` keeps the set and
    draws each code equally often in expectation."""
    if cfg.balance == "none":
        return examples, None
    if cfg.model_type != "vlm":
        raise UserError("`balance` works over VLM label codes; set balance: none for model_type llm")
    counts = Counter(map(_code, examples))
    logger.info("balance %s: label codes in the training split before: %s", cfg.balance, _counts(examples))
    if cfg.balance == "weighted":
        weights = [1.0 / counts[_code(e)] for e in examples]
        total = sum(weights)
        share = {code: sum(w for e, w in zip(examples, weights) if _code(e) == code) / total for code in counts}
        logger.info("balance weighted: expected draws per epoch of %d: %s", len(examples),
                    ", ".join(f"{c}: {share[c] * len(examples):.1f}" for c in sorted(share)))
        return examples, weights
    rng = random.Random(cfg.seed)
    top = max(counts.values())
    out = list(examples)
    for code in sorted(counts):
        members = [e for e in examples if _code(e) == code]
        out += [rng.choice(members) for _ in range(top - len(members))]
    logger.info("balance oversample: after: %s (%d samples, was %d)", _counts(out), len(out), len(examples))
    return out, None


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
