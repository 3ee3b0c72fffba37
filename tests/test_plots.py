"""The run's figures: drawn quietly and readably for as many pseudo groups as a run makes."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from exmap_ray.plots import heatmap_grid


def _grid(tmp_path, groups: int, caption_extra: str):
    rng = np.random.default_rng(0)
    n = 12 * groups
    pseudo = np.arange(n) % groups
    images = 0.2 + 0.6 * rng.random((n, 3, 28, 28), dtype=np.float32)
    maps = rng.standard_normal((n, 3, 14, 14)).astype(np.float32)
    captions = [
        f"pseudo group {g}: class {g % 2}, cluster {g // 2}, n={int((pseudo == g).sum())}; "
        f"mostly 'y>=5 green BR' (93%){caption_extra}"
        for g in range(groups)
    ]
    out = tmp_path / f"grid_{groups}.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heatmap_grid(images, maps, pseudo, captions, out)
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    return [str(w.message) for w in caught], pixels


def test_heatmap_grid_is_quiet_and_its_images_keep_their_size(tmp_path):
    # captions as long as the pipeline writes for cmnist_multi's group names used to make matplotlib's
    # tight_layout either shrink every image to a few pixels or give up and warn into a --quiet run
    for groups, extra in [(4, ""), (17, " (and a longer group name)")]:
        msgs, px = _grid(tmp_path, groups, extra)
        assert [m for m in msgs if "layout" in m.lower()] == []
        h, w = px.shape
        assert h > 2 * groups * 100 and w >= 600  # 2 rows (image, heatmap) per group, 6 columns
        # the images and heatmaps fill the figure: most pixels are not the white background
        assert (px < 250).mean() > 0.4, f"{groups} groups: images drawn too small ({(px < 250).mean():.2f} non-white)"
