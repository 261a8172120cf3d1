"""Peak memory and step time of LoRA training per base precision: fp32, bf16, 8-bit, 4-bit.

    python bench/memory.py                                   CPU: a random 8-layer 1024-wide Qwen3 (~140M parameters)
    python bench/memory.py --device cuda --preset full --arch qwen3,qwen3_vl     GPU: Qwen3-1.7B / Qwen3-VL-2B shapes
    python bench/memory.py --arch qwen3_vl --precisions bf16 --image_sides 224,448,672,896
                                            VLM peak memory per image resolution (one image per sample, batch 1,
                                            the image's tokens plus 128 text tokens; image_min/max_pixels = side^2)

Each precision runs in its own process, loading the model through model_config.load_base exactly as
`python main.py --task train` does (bitsandbytes for 8/4-bit, LoRA r=16 on all linear layers, gradient
checkpointing). Reported: the model's weights (parameter and buffer bytes, 4-bit counted packed), the run's
peak (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS above the process's RSS after importing the
libraries) and the mean time of 3-5 optimizer steps (after one warm-up step).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, measure, run_child  # noqa: E402


def table(rows: list[dict]) -> str:
    mfu = any("mfu" in r for r in rows)
    head = ("| model | precision | loss | ckpt | image | batch x length | model weights MB | peak MB | step s | "
            "tokens/s |")
    head += " MFU |" if mfu else ""
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mfu else "")]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('arch', '')} | {r.get('precision', r.get('args', ''))} | | | "
                         f"| {r.get('batch', '')}x{r.get('length', '')} | error: {r['error']} | | | |")
            continue
        gpu = "peak_gpu_memory_mb" in r
        loaded = r["weights_mb"]
        peak = r["peak_gpu_memory_mb"] if gpu else r["peak_over_baseline_mb"]
        lines.append(f"| {r['arch']} ({r['params'] / 1e6:.0f}M) | {r['precision']} | {r.get('loss_path', 'full')} | "
                     f"{'yes' if r.get('checkpointing', True) else 'no'} | {_image(r)} | {r['batch']}x{r['length']} | "
                     f"{loaded:.0f} | {peak:.0f} | {r['step_seconds']:.3f} | {r['tokens_per_second']:.0f} |"
                     + (f" {100 * r['mfu']:.1f}% |" if mfu else ""))
    return "\n".join(lines)


def _image(r: dict) -> str:
    side = r.get("image_side")
    return f"{side}x{side} ({(side // 32) ** 2} tokens)" if side and r.get("arch") == "qwen3_vl" else ""


def ratios(rows: list[dict], arch: str, shape: tuple) -> str:
    """Weights and peak memory of 8-bit and 4-bit relative to bf16, for rows of one batch x length."""
    base = {r["precision"]: r for r in rows if r.get("arch") == arch and "error" not in r
            and r.get("loss_path", "full") == "full"
            and (shape == (None, None) or (r["batch"], r["length"]) == shape)}
    if not {"bf16", "8bit", "4bit"} <= set(base):
        return ""
    peak = "peak_gpu_memory_mb" if "peak_gpu_memory_mb" in base["bf16"] else "peak_over_baseline_mb"
    part = [f"{name}: {k} / 16-bit = {base[b][key] / base['bf16'][key]:.2f}"
            for name, key in (("model weights", "weights_mb"), ("training peak", peak))
            for k, b in (("8-bit", "8bit"), ("4-bit", "4bit"))]
    return f"\n{arch}: " + ", ".join(part)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="mid", choices=["mid", "vocab", "full"])
    p.add_argument("--losses", default="full", help="comma-separated loss paths: full, masked, answer, fused")
    p.add_argument("--answer_share", type=float, default=0.5, help="share of each sequence that carries labels")
    p.add_argument("--no_checkpointing", action="store_true", help="train without gradient checkpointing")
    p.add_argument("--arch", default="qwen3")
    p.add_argument("--precisions", default="fp32,bf16,8bit,4bit")
    p.add_argument("--grid", default="2x256", help="batch x length pairs, e.g. 1x512,4x2048")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--image_sides", default="448", help="VLM: comma-separated square image sides in pixels; each "
                   "runs batch 1 at its image tokens + 128 (--grid is then ignored)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=4, metavar=("ARCH", "PRECISION", "LOSS", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_mem_"))
    if args.child:
        arch, precision, loss, side = args.child
        side = int(side)
        grid = [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
        if arch == "qwen3_vl" and "--image_sides" in sys.argv:
            grid = [(1, (side // 32) ** 2 + 128)]  # Qwen3-VL: one image token per 32x32 pixels
        rows = measure(work / f"{arch}-{args.preset}", arch, precision, args.device, grid, steps=args.steps,
                       loss=loss, answer_share=args.answer_share, checkpointing=not args.no_checkpointing,
                       image_side=side)
        for row in rows:
            row["image_side"] = side
        print("RESULT " + json.dumps(rows))
        return 0
    rows = []
    for arch in args.arch.split(","):
        build_model(arch, args.preset, work / f"{arch}-{args.preset}", device=args.device)
        sides = args.image_sides.split(",") if arch == "qwen3_vl" else ["448"]
        for precision in args.precisions.split(","):
            for loss in args.losses.split(","):
                for side in sides:
                    rows += run_child(__file__, ["--child", arch, precision, loss, side, "--device", args.device,
                                                 "--preset", args.preset, "--grid", args.grid, "--steps",
                                                 str(args.steps), "--workdir", str(work), "--answer_share",
                                                 str(args.answer_share)]
                                      + ["--no_checkpointing"] * args.no_checkpointing
                                      + ["--image_sides", args.image_sides] * ("--image_sides" in sys.argv[1:]))
                    print(rows[-1], file=sys.stderr)
    print(table(rows))
    for arch in args.arch.split(","):
        print(ratios(rows, arch, (None, None)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
