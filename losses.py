"""The training loss without the full logits: answer-only logits and fused linear cross-entropy.

    python main.py --task train [--answer_only_logits true|false] [--fused_loss auto|torch|liger|off]

A causal LM's output layer turns every position's hidden state into a vocabulary-sized row of logits (Qwen3:
151,936 floats per token), yet only answer positions carry loss. `answer_only_loss` runs the output layer only
on the columns where some row's next token is an answer token (the model's own `logits_to_keep`).
`fused_loss` goes further: the logits are never materialised at all. The hidden states of the answer positions
are captured at the output layer's input and the loss and its gradient are computed in chunks of tokens, each
chunk's logits freed before the next (the algorithm of Liger's fused linear cross-entropy; `liger` uses its
Triton kernel on a GPU, `torch` is the same computation in plain torch and runs anywhere). Both give the loss of
the model's own loss function (tests: within 1e-5).
"""

from __future__ import annotations

import logging

import torch

from data_processing import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Config attributes of models that transform the logits after the output layer (softcapping, scaling): the fused
# path would skip that transformation, so those models keep the logits path.
_CHUNK_BYTES = 256 * 2**20
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def unwrap(model):
    """The transformers model under DDP/DeepSpeed (`.module`) and PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def multimodal_body(model):
    """The model's body under its generation head (`.model`: for a VLM the module that takes the pixels and the
    position ids, which the hooks of vision_tower.py and packing.py attach to); None where there is none."""
    return getattr(unwrap(model), "model", None)


def _answer_columns(inputs: dict):
    """(targets: the labels shifted by one, keep: the columns where some row's next token is an answer token)."""
    targets = inputs["labels"][:, 1:]
    return targets, (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """The causal-LM loss with the output layer run only where it is needed: at positions whose next token is an
    answer token in some row of the batch. Prompt positions' logits (most of a long prompt, all of the image
    tokens) are never computed. Equal to the full computation: the model's own loss function, on the same
    targets, with the same reduction. -> (loss, outputs)"""
    targets, keep = _answer_columns(inputs)
    if keep.numel() == 0:  # nothing to learn in this batch: the ordinary path
        outputs = model(**inputs)
        return outputs.loss, outputs
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    loss = unwrap(model).loss_function(logits=outputs.logits, labels=None, vocab_size=outputs.logits.shape[-1],
                                       num_items_in_batch=num_items_in_batch,
                                       shift_labels=targets[:, keep].contiguous())
    return loss, outputs


def fused_loss_backend(model, choice: str, sharded: bool) -> str | None:
    """Which fused implementation `fused_loss: choice` gives for this model: "liger", "torch" or None (the logits
    path), with the reason logged when a requested one cannot be used."""
    if choice == "off":
        return None
    base = unwrap(model)
    head = base.get_output_embeddings()
    why = None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        why = f"its output layer is a {type(head).__name__}, not a plain bias-free Linear (LoRA or quantisation on it)"
    elif any(getattr(c, a, None) not in (None, 1, 1.0) for c in _configs(base.config) for a in _LOGIT_TRANSFORMS):
        why = "the model transforms its logits after the output layer (softcapping or scaling)"
    elif sharded:
        why = "the output layer's weight is sharded (FSDP / ZeRO-3)"
    if why:
        if choice != "auto":
            logger.warning("fused_loss: %s is not used for %s: %s; the loss takes the logits path",
                           choice, type(base).__name__, why)
        return None
    liger = head.weight.is_cuda and _has_liger()
    if choice == "liger" and not liger:
        logger.warning("fused_loss: liger needs a CUDA GPU and `pip install liger-kernel`; using the torch version")
    return "liger" if liger and choice in ("auto", "liger") else "torch"


def _configs(config):
    yield config
    for name in ("text_config", "language_config"):
        if getattr(config, name, None) is not None:
            yield getattr(config, name)


def _has_liger() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def fused_answer_loss(model, inputs: dict, backend: str, num_items_in_batch=None):
    """The causal-LM loss from the hidden states of the answer positions, without materialising their logits.
    The model runs with `logits_to_keep` = the answer columns; a pre-hook on the output layer takes its input
    (the final hidden states there) and hands the layer an empty slice, so the layer itself does no work.
    -> (loss, outputs); outputs.logits is empty."""
    targets, keep = _answer_columns(inputs)
    if keep.numel() == 0:
        outputs = model(**inputs)
        return outputs.loss, outputs
    head = unwrap(model).get_output_embeddings()
    captured = []

    def take_input(_module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(take_input)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    finally:
        handle.remove()
    hidden = captured[-1]
    tgt = targets[:, keep]
    mask = tgt != IGNORE_INDEX
    hidden, tgt = hidden[mask], tgt[mask]  # only the positions with a target, not the whole kept columns
    if backend == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, tgt)
    else:
        total = _ChunkedLinearCrossEntropy.apply(hidden, head.weight, tgt)
    denominator = num_items_in_batch if num_items_in_batch is not None else tgt.numel()
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator, outputs


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), computed chunk by chunk with its gradient in the forward pass, so
    that at most one chunk of logits (in float32, as the model's loss upcasts) exists at any time. The backward
    pass only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, target):
        n = hidden.shape[0]
        vocab = weight.shape[0]
        # Chunks of at most _CHUNK_BYTES of float32 logits: small beside full logits (Qwen3, 4 x 2048 answer tokens:
        # 5 GB), yet wide enough that each chunk's matrix product reads the output weight for many rows at once
        # (row-by-row chunks, Liger's GPU rule at small hidden sizes, made CPU training 2.3x slower).
        chunk = max(1, min(n, _CHUNK_BYTES // (4 * vocab)))
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 at least, as the model's loss upcasts
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], target[start:start + chunk]
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second vocabulary-sized buffer
            grad[torch.arange(len(t), device=grad.device), t] -= 1.0
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_output.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype),
                None)
