"""Padding-free packing: the samples of a batch concatenated into one row, each attending only to itself.

    python main.py --task train [--packing auto|true|false]      (LLMs, and VLMs with multimodal rope positions)

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

VLMs of the Qwen-VL family number their tokens with multimodal rope: three position axes (time, height, width)
that follow each image's grid, computed by the model's `get_rope_index` from the token types and the grids. A
packed row gets them through `rope_positions_for_packed_rows`; a VLM without them is not packed.
"""

from __future__ import annotations

import logging

import torch

from data_processing import IGNORE_INDEX, join_extras
from losses import multimodal_body

logger = logging.getLogger(__name__)

# A packed sample counts as isolated when its logits differ from the sample run alone by under this share of what
# running it after the other sample with continuous positions (true cross-attention) changes; the ratio is free
# of the dtype's rounding (float32: about 1e-6, bfloat16 kernels: about 1e-2).
_ISOLATION_RATIO = 0.1


class PackedCollator:
    """transformers' `DataCollatorWithFlattening` for the text, and each sample's other tensors joined: per-token
    ones (mm_token_type_ids) into the one row, per-image ones (pixel values, grids) along the image axis.
    `multimodal`: the batch asks the model's pre-hook (`rope_positions_for_packed_rows`) for rope positions."""

    def __init__(self, multimodal: bool = False):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.multimodal = multimodal

    def __call__(self, batch: list[dict]) -> dict:
        batch = [b for b in batch if b is not None]
        result = join_extras(batch, self.flatten(batch), lambda values: torch.cat(values)[None])
        if self.multimodal:
            result["packed_samples"] = True
        return result


def has_multimodal_rope(model) -> bool:
    """Whether the model's multimodal body numbers rope positions per image grid (`get_rope_index`: Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL), which `rope_positions_for_packed_rows` needs."""
    return hasattr(multimodal_body(model), "get_rope_index")


def rope_positions_for_packed_rows(model) -> bool:
    """Lets a model with multimodal rope (`has_multimodal_rope`) take packed rows; False for any other model.

    A pre-hook on the body turns the collator's restarting positions (batch, length) into the four rows these
    models read: the text positions, which keep the samples apart in the attention mask, and the three rope axes
    of each sample as if it ran alone. Why by hand: transformers computes rope positions per padded row only."""
    if not has_multimodal_rope(model):
        return False
    body = multimodal_body(model)
    if getattr(body, "_packed_positions", None) is None:
        body._packed_positions = body.register_forward_pre_hook(_packed_rope_positions, with_kwargs=True)
    return True


def _packed_rope_positions(body, args, kwargs):
    if not kwargs.pop("packed_samples", False):
        return None
    pos, ids, types = kwargs.get("position_ids"), kwargs.get("input_ids"), kwargs.get("mm_token_type_ids")
    grids = {k: kwargs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    if pos is None or pos.dim() != 2 or ids is None or types is None or all(g is None for g in grids.values()):
        return args, kwargs  # text only: the model gives every rope axis the text positions, as it would alone
    rope, _ = body.get_rope_index(ids, types, **grids)
    # get_rope_index numbers the row as one sequence; each axis of a sample's first token (index t - pos[t]) holds
    # the offset that gave the whole sample, so subtracting it gives the positions the sample has alone.
    first = (torch.arange(pos.shape[-1], device=pos.device) - pos).clamp_min(0).to(rope.device)
    rope = rope - rope.gather(2, first[None].expand_as(rope))
    kwargs["position_ids"] = torch.cat([pos[None], rope.to(pos.device, pos.dtype)])
    return args, kwargs


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
