"""Overlay figures: label maps over the water image, at a few axial levels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402

from legcomp import anatomy  # noqa: E402


def pick_levels(mask: np.ndarray, n: int = 3) -> list[int]:
    """``n`` axial slice indices spread over the z-extent of ``mask`` (x, y, z), or of the image."""
    zs = np.nonzero(mask.any(axis=(0, 1)))[0] if mask.any() else np.arange(mask.shape[2])
    lo, hi = int(zs.min()), int(zs.max())
    return sorted({int(round(v)) for v in np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n)})


def crop_box(mask: np.ndarray, margin: float = 0.08) -> tuple[slice, slice]:
    """In-plane (x, y) box around a (x, y, z) mask over all slices, grown by ``margin`` of its size;
    the whole plane when the mask is empty."""
    if not mask.any():
        return slice(None), slice(None)
    box = []
    for ax, other in ((0, (1, 2)), (1, (0, 2))):
        idx = np.flatnonzero(mask.any(axis=other))
        pad = int(np.ceil(margin * (idx[-1] - idx[0] + 1)))
        box.append(slice(max(int(idx[0]) - pad, 0), min(int(idx[-1]) + pad + 1, mask.shape[ax])))
    return box[0], box[1]


def _show(ax, img: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Axial slice (x, y) in radiological view: subject's right on the left, anterior up."""
    ax.imshow(img.T[::-1, ::-1], cmap="gray", aspect=spacing[1] / spacing[0],
              vmin=0, vmax=float(np.percentile(img, 99.5)) or 1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_overlay(water: np.ndarray, fat: np.ndarray, stage1: np.ndarray, stage2: np.ndarray | None,
                 region: str, spacing: tuple[float, float, float], path: str | Path,
                 title: str = "", levels: list[int] | None = None) -> Path:
    """PNG of water, fat, stage-1 and stage-2 overlays at three axial levels.

    Arrays are canonical (x, y, z) RAS+; images are drawn in radiological convention
    (subject's right on the image's left, anterior up), cropped to the legs (the stage-1 labels).
    ``spacing`` in mm sets the aspect.
    """
    levels = levels or pick_levels(stage1 > 0)
    bx, by = crop_box(stage1 > 0)
    water, fat, stage1 = water[bx, by], fat[bx, by], stage1[bx, by]
    stage2 = stage2[bx, by] if stage2 is not None else None
    cols = 4 if stage2 is not None else 3
    panel_h = float(np.clip(3.2 * water.shape[1] * spacing[1] / (water.shape[0] * spacing[0]), 1.2, 4.0))
    fig, axes = plt.subplots(len(levels), cols, figsize=(3.2 * cols, (panel_h + 0.25) * len(levels) + 0.6),
                             squeeze=False)
    for row, z in enumerate(levels):
        w, f = water[:, :, z], fat[:, :, z]
        panels = [("water", w, None), ("fat", f, None), ("stage 1: SAT / muscle", w, anatomy.label_rgba(stage1[:, :, z], 1, region))]
        if stage2 is not None:
            panels.append(("stage 2: muscles", w, anatomy.label_rgba(stage2[:, :, z], 2, region, alpha=0.6)))
        for col, (name, img, over) in enumerate(panels):
            ax = axes[row, col]
            _show(ax, img, spacing)
            if over is not None:
                ax.imshow(over.transpose(1, 0, 2)[::-1, ::-1], aspect=spacing[1] / spacing[0], interpolation="nearest")
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"z = {z}", fontsize=8)
    shown = [*anatomy.STAGE1, *(anatomy.MUSCLES[region] if stage2 is not None else ())]
    fig.legend(handles=[Patch(color=np.array(lab.color) / 255, label=lab.abbrev) for lab in shown],
               loc="lower center", ncol=min(len(shown), 16), fontsize=7, frameon=False)
    fig.suptitle(f"{title}  (R on the left, anterior up)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
