"""A contact sheet of the shortcut zoo: a few val images of every true group of every zoo family.

    python benchmarks/zoo_gallery.py [--out docs/zoo_gallery.png] [--per-group 3] [--seed 0] [--scale 2]

One row per family (the registered `zoo_*` datasets, at their default keys except smaller splits),
one block per true group, labelled with the group's name. Val images, so the minority groups are
there too. The PNG is palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from exmap_ray.data import build_dataset
from exmap_ray.data.zoo import FAMILIES
from exmap_ray.spec import from_dict
from exmap_ray.storage import atomic_path

GAP, LABEL, NAME_W = 6, 12, 118
PAPER = (150, 150, 150)  # mid grey: the white patch and light frame show against it, as on black


def family_row(name: str, per_group: int, seed: int, scale: int, font) -> Image.Image:
    dspec = from_dict({"dataset": {"name": name, "n_train": 100, "n_val": 2000, "n_test": 100}}).dataset
    data = build_dataset(dspec, seed)
    x = data.val.images.x
    s = x.shape[-1] * scale
    block = per_group * s + (per_group - 1) * 2
    row = Image.new("RGB", (NAME_W + data.n_groups * (block + GAP), LABEL + s + GAP), PAPER)
    draw = ImageDraw.Draw(row)
    draw.text((2, LABEL + s // 2 - 6), name, fill="black", font=font)
    rng = np.random.default_rng(seed)
    for g, gname in enumerate(data.group_names):
        members = np.flatnonzero(data.val.group == g)
        pick = rng.choice(members, size=min(per_group, len(members)), replace=False)
        left = NAME_W + g * (block + GAP)
        draw.text((left, 0), gname, fill="black", font=font)
        for j, i in enumerate(pick):
            img = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(img).resize((s, s), Image.NEAREST)
            row.paste(tile, (left + j * (s + 2), LABEL))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "zoo_gallery.png"))
    ap.add_argument("--per-group", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=2, help="pixels per image pixel (nearest neighbour)")
    args = ap.parse_args()
    font = ImageFont.load_default()
    rows = [family_row(name, args.per_group, args.seed, args.scale, font) for name in FAMILIES]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), PAPER)
    top = 0
    for r in rows:
        sheet.paste(r, (0, top))
        top += r.height
    out = Path(args.out)
    with atomic_path(out) as tmp:
        sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
    print(f"{out}: {sheet.width}x{sheet.height}, {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
