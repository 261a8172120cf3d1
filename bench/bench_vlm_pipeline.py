"""Where a VLM training sample's CPU time goes before the model: image decode, resize and the processor.

    python bench/bench_vlm_pipeline.py [--sides 448,896] [--images 16]

For each square side (448: 196 image tokens, 896: 784 with Qwen3-VL's 32x32 pixels per token) it writes JPEG
photos-like images (noise plus gradients, quality 90), then times, per sample and single-threaded as the
Trainer's main process runs it (dataloader_num_workers 0): decoding the file (`data_processing.load_image`), and
the whole encoding that LazyImageDataset does per draw (decode, the Qwen3-VL image processor's resize, normalise
and patchify, the chat template, tokenising). Compare with the model's step time per sample in BENCHMARKS.md
(CPU rows of the VLM memory table; H200 rows of the GPU table) to see whether the model waits on preprocessing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="448,896")
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image

    import tiny_models
    from config import build_config
    from data_loading import Example
    from data_processing import Encoder, load_image
    from model_config import load_processor

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_vlm_pipeline_"))
    model = tiny_models.build("qwen3_vl", tmp / "tiny-qwen3-vl")
    rng = np.random.default_rng(0)
    print("| image | image tokens | decode ms | whole encoding ms (decode, resize, processor, template) |")
    print("|---|---|---|---|")
    for side in (int(s) for s in args.sides.split(",")):
        cfg = build_config({"model_type": "vlm", "image_min_pixels": side * side, "image_max_pixels": side * side,
                            "max_length": 4096}, "bench")
        enc = Encoder(load_processor(cfg, str(model), "train"), cfg)
        paths = []
        for i in range(args.images):
            ramp = np.linspace(0, 255, side, dtype=np.float32)
            pixels = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.3
                      + rng.normal(0, 25, (side, side, 3))).clip(0, 255).astype(np.uint8)
            path = tmp / f"{side}_{i}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            paths.append(path)
        enc(Example(prompt="", target='{"a": 1}', image=str(paths[0])))  # warm-up
        decode, whole, tokens = [], [], 0
        for path in paths:
            t = time.perf_counter()
            load_image(str(path))
            decode.append(time.perf_counter() - t)
            t = time.perf_counter()
            sample = enc(Example(prompt="", target='{"a": 1}', image=str(path)))
            whole.append(time.perf_counter() - t)
            tokens = int(sample["image_grid_thw"].prod()) // 4
        print(f"| {side}x{side} | {tokens} | {1000 * statistics.median(decode):.1f} | "
              f"{1000 * statistics.median(whole):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
