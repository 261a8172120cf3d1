"""Where a VLM training step's time goes: image decode, the processor, the model; and what a pixel cache would buy.

    python bench/bench_vlm_pipeline.py [--sides 448,896] [--images 48] [--steps 8] [--json out.json]

For each square side (448: 196 image tokens, 896: 784 with Qwen3-VL's 32x32 pixels per token) it writes photo-like
JPEG images (noise over gradients, quality 90), named so that data/vlm_shapes' label map reads them, then measures:

  the patch embedding over a batch of 4 images' patches, PyTorch's Conv3d against the matmul it equals (all cores);
  per sample, single-threaded as the Trainer's main process runs it (dataloader_num_workers 0): decoding the file
  (`data_processing.load_image`) and the whole encoding LazyImageDataset does per draw (decode, the Qwen3-VL
  processor's resize, normalise and patchify, the chat template, tokenising), once as the processor ships (float32
  patches) and once as training runs it (uint8 patches, normalised later on the model's device);
  the alternative of a cache of processed (uint8) samples on disk: the bytes one takes (torch.save) and the time to
  load it back (torch.load, weights_only, from the page cache: the best case);
  per training step, on the trainer `python main.py --task train` builds (bench/bench_vlm_train.py's settings: the
  tiny Qwen3-VL with the real processor bounds, LoRA r=16 on the language model, batch 4, float32, all cores):
  the time to draw a batch from the Trainer's own data loader, the forward pass with the loss (and the pixels'
  normalisation), the backward pass
  and the optimizer step, the first step left out; once with samples loaded in the main process (what training
  does on a CPU) and once in one worker process overlapping the step (what a GPU run does, with 2); and once in
  the second epoch, where the frozen tower's output per image is kept from the first (vision_cache_mb) and the
  samples come without pixels.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_images(folder: Path, side: int, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(side)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    paths = []
    for i in range(n):
        pixels = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.3
                  + rng.normal(0, 25, (side, side, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"{i % 3}{i // 3 % 2}_{i:03d}.jpg"  # shape and colour codes of data/vlm_shapes
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def per_sample(cfg, model: Path, paths: list[Path]) -> dict:
    import torch

    from data_loading import Example
    from data_processing import Encoder, load_image
    from model_config import load_processor

    processor = load_processor(cfg, str(model), "train")
    enc, as_bytes = Encoder(processor, cfg), Encoder(processor, cfg, raw_pixels=True)
    for e in (enc, as_bytes):
        e(Example(prompt="", target='{"a": 1}', image=str(paths[0])))  # warm-up
    decode, whole, raw, load, size = [], [], [], [], []
    for path in paths[:16]:
        t = time.perf_counter()
        load_image(str(path))
        decode.append(time.perf_counter() - t)
        t = time.perf_counter()
        sample = enc(Example(prompt="", target='{"a": 1}', image=str(path)))
        whole.append(time.perf_counter() - t)
        t = time.perf_counter()
        sample = as_bytes(Example(prompt="", target='{"a": 1}', image=str(path)))  # what a cache would hold
        raw.append(time.perf_counter() - t)
        buf = io.BytesIO()
        torch.save(sample, buf)
        size.append(buf.tell())
        data = buf.getvalue()
        t = time.perf_counter()
        torch.load(io.BytesIO(data), weights_only=True)
        load.append(time.perf_counter() - t)
    ms = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    return {"image_tokens": int(sample["image_grid_thw"].prod()) // 4, "decode_ms": ms(decode),
            "encode_ms": ms(whole), "encode_uint8_ms": ms(raw), "cache_load_ms": ms(load),
            "cache_mb": round(statistics.median(size) / 2**20, 2),
            "jpeg_kb": round(statistics.median(p.stat().st_size for p in paths[:16]) / 2**10, 1)}


def patch_embedding(side: int, images: int = 4) -> dict:
    """The Qwen3-VL patch embedding over a batch's patches, as PyTorch's Conv3d and as the matmul it equals
    (vision_tower.patch_embedding_as_matmul), at the tiny model's width (64) and Qwen3-VL-2B's (1024)."""
    import copy
    from types import SimpleNamespace

    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

    from vision_tower import patch_embedding_as_matmul

    x = torch.rand(images * (side // 16) ** 2, 3 * 2 * 16 * 16)
    res = {}
    for width in (64, 1024):
        conv = Qwen3VLVisionPatchEmbed(SimpleNamespace(patch_size=16, temporal_patch_size=2, in_channels=3,
                                                       hidden_size=width))
        matmul = copy.deepcopy(conv)
        assert patch_embedding_as_matmul(matmul) == 1
        for name, module in (("conv", conv), ("matmul", matmul)):
            times = []
            with torch.no_grad():
                for i in range(12):
                    t = time.perf_counter()
                    module(x)
                    if i >= 2:
                        times.append(time.perf_counter() - t)
            res[f"{name}_{width}_ms"] = round(1000 * statistics.median(times), 2)
    return res


def per_step(model: Path, images: Path, side: int, out: Path, steps: int, workers: int,
             second_epoch: bool = False) -> dict:
    import torch
    from bench_vlm_train import _cfg

    import train

    state = train._setup(_cfg(model, images, side, out))
    trainer = state.trainer
    trainer.args.dataloader_num_workers = workers
    net = trainer.model.train()
    optimizer = trainer.create_optimizer()
    loader = iter(trainer.get_train_dataloader())
    if len(trainer.train_dataset) < (steps + 1) * trainer.args.per_device_train_batch_size:
        raise SystemExit(f"--images: too few for {steps + 1} steps of one epoch")
    if second_epoch:  # one whole epoch first: every image's tower output is then kept (vision_cache_mb)
        with torch.no_grad():
            for batch in loader:
                net(**trainer._prepare_inputs(batch))
        loader = iter(trainer.get_train_dataloader())
    parts: dict[str, list] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = trainer._prepare_inputs(next(loader))
        t1 = time.perf_counter()
        loss = trainer.compute_loss(net, batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t4 = time.perf_counter()
        if i:  # the first step pays one-off costs (allocations, lazy initialisation)
            for key, t in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key].append(t)
    res = {f"{k}_ms": round(1000 * statistics.median(v), 1) for k, v in parts.items()}
    res["step_ms"] = round(sum(res.values()), 1)
    res["data_share"] = round(res["data_ms"] / res["step_ms"], 3)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="448,896")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch
    from bench_vlm_train import _cfg, build_model

    from main import _keep_freed_memory

    _keep_freed_memory()  # as main.py runs every task

    tmp = Path(tempfile.mkdtemp(prefix="bench_vlm_pipeline_"))
    model = build_model(tmp / "tiny-qwen3-vl")
    results = {}
    for side in (int(s) for s in args.sides.split(",")):
        folder = tmp / f"images-{side}"
        paths = make_images(folder, side, args.images)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the main process encodes samples between steps
        sample = per_sample(_cfg(model, folder, side, tmp / "unused"), model, paths)
        torch.set_num_threads(threads)
        results[side] = {**sample, **patch_embedding(side),
                         **per_step(model, folder, side, tmp / f"run-{side}", args.steps, 0)}
        with_worker = per_step(model, folder, side, tmp / f"run-{side}-worker", args.steps, 1)
        results[side].update({f"worker_{k}": v for k, v in with_worker.items()})
        cached = per_step(model, folder, side, tmp / f"run-{side}-cached", args.steps, 0, second_epoch=True)
        results[side].update({f"cached_{k}": v for k, v in cached.items()})
        print(side, results[side], file=sys.stderr)
    print("\n| image | image tokens | decode ms | encoding ms, float32 | encoding ms, uint8 "
          "| cached sample MB (JPEG KB) | cache load ms |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side}x{side} | {r['image_tokens']} | {r['decode_ms']} | {r['encode_ms']} | {r['encode_uint8_ms']} "
              f"| {r['cache_mb']} ({r['jpeg_kb']}) | {r['cache_load_ms']} |")
    print("\n| image | patches of 4 images | Conv3d ms, width 64 | matmul ms, width 64 | Conv3d ms, width 1024 "
          "| matmul ms, width 1024 |")
    print("|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {side}x{side} | {4 * (side // 16) ** 2} | {r['conv_64_ms']} | {r['matmul_64_ms']} | "
              f"{r['conv_1024_ms']} | {r['matmul_1024_ms']} |")
    print("\n| image | loading | step ms | data ms (share) | forward ms | backward ms | optimizer ms |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        for label, pre in (("main process", ""), ("1 worker process", "worker_"),
                           ("main process, 2nd epoch (tower output kept)", "cached_")):
            print(f"| {side}x{side} | {label} | {r[pre + 'step_ms']} | {r[pre + 'data_ms']} "
                  f"({100 * r[pre + 'data_share']:.0f}%) | {r[pre + 'forward_ms']} | {r[pre + 'backward_ms']} | "
                  f"{r[pre + 'optimizer_ms']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
