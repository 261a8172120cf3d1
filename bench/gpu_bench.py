"""GPU benchmark: random-initialised full-size Qwen3-1.7B and Qwen3-VL-2B (built from their configs, no
download), LoRA r=16 on all linear layers with gradient checkpointing, through this project's loading code.

    python bench/gpu_bench.py [--json out.json]          one NVIDIA GPU; about 5 minutes on an H200
    python bench/gpu_bench.py --levers                   MFU levers: answer-only logits, fused loss, no checkpointing

Rows: Qwen3-1.7B in fp32 / bf16 / 8-bit / 4-bit at batch 4 x 512 tokens (peak memory per precision), bf16 LoRA and
4-bit QLoRA over a batch x length grid (tokens/s), and Qwen3-VL-2B with one 448x448 image per sample (196 image
tokens) in bf16 / 8-bit / 4-bit. MFU = (4N + 6N_lora + 6 L s d) FLOPs per token x tokens/s / 989 TFLOP/s (the
H100/H200 dense bf16 peak); N counts every base parameter, L layers, s sequence length, d attention width.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, run_child  # noqa: E402
from memory import ratios, table  # noqa: E402

MEMORY = str(Path(__file__).resolve().parent / "memory.py")
PLAN = [  # (arch, precision, grid)
    ("qwen3", "fp32", "4x512"),
    ("qwen3", "8bit", "4x512"),
    ("qwen3", "bf16", "4x512,1x512,1x2048,4x2048,8x2048"),
    ("qwen3", "4bit", "4x512,1x512,1x2048,4x2048,8x2048"),
    ("qwen3_vl", "bf16", "2x1024"),
    ("qwen3_vl", "8bit", "2x1024"),
    ("qwen3_vl", "4bit", "2x1024"),
]
# MFU levers (`--levers`): Qwen3-1.7B bf16, half of each sequence is answer (labels), the rest prompt.
LEVERS = [  # (loss path, gradient checkpointing)
    ("masked", True),     # the model's own loss over all logits (the baseline)
    ("answer", True),     # answer-only logits
    ("fused", True),      # fused linear cross-entropy (liger when installed, else torch)
    ("fused", False),     # ... and no gradient checkpointing (memory allowing)
]


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated archs to run")
    p.add_argument("--levers", action="store_true", help="instead: the MFU levers on Qwen3-1.7B bf16 (LEVERS)")
    p.add_argument("--grid", default="4x2048,1x512", help="with --levers: batch x length pairs")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA GPU; bench/memory.py measures on the CPU")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    rows = []
    if args.levers:
        build_model("qwen3", "full", work / "qwen3-full", device="cuda")
        for loss, ckpt in LEVERS:
            rows += run_child(MEMORY, ["--child", "qwen3", "bf16", loss, "--device", "cuda", "--preset", "full",
                                       "--grid", args.grid, "--steps", str(args.steps), "--workdir", str(work),
                                       "--answer_share", "0.5"] + ["--no_checkpointing"] * (not ckpt))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print(table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    for arch, precision, grid in PLAN:
        if args.only and arch not in args.only.split(","):
            continue
        build_model(arch, "full", work / f"{arch}-full", device="cuda")
        rows += run_child(MEMORY, ["--child", arch, precision, "full", "--device", "cuda", "--preset", "full",
                                   "--grid", grid, "--steps", str(args.steps), "--workdir", str(work)])
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(ratios(rows, "qwen3", (4, 512)))
    print(ratios(rows, "qwen3_vl", (2, 1024)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
