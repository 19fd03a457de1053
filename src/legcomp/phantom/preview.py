"""PNG montage of a phantom: water, fat and label overlay at a few z levels (radiological view)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from legcomp import anatomy


def _load_folder(folder: Path) -> dict:
    import nibabel as nib

    from legcomp.errors import LegcompInputError

    out = {}
    for name in ("water", "fat", "stage1", "stage2"):
        p = folder / f"{name}.nii.gz"
        if not p.exists():
            raise LegcompInputError(f"no {name}.nii.gz in phantom folder", folder)
        img = nib.as_closest_canonical(nib.load(str(p)))
        out[name] = np.asarray(img.dataobj)
        out["spacing"] = img.header.get_zooms()[:3]
    region = "calf" if "calf" in folder.name.lower() else "thigh"
    truth = folder / "truth.json"
    if truth.exists():
        import json

        region = json.loads(truth.read_text()).get("region", region)
    out["region"] = region
    return out


def _overlay(stage1: np.ndarray, stage2: np.ndarray, region: str) -> np.ndarray:
    """RGBA image: muscles in anatomy colours, SAT and the rest of whole muscle in the stage-1 colours."""
    rgba = anatomy.label_rgba(stage1, 1, region, alpha=0.35)
    muscles = np.asarray(stage2) > 0
    rgba[muscles] = anatomy.label_rgba(stage2, 2, region, alpha=0.6)[muscles]
    return rgba


def save_preview(ph_or_folder, png_path: str | os.PathLike, levels: int = 3) -> Path:
    """Save a PNG montage (rows: water, fat, labels; columns: z levels) of a Phantom or phantom folder.

    Slices are shown in radiological convention: anterior up, the subject's right on the image's left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if isinstance(ph_or_folder, (str, os.PathLike)):
        d = _load_folder(Path(ph_or_folder))
    else:
        ph = ph_or_folder
        d = dict(water=ph.water, fat=ph.fat, stage1=ph.stage1, stage2=ph.stage2, region=ph.region,
                 spacing=ph.spacing)
    water, fat, s1, s2, region = d["water"], d["fat"], d["stage1"], d["stage2"], d["region"]
    sx, sy = float(d["spacing"][0]), float(d["spacing"][1])
    nz = water.shape[2]
    zs = np.unique(np.linspace(0.12 * (nz - 1), 0.88 * (nz - 1), max(1, int(levels))).round().astype(int))
    vw = float(np.percentile(water, 99.7)) or 1.0
    vf = float(np.percentile(fat, 99.7)) or 1.0

    def disp(a: np.ndarray) -> np.ndarray:  # (x, y) RAS -> rows anterior-up, columns subject right on the left
        return np.swapaxes(a, 0, 1)[::-1, ::-1]

    aspect = sy / sx
    fig, axes = plt.subplots(3, len(zs), figsize=(4.2 * len(zs), 3 * 4.2 * water.shape[1] * aspect / water.shape[0] + 0.6),
                             squeeze=False)
    for j, z in enumerate(zs):
        axes[0, j].imshow(disp(water[:, :, z]), cmap="gray", vmin=0, vmax=vw, aspect=aspect)
        axes[1, j].imshow(disp(fat[:, :, z]), cmap="gray", vmin=0, vmax=vf, aspect=aspect)
        axes[2, j].imshow(disp(water[:, :, z]), cmap="gray", vmin=0, vmax=vw, aspect=aspect)
        axes[2, j].imshow(disp(_overlay(s1[:, :, z], s2[:, :, z], region)), aspect=aspect)
        axes[0, j].set_title(f"z = {z}", fontsize=9)
    for i, name in enumerate(("water", "fat", "labels")):
        axes[i, 0].set_ylabel(name)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=np.array(lab.color) / 255, label=lab.abbrev) for lab in anatomy.MUSCLES[region]]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"legcomp phantom ({region}); radiological view: R on the left, anterior up", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=72)
    plt.close(fig)
    return png_path
