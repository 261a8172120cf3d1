"""Generate the synthetic leak-inspection image set of the VLM demo (data/vlm/).

    python scripts/make_demo_vlm_data.py [--out data/vlm] [--per_code 6] [--size 96]

Each image shows a pipe in a dust room. The file-name prefix is the label code read through
data/vlm/label_map.json: digit 1 = status, digit 2 = sub_type, digit 3 = is_night_mode. The cues are
deliberately visible: night images are dark grey-scale (infrared), day images are in colour; a high-pressure
leak is a bright jet from the pipe, a low-pressure leak a soft cloud beside it, ambient dust is speckle over
the whole frame, light beams are diagonal bright bands. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# (status, sub_type) pairs that make sense: no leak with normal/dust/beams, leak with high/low pressure.
CODES = ["00", "01", "02", "13", "14"]


def draw(code: str, night: bool, size: int, rng: random.Random) -> Image.Image:
    bg = (rng.randint(150, 190), rng.randint(140, 170), rng.randint(110, 140))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    y = rng.randint(size // 3, size // 2)
    pipe = (rng.randint(40, 80), rng.randint(80, 110), rng.randint(120, 160))
    d.rectangle([0, y, size, y + size // 8], fill=pipe)
    joint = rng.randint(size // 4, 3 * size // 4)
    d.rectangle([joint - 3, y - 2, joint + 3, y + size // 8 + 2], fill=(60, 60, 60))
    sub = code[1]
    if sub == "1":  # ambient dust: speckle everywhere
        for _ in range(size * 3):
            x0, y0 = rng.randrange(size), rng.randrange(size)
            d.point((x0, y0), fill=(235, 230, 220))
    elif sub == "2":  # light beams: diagonal bright bands
        for k in range(2):
            x0 = rng.randint(-size // 2, size // 2) + k * size // 2
            d.polygon([(x0, 0), (x0 + 10, 0), (x0 + 10 + size, size), (x0 + size, size)], fill=(250, 245, 200))
    elif sub == "3":  # high-pressure leak: a narrow bright jet from the joint
        top = y - rng.randint(size // 4, size // 3)
        d.polygon([(joint - 2, y), (joint + 2, y), (joint + 9, top), (joint - 9, top)], fill=(255, 255, 255))
    elif sub == "4":  # low-pressure leak: a soft cloud hugging the joint
        r = size // 6
        d.ellipse([joint - r, y - r - 4, joint + r, y + 4], fill=(225, 225, 225))
        img = img.filter(ImageFilter.GaussianBlur(1.2))
    if night:  # infrared: grey-scale, dark, noisy
        img = img.convert("L").point(lambda v: int(v * 0.45) + rng.randint(0, 12)).convert("RGB")
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/vlm")
    p.add_argument("--per_code", type=int, default=6)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    out = Path(args.out) / "images"
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for code in CODES:
        for night in (False, True):
            for i in range(args.per_code):
                name = f"{code}{int(night)}_{20260103 + i:08d}_{n:03d}.jpg"
                draw(code, night, args.size, rng).save(out / name, quality=85)
                n += 1
    print(f"wrote {n} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
