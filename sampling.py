"""How training draws its samples: batches of similar length, and for VLMs class balancing over label codes
(oversampled copies or a weighted sampler).

    python main.py --task train [--group_by_length true|false]
    python main.py --task train --model_type vlm --balance oversample
    python main.py --task train --model_type vlm --balance weighted

All touch the training split only; validation, evaluate and inference never see them. All are seeded
(`seed`): the same run draws the same batches, copies and samples, resumed or not. (Image augmentation, applied
when a sample is encoded, is in data_processing.py.)
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

import torch

from config import Config, UserError
from data_loading import Example, label_code

logger = logging.getLogger(__name__)

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


_GROUP_ABOVE = 0.10  # group_by_length auto: the share of padding that random batches must exceed
_WINDOW = 8  # batches sorted together


def _padding_share(lengths: list[int], batch: int, grouped: bool, draws: int = 5) -> float:
    """Padding tokens over all tokens of an epoch's batches, random or grouped by LengthGroupedSampler; seeded
    generators of its own, so that estimating does not move the training's random stream."""
    padded = 0
    for seed in range(draws):
        order = list(LengthGroupedSampler(lengths, batch, seed=seed)) if grouped else \
            torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        padded += sum(max(lengths[i] for i in order[k:k + batch]) * len(order[k:k + batch])
                      for k in range(0, len(order), batch))
    return 1 - draws * sum(lengths) / padded if padded else 0.0


def use_grouping(choice: str, lengths: list[int], batch: int) -> bool:
    """Whether to batch by length. Grouping makes batches less varied (on the SmolLM2 demo, where random batches
    pad only 5.5% of the tokens, it cost 0.016 validation loss: BENCHMARKS.md), so `auto` groups only where padding
    is a real cost."""
    if choice != "auto" or batch < 2 or len(lengths) <= batch:
        return choice == "true"
    random_share = _padding_share(lengths, batch, grouped=False)
    group = random_share > _GROUP_ABOVE
    logger.info("group_by_length auto: random batches of %d would pad %.0f%% of the tokens, grouped ones %.0f%%: "
                "%s", batch, 100 * random_share, 100 * _padding_share(lengths, batch, grouped=True),
                "grouping by length" if group else f"random batches (grouping above {_GROUP_ABOVE:.0%})")
    return group


class _EpochSeeded(torch.utils.data.Sampler):
    """A sampler whose order is a function of (seed, epoch) alone: a resumed run draws what the uninterrupted
    run drew, and every process of a distributed run draws the same."""

    def __init__(self, size: int, seed: int):
        super().__init__()
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)


class LengthGroupedSampler(_EpochSeeded):
    """Batches of samples of similar length, in random order: less padding without a length curriculum.

    The epoch is shuffled and cut into windows of `window` batches; each window is sorted by length and cut into
    batches, and the batches are shuffled (the one holding the longest sample goes first, so that running out of
    memory shows at step 1). transformers' own sampler sorts windows of 50 batches: on a data set of fewer than
    50 batches the whole epoch then runs from the longest samples to the shortest, every epoch. Windows of 8
    batches keep most of the saving (SmolLM2 demo, batch 4: 5.5% of the tokens padding in random batches, 1.0%
    in windows of 8, 0.2% fully sorted). `batch_size` is the samples per optimizer step (per-device
    batch x gradient accumulation), as the Trainer groups them; a short last batch stays last so that the
    DataLoader's batches keep their boundaries. The order is a function of (seed, epoch) alone, like accelerate's
    seedable random sampler: a run resumed in mid-epoch skips exactly the batches it had trained on (torch's
    global generator, which transformers' sampler draws from, has moved on by then), and every process of a
    distributed run draws the same order."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, window: int = _WINDOW):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size, self.window = list(lengths), batch_size, window

    def __iter__(self):
        generator = self.generator()
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batches += [window[k:k + self.batch_size] for k in range(0, len(window), self.batch_size)]
        short = [b for b in batches if len(b) < self.batch_size]
        full = [b for b in batches if len(b) == self.batch_size]
        full = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda k: self.lengths[full[k][0]])
            full.insert(0, full.pop(longest))
        return iter([i for b in full + short for i in b])


class WeightedSampler(_EpochSeeded):
    """`balance: weighted`: len(weights) draws with replacement, each sample drawn with probability proportional to
    its weight. Like LengthGroupedSampler the draws are a function of (seed, epoch) alone, so a resumed run
    draws what the uninterrupted run drew (torch's WeightedRandomSampler keeps one generator running across
    epochs, which a resumed process starts afresh)."""

    def __init__(self, weights: list[float], seed: int = 0):
        super().__init__(len(weights), seed)
        self.weights = torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self):
        return iter(torch.multinomial(self.weights, len(self.weights), replacement=True,
                                      generator=self.generator()).tolist())
