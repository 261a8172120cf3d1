"""Padding-free packing: the samples of a batch concatenated into one row, each attending only to itself.

    python main.py --task train [--packing auto|true|false]

`auto` (the default) packs wherever that check passes: a packed epoch is the random-batch epoch without its
padding, the same losses (BENCHMARKS.md). Length grouping (`group_by_length: true`, which `auto` then yields to)
is faster still on SDPA and eager, whose dense block-diagonal mask makes a packed row of n tokens cost n^2 in
attention, but it changes the batches and so what is learned.

The collator is transformers' `DataCollatorWithFlattening`: one row of token ids whose `position_ids` restart at
0 with every sample, no attention mask, and -100 as the first label of each sample (no loss across a boundary).
What keeps samples apart is the model, not the collator: FlashAttention-2 turns restarting positions into varlen
boundaries, and transformers 5 builds a block-diagonal mask from them for SDPA and eager attention
(`masking_utils.find_packed_sequence_indices`). A model whose forward ignores `position_ids` for its mask (OPT
builds its positions and mask from the attention mask) would let samples attend to each other silently, so
packing is not assumed from the architecture: `keeps_samples_apart` runs the model once on a packed pair before
training and `packing: true` is refused where the second sample's logits change.
"""

from __future__ import annotations

import logging

import torch

from data_processing import IGNORE_INDEX

logger = logging.getLogger(__name__)

# A packed sample counts as isolated when its logits differ from the sample run alone by under this share of what
# running it after the other sample with continuous positions (true cross-attention) changes; the ratio is free
# of the dtype's rounding (float32: about 1e-6, bfloat16 kernels: about 1e-2).
_ISOLATION_RATIO = 0.1


def packed_collator():
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def keeps_samples_apart(model) -> tuple[bool, float]:
    """Whether `model` keeps the samples of a packed row from attending to each other, measured: two short random
    sequences run packed (positions restarting) against the second run alone. -> (isolated, ratio)"""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, min(vocab, 1000), (n,), generator=gen) for n in (7, 5))
    row = torch.cat([first, second])[None].to(device)
    restart = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    training = model.training
    model.eval()  # no dropout: the three runs must differ by attention alone
    try:
        with torch.no_grad():
            alone = model(input_ids=second[None].to(device)).logits[0].float()
            packed = model(input_ids=row, position_ids=restart).logits[0, 7:].float()
            mixed = model(input_ids=row, position_ids=torch.arange(12, device=device)[None]).logits[0, 7:].float()
    finally:
        model.train(training)
    leak, reference = (packed - alone).norm().item(), (mixed - alone).norm().item()
    ratio = leak / max(reference, 1e-12)
    return ratio < _ISOLATION_RATIO or leak <= 1e-6 * alone.norm().item(), ratio
