"""PNG figures for a run: per-group accuracy bars and heatmap examples per pseudo group."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .storage import Loc  # noqa: E402


def _save(fig, path: "Path | Loc") -> None:
    """To a local path or the storage root, whole or not at all."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    Loc.parse(path).write_bytes(buf.getvalue())


def group_accuracy_bars(rows: dict[str, dict[str, float | None]], path: Path, title: str = "") -> None:
    """rows: method -> {group name: accuracy}. One cluster of bars per true group."""
    methods = list(rows)
    groups = list(next(iter(rows.values())))
    x = np.arange(len(groups))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(groups), 3.6))
    for i, m in enumerate(methods):
        vals = [rows[m][g] if rows[m][g] is not None else np.nan for g in groups]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "per-group test accuracy", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(methods), frameon=False)
    _save(fig, path)


def heatmap_grid(
    images, heatmaps: np.ndarray, pseudo: np.ndarray, captions: list[str], path: Path, per_group: int = 6, seed: int = 0
) -> None:
    """For each pseudo group, `per_group` random members: the image above its heatmap.

    `images` is indexable (a Dataset); only the images shown are loaded.

    A 3-channel heatmap is drawn as RGB: each input channel's positive relevance in that
    channel's colour (so "which colour mattered" is visible). A 1-channel heatmap uses a
    symmetric red-blue scale (red = positive).
    """
    rng = np.random.default_rng(seed)
    groups = np.unique(pseudo)
    height = 2.3 * len(groups)
    fig, axes = plt.subplots(2 * len(groups), per_group, figsize=(1.1 * per_group, height), squeeze=False)
    # fixed spacing, not tight_layout: each caption spans its row from the first column, which
    # tight_layout reads as column 0 needing that width (it shrinks every image, or gives up and warns)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.5 / height, wspace=0.08, hspace=0.3)
    for r, g in enumerate(groups):
        members = np.flatnonzero(pseudo == g)
        pick = rng.choice(members, min(per_group, len(members)), replace=False)
        for c in range(per_group):
            a_img, a_map = axes[2 * r, c], axes[2 * r + 1, c]
            a_img.axis("off")
            a_map.axis("off")
            if c >= len(pick):
                continue
            img = np.asarray(images[int(pick[c])], dtype=np.float32)
            img = np.transpose(img, (1, 2, 0)) if img.shape[0] in (1, 3) else img
            a_img.imshow(np.clip((img - img.min()) / (np.ptp(img) + 1e-8), 0, 1).squeeze())
            h = heatmaps[pick[c]]
            lim = np.abs(h).max() + 1e-12
            if h.shape[0] == 3:
                a_map.imshow(np.transpose(np.clip(h / lim, 0, 1), (1, 2, 0)))
            else:
                a_map.imshow(h.sum(0), cmap="bwr", vmin=-lim, vmax=lim)
        axes[2 * r, 0].set_title(captions[r], fontsize=7, loc="left")
    fig.suptitle(
        "val images per pseudo group; below each, its heatmap as clustered", fontsize=9, y=1 - 0.1 / height, va="top"
    )
    _save(fig, path)


def scatter_selection(rows: list[dict], metric: str, path: Path) -> None:
    """Test WGA against the label-free metric, one point per trial: does the selection work?"""
    fig, ax = plt.subplots(figsize=(5.2, 4))
    scopes = sorted({str(r.get("config.clustering.scope", "")) for r in rows})
    for scope in scopes:
        pts = [r for r in rows if str(r.get("config.clustering.scope", "")) == scope]
        ax.scatter(
            [r["selection_metric"] for r in pts],
            [r["test_worst_group_acc"] for r in pts],
            label=f"scope {scope}" if scope else None,
            alpha=0.8,
        )
    best = max(rows, key=lambda r: r["selection_metric"])
    ax.scatter(
        [best["selection_metric"]],
        [best["test_worst_group_acc"]],
        s=160,
        facecolors="none",
        edgecolors="black",
        label="label-free choice",
    )
    ax.set_xlabel(f"{metric} (label-free, held-out val)")
    ax.set_ylabel("test worst-group accuracy")
    ax.set_title("does the label-free metric pick good trials?", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def wga_vs_k(rows: list[dict], path: Path) -> None:
    """Test WGA per searched k (auto last), one line per clustering scope/method."""
    ks = sorted(
        {str(r["config.clustering.k"]) for r in rows}, key=lambda k: (k == "auto", int(k) if k.isdigit() else 0)
    )
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    series = sorted(
        {(str(r.get("config.clustering.scope", "")), str(r.get("config.clustering.method", ""))) for r in rows}
    )
    for scope, method in series:
        xs, ys = [], []
        for i, k in enumerate(ks):
            vals = [
                r["test_worst_group_acc"]
                for r in rows
                if str(r["config.clustering.k"]) == k
                and str(r.get("config.clustering.scope", "")) == scope
                and str(r.get("config.clustering.method", "")) == method
            ]
            if vals:
                xs.append(i)
                ys.append(float(np.mean(vals)))
        ax.plot(xs, ys, marker="o", label=" ".join(x for x in (scope, method) if x) or "trials")
    ax.set_xticks(range(len(ks)), ks)
    ax.set_xlabel("clustering.k")
    ax.set_ylabel("test worst-group accuracy (mean over trials)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    _save(fig, path)


def bench_bars(rows: list[dict], path: Path, title: str = "") -> None:
    """Horizontal bars of test WGA (mean ± std over seeds), with mean accuracy as a marker, per method."""
    names = [r["row"] for r in rows]
    wga = np.array([r.get("test_wga", np.nan) for r in rows])
    err = np.array([r.get("test_wga_std", 0.0) for r in rows])
    mean = np.array([r.get("test_mean_acc", np.nan) for r in rows])
    y = np.arange(len(rows))[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh(y, wga, xerr=err, color="#4c72b0", alpha=0.85, label="test WGA (± std)")
    ax.plot(mean, y, "k|", markersize=14, label="mean test accuracy")
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def zoo_grid(by_family: dict, rows: list[str], path: Path, title: str = "") -> None:
    """Families x rows of test WGA (mean over seeds), coloured and written in each cell: which method holds
    on which shortcut, at a glance."""
    fams = list(by_family)
    grid = np.full((len(fams), len(rows)), np.nan)
    for i, f in enumerate(fams):
        for r in by_family[f]:
            if r["row"] in rows:
                grid[i, rows.index(r["row"])] = r["test_wga"]
    fig, ax = plt.subplots(figsize=(1.0 * len(rows) + 2.5, 0.45 * len(fams) + 2.2))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, j in np.ndindex(grid.shape):
        if np.isfinite(grid[i, j]):
            ax.text(
                j,
                i,
                f"{grid[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if grid[i, j] < 0.6 else "black",
            )
    ax.set_xticks(range(len(rows)), rows, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(fams)), fams, fontsize=8)
    fig.colorbar(im, ax=ax, label="test WGA", fraction=0.03)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
