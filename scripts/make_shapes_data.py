"""Generate the pixel demo's image set (data/vlm_shapes/): one field only the shapes tell, one colour tells.

    python scripts/make_shapes_data.py [--out data/vlm_shapes] [--per_code 20] [--size 96] [--seed 0]
    python scripts/make_shapes_data.py --folder incoming --per_code 2 --seed 1    new images for the inspection loop

Each image shows one filled shape on a noisy grey background. The file-name prefix is the label code read
through data/vlm_shapes/label_map.json: digit 1 = shape (circle, square, triangle), digit 2 = colour (red, blue).
The three shapes have the same area, and their position (near the centre), size, shade and the background are
drawn alike for every shape: mean brightness and colour say nothing about the shape, so a model that gets
`shape` right on held-out images read it from the pixels' layout. `colour` is the contrast: a global cue, as
`is_night_mode` in the leak demo. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "blue"]


def draw(shape: int, colour: int, size: int, rng: random.Random) -> Image.Image:
    grey = rng.randint(90, 150)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    d = ImageDraw.Draw(img)
    for _ in range(size * 2):  # speckle, so that flat regions are not a cue either
        v = rng.randint(60, 180)
        d.point((rng.randrange(size), rng.randrange(size)), fill=(v, v, v))
    area = (size * rng.uniform(0.5, 0.6)) ** 2  # the same area distribution for every shape
    shade = rng.randint(170, 255)
    fill = (shade, rng.randint(0, 60), rng.randint(0, 60)) if colour == 0 else \
        (rng.randint(0, 60), rng.randint(0, 60), shade)
    # Half the shape's width: the circle's radius, half the square's side, half the triangle's side.
    half = [math.sqrt(area / math.pi), math.sqrt(area) / 2, math.sqrt(4 * area / math.sqrt(3)) / 2][shape]
    # Near the centre (jitter of a tenth of the side, kept inside the frame): where each shape leaves background
    # (a circle's corners, a triangle's top corners) is the cue to learn.
    jitter = size / 10
    cx = min(max(size / 2 + rng.uniform(-jitter, jitter), half + 1), size - half - 1)
    cy = min(max(size / 2 + rng.uniform(-jitter, jitter), half + 1), size - half - 1)
    if shape == 0:
        d.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == 1:
        d.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        h = half * math.sqrt(3)  # height of an equilateral triangle of side 2 * half
        d.polygon([(cx, cy - 2 * h / 3), (cx - half, cy + h / 3), (cx + half, cy + h / 3)], fill=fill)
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/vlm_shapes")
    p.add_argument("--per_code", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folder", default="images", help="sub-folder of --out for the images")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(args.out)
    out = root / args.folder
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for shape in range(len(SHAPES)):
        for colour in range(len(COLOURS)):
            for _ in range(args.per_code):
                tag = "" if args.folder == "images" else args.folder
                name = f"{shape}{colour}_{tag}{n:03d}.png"
                draw(shape, colour, args.size, rng).save(out / name)
                n += 1
    label_map = {"mapping_type": "positional",
                 "positions": [{"field": "shape", "map": {str(k): v for k, v in enumerate(SHAPES)}},
                               {"field": "colour", "map": {str(k): v for k, v in enumerate(COLOURS)}}]}
    (root / "label_map.json").write_text(json.dumps(label_map, indent=2) + "\n", encoding="utf-8")
    (root / "prompt.json").write_text(json.dumps({"system_prompt": "Name the shape in the image and its colour. "
                                                  "Answer with one JSON object with the keys shape and colour."},
                                                 indent=2) + "\n", encoding="utf-8")
    print(f"wrote {n} images to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
