"""How pixels enter a Qwen-VL vision tower, and how often: the patch embedding as one matrix product, uint8 pixels
normalised inside it, and a frozen tower's output kept per image so that it runs once per image in a run.

Used by:
    python main.py --task train|evaluate|inference|compare|serve   model_config.load_base -> patch_embedding_as_matmul
    python main.py --task train|evaluate   normalise_pixels_on_model (Encoder(raw_pixels=True) hands it uint8 patches)
    python main.py --task train            cache_vision_features (--vision_cache_mb; LazyImageDataset names images)
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

from losses import multimodal_body


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
    # Its own forward, as shipped, where the convolution was wrapped since (a LoRA adapter on it) or its weight is
    # partitioned (DeepSpeed ZeRO-3 gathers a module's weights when that module itself is called).
    if type(conv) is not torch.nn.Conv3d or conv.weight.numel() == 0 or hasattr(conv.weight, "ds_id"):
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
    body = multimodal_body(model)
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
        x = pixels.reshape(n, 3, pixels.shape[-1] // 3).to(torch.float32)
        x.mul_(scale.to(x.device)[None, :, None]).add_(shift.to(x.device)[None, :, None])
        kwargs["pixel_values"] = x.reshape(pixels.shape)
        return args, kwargs

    def leave(module, args, kwargs, output):  # always_call: an exception must not leave the next call folded
        for e in embeddings:
            e._pixel_affine = None

    body._pixel_normaliser = (body.register_forward_pre_hook(enter, with_kwargs=True),
                              body.register_forward_hook(leave, with_kwargs=True, always_call=True))
    return True


class FeatureCache:
    """The vision tower's output per image (a key per image file), for the rest of the run, in host memory.

    Entries are never evicted: a key once present stays, so a dataset that sees the cache (or a worker process's
    snapshot of it) may leave out the pixels of a cached image and trust the model to have its features."""

    SLAB = 64 * 2**20

    def __init__(self, budget_mb: int):
        self.budget, self.used, self.entries = budget_mb * 2**20, 0, {}
        self.output_type, self.fields = None, ()
        self.computed = self.reused = 0
        self.slab, self.offset = None, 0

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def __getstate__(self):  # a spawned loader worker gets an empty cache, so its samples keep their pixels
        return {"budget_mb": self.budget // 2**20}

    def __setstate__(self, state):
        self.__init__(state["budget_mb"])

    def put(self, key: int, parts: list) -> None:
        sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in parts]  # 64-byte aligned views
        if key in self.entries or self.used + sum(sizes) > self.budget:
            return
        stored = []
        for t, size in zip(parts, sizes):
            stored.append(self._room(size)[:t.numel() * t.element_size()].view(t.dtype).view(t.shape))
            stored[-1].copy_(t.detach())
        self.entries[key] = stored
        self.used += sum(sizes)

    def _room(self, size: int) -> torch.Tensor:
        """Entries live in 64 MB slabs, not in tensors of their own: small long-lived blocks scattered between a
        training step's large short-lived ones would make the heap grow, and each step page-fault, all epoch."""
        if self.slab is None or self.offset + size > len(self.slab):
            # Pageable, not pinned: pinned pages are taken from the whole machine (every DDP rank would pin its
            # own budget) and a step copies only its own images' features to the GPU.
            self.slab, self.offset = torch.empty(max(self.SLAB, size), dtype=torch.uint8), 0
        view = self.slab[self.offset:self.offset + size]
        self.offset += size
        return view


def machine_processes() -> int:
    """Training processes on this machine (torchrun and accelerate set LOCAL_WORLD_SIZE): vision_cache_mb is the
    machine's budget, shared by them."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def image_key(path: str) -> int:
    """The cache's key for an image file within one run (its settings and files do not change mid-run)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little") >> 1


def cache_vision_features(model, budget_mb: int) -> FeatureCache | None:
    """Keeps a frozen vision tower's output per image so it runs once per image in a run, not once per epoch;
    None where it cannot (no budget, a tower that trains, a model without `mm_encoder_outputs`).

    Batches carry `image_keys` and `image_omitted` (LazyImageDataset adds them); a pre-hook on the multimodal body
    runs the tower on the images it has not seen, and hands the body every image's features through transformers'
    own `mm_encoder_outputs` argument instead of the pixels. Why here: a frozen tower's output is a function of the
    pixels alone, and Trainer re-runs it each epoch (no peer caches it)."""
    import inspect

    body = multimodal_body(model)
    if budget_mb <= 0 or not hasattr(body, "visual") or not hasattr(body, "get_image_features"):
        return None
    if any(p.requires_grad for p in body.visual.parameters()):
        return None
    if "mm_encoder_outputs" not in inspect.signature(body.forward).parameters:
        return None
    cache = FeatureCache(budget_mb // machine_processes())

    def lookup(module, args, kwargs):
        keys, omitted = kwargs.pop("image_keys", None), kwargs.pop("image_omitted", None)
        if keys is None:
            return None if omitted is None else (args, kwargs)
        pixels, grid = kwargs.get("pixel_values"), kwargs["image_grid_thw"]
        keys, omitted, patches = keys.tolist(), omitted.tolist(), grid.prod(-1).tolist()
        todo, rows, start = [], [], 0
        for i, (key, left_out) in enumerate(zip(keys, omitted)):
            if left_out:
                continue
            if key not in cache:
                todo.append(i)
                rows.append(pixels[start:start + patches[i]])
            start += patches[i]
        fresh = {}
        if todo:
            with torch.no_grad():
                fed = pixels if len(todo) == len(keys) else torch.cat(rows)  # every image new: no copy
                out = body.get_image_features(fed, grid[todo], return_dict=True)
            cache.output_type = type(out)
            cache.fields = tuple(f for f in ("pooler_output", "deepstack_features") if getattr(out, f, None))
            for j, i in enumerate(todo):
                parts = [out.pooler_output[j]] + [layer[j] for layer in getattr(out, "deepstack_features", None) or []]
                fresh[keys[i]] = parts
                cache.put(keys[i], parts)
            cache.computed += len(todo)
        device = grid.device
        missing = [k for k in keys if k not in fresh and k not in cache]
        if missing:  # the dataset left pixels out that the cache never held: a bug, not the user's
            raise RuntimeError(f"vision features of {len(missing)} images were neither in the batch nor cached")
        features = [fresh.get(k) or [t.to(device, non_blocking=True) for t in cache.entries[k]] for k in keys]
        cache.reused += len(keys) - len(todo)
        values = {"pooler_output": tuple(f[0] for f in features)}
        if "deepstack_features" in cache.fields:
            values["deepstack_features"] = [tuple(f[1 + n] for f in features) for n in range(len(features[0]) - 1)]
        kwargs["pixel_values"] = None
        kwargs["mm_encoder_outputs"] = {"image": cache.output_type(**values)}
        return args, kwargs

    body._feature_cache = body.register_forward_pre_hook(lookup, with_kwargs=True)
    return cache
