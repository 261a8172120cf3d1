"""How pixels enter a Qwen-VL vision tower: the patch embedding as one matrix product, and uint8 pixels normalised
inside it.

Used by:
    python main.py --task train|evaluate|inference|compare|serve   model_config.load_base -> patch_embedding_as_matmul
    python main.py --task train|evaluate   normalise_pixels_on_model (Encoder(raw_pixels=True) hands it uint8 patches)
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from losses import unwrap


def _embeddings(model):
    """The Qwen-VL patch embeddings in `model`: a Conv3d whose kernel equals its stride over flat patches."""
    for module in model.modules():
        conv = getattr(module, "proj", None)
        if (type(module).__name__.endswith("PatchEmbed") and isinstance(conv, torch.nn.Conv3d)
                and all(hasattr(module, a) for a in ("in_channels", "temporal_patch_size", "patch_size", "embed_dim"))
                and tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1
                and not any(conv.padding) and tuple(conv.dilation) == (1, 1, 1)):
            yield module


def _matmul_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    conv, affine = self.proj, self._pixel_affine  # affine: (scale, shift) per channel while uint8 pixels pass
    if type(conv) is not torch.nn.Conv3d:  # wrapped since (a LoRA adapter on it): its own forward, as shipped
        x = hidden_states.reshape(-1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)
        if affine is not None:
            scale, shift = (a.to(x.device)[None, :, None, None, None] for a in affine)
            x = x.float() * scale + shift
        return conv(x.to(conv.weight.dtype)).view(-1, self.embed_dim)
    w = conv.weight  # (embed, channel, time, patch, patch): flattened, the patch's own layout
    x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    if affine is None:
        return F.linear(x, w.reshape(w.shape[0], -1), conv.bias)
    scale, shift = (a.to(device=w.device, dtype=torch.float32) for a in affine)
    per_channel = w.reshape(w.shape[0], w.shape[1], -1).float()
    # W (x * scale + shift) + b = (W * scale) x + (W shift + b): no normalised copy of the pixels is made
    weight = (per_channel * scale[None, :, None]).reshape(w.shape[0], -1).to(w.dtype)
    bias = (per_channel.sum(-1) * shift[None, :]).sum(-1)
    if conv.bias is not None:
        bias = bias + conv.bias.float()
    return F.linear(x, weight, bias.to(w.dtype))


def patch_embedding_as_matmul(model) -> int:
    """Runs each Qwen-VL patch embedding (a Conv3d whose kernel is its stride) as the matrix product it equals.

    Why: PyTorch's Conv3d over (patches, 3, 2, 16, 16) is several times slower than the same product as a matmul
    (bench/bench_vlm_pipeline.py); vLLM made the same change. Same weights, so adapters and checkpoints are
    untouched; returns how many it changed."""
    n = 0
    for module in _embeddings(model):
        if not hasattr(module, "_pixel_affine"):
            module._pixel_affine = None
            module.forward = types.MethodType(_matmul_forward, module)
        n += 1
    return n


def normalise_pixels_on_model(model, processor) -> bool:
    """Prepares `model` to take uint8 pixel values (Encoder(raw_pixels=True)) and normalise them as they enter it,
    on its device; True when it did. Float pixel values pass through untouched.

    Why: float32 patches are 4 bytes a value, so the loader patchified, collated (and on a GPU pinned and copied) 4
    times the bytes, and the processor spent a pass over them normalising on the CPU between training steps. The
    normalisation folds into the patch embedding's weights; where the embedding is not one this module knows, the
    pixels are normalised in place as they enter. Qwen-VL processors only, whose flat patches (patches, channel x
    time x patch x patch) keep the channel outermost; any other processor keeps its float pixels (False)."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:  # a text model: nothing to import
        return False
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    except ImportError:
        return False
    body = getattr(unwrap(model), "model", None)  # the multimodal body, called as a module by the generation head
    if not isinstance(ip, Qwen2VLImageProcessor) or not hasattr(body, "visual"):
        return False
    if getattr(body, "_pixel_normaliser", None) is not None:
        return True
    mean, std = (torch.as_tensor(v if ip.do_normalize else d, dtype=torch.float32).reshape(-1).expand(3)
                 for v, d in ((ip.image_mean, 0.0), (ip.image_std, 1.0)))
    scale = (ip.rescale_factor if ip.do_rescale else 1.0) / std
    shift = -mean / std
    patch_embedding_as_matmul(body.visual)
    embeddings = list(_embeddings(body.visual))

    def enter(module, args, kwargs):
        pixels = kwargs.get("pixel_values")
        if pixels is None or pixels.dtype != torch.uint8:
            return None
        if embeddings:  # 0..255 are exact in every float type the tower runs in, bf16 included
            kwargs["pixel_values"] = pixels.to(body.visual.dtype)
            for e in embeddings:
                e._pixel_affine = (scale, shift)
            return args, kwargs
        n = pixels.shape[0]
        x = pixels.reshape(n, 3, -1).to(torch.float32)
        x.mul_(scale.to(x.device)[None, :, None]).add_(shift.to(x.device)[None, :, None])
        kwargs["pixel_values"] = x.reshape(pixels.shape)
        return args, kwargs

    def leave(module, args, kwargs, output):  # always_call: an exception must not leave the next call folded
        for e in embeddings:
            e._pixel_affine = None

    body._pixel_normaliser = (body.register_forward_pre_hook(enter, with_kwargs=True),
                              body.register_forward_hook(leave, with_kwargs=True, always_call=True))
    return True
