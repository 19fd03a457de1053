"""The single source of truth for legcomp's anatomy: regions, label ids, names, colours.

Label ids and their order follow the seed study's public code, so that its released
masks load unchanged:

* stage 1 (both regions): 0 background, 1 subcutaneous fat (SAT), 2 whole muscle;
* stage 2 thigh: 13 individual muscles, ids 1-13;
* stage 2 calf: 9 individual muscles, ids 1-9.

Every other module reads labels from here; nothing else hard-codes an id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from legcomp.errors import LegcompInputError

REGIONS: tuple[str, ...] = ("thigh", "calf")
"""Anatomical regions legcomp segments."""

LEGS: dict[int, str] = {1: "left", 2: "right"}
"""Ids of a leg map (0 = background): the subject's left and right leg."""

IGNORE: int = 255
"""Label value of voxels that carry no label (training data only: slices a source leaves
unlabelled, e.g. the hip slices of a thigh map). Training leaves them out of the loss."""

UNNAMED_MUSCLE: int = 254
"""Stage-2 label value of muscle that is one of the muscles a study does not label (training data
only: e.g. the deep posterior gap a calf map leaves where flexor digitorum and hallucis longus lie).
Training learns it as one of the study's unlabelled muscles: neither background nor a labelled one."""

LABEL_RECORD = "label_record.json"
"""File name, in a training study's folder, of its label record: which structures its label maps
do not label, per stage, e.g. ``{"stage2": {"unlabelled": ["adductor_longus"]}}`` (names from this
module). A structure a study does not label is never learnt as background from that study."""


@dataclass(frozen=True)
class Label:
    """One structure of a label map.

    Attributes:
        id: integer value in the label map (0 is always background).
        name: machine name (snake_case), used in tables and file names.
        display: human-readable name.
        stage: 1 (SAT / whole muscle) or 2 (individual muscles).
        region: ``"thigh"``, ``"calf"`` or ``"both"`` (stage 1 is shared).
        abbrev: short abbreviation for plots.
        color: RGB colour, integers 0-255.
    """

    id: int
    name: str
    display: str
    stage: int
    region: str
    abbrev: str
    color: tuple[int, int, int]


def _labels(stage: int, region: str, rows: Iterable[tuple[str, str, str, tuple[int, int, int]]]) -> tuple[Label, ...]:
    return tuple(Label(i, n, d, stage, region, a, c) for i, (n, d, a, c) in enumerate(rows, start=1))


STAGE1: tuple[Label, ...] = _labels(1, "both", [
    ("subcutaneous_fat", "Subcutaneous adipose tissue (SAT)", "SAT", (241, 214, 145)),
    ("whole_muscle", "Whole muscle", "MUS", (192, 104, 88)),
])

THIGH_MUSCLES: tuple[Label, ...] = _labels(2, "thigh", [
    ("rectus_femoris", "Rectus femoris", "RF", (230, 25, 75)),
    ("vastus_lateralis", "Vastus lateralis", "VL", (60, 180, 75)),
    ("vastus_intermedius", "Vastus intermedius", "VI", (255, 225, 25)),
    ("vastus_medialis", "Vastus medialis", "VM", (0, 130, 200)),
    ("sartorius", "Sartorius", "SA", (245, 130, 48)),
    ("gracilis", "Gracilis", "GR", (145, 30, 180)),
    ("biceps_femoris", "Biceps femoris", "BF", (70, 240, 240)),
    ("semitendinosus", "Semitendinosus", "ST", (240, 50, 230)),
    ("semimembranosus", "Semimembranosus", "SM", (210, 245, 60)),
    ("adductor_brevis_pectineus", "Adductor brevis and pectineus", "AB", (250, 190, 212)),
    ("adductor_longus", "Adductor longus", "AL", (0, 128, 128)),
    ("adductor_magnus_quadratus_femoris", "Adductor magnus and quadratus femoris", "AM", (220, 190, 255)),
    ("gluteus_maximus", "Gluteus maximus", "GM", (170, 110, 40)),
])

CALF_MUSCLES: tuple[Label, ...] = _labels(2, "calf", [
    ("gastrocnemius_medialis", "Gastrocnemius medialis", "GM", (230, 25, 75)),
    ("gastrocnemius_lateralis", "Gastrocnemius lateralis", "GL", (60, 180, 75)),
    ("soleus", "Soleus", "SOL", (255, 225, 25)),
    ("flexor_digitorum_longus", "Flexor digitorum longus", "FDL", (0, 130, 200)),
    ("flexor_hallucis_longus", "Flexor hallucis longus", "FHL", (245, 130, 48)),
    ("tibialis_posterior", "Tibialis posterior", "TP", (145, 30, 180)),
    ("peroneus_longus_brevis", "Peroneus longus and brevis", "PER", (70, 240, 240)),
    ("tibialis_anterior", "Tibialis anterior", "TA", (240, 50, 230)),
    ("extensor_hallucis_digitorum_longus", "Extensor hallucis and digitorum longus", "EXT", (210, 245, 60)),
])

MUSCLES: dict[str, tuple[Label, ...]] = {"thigh": THIGH_MUSCLES, "calf": CALF_MUSCLES}

SAT = STAGE1[0]
WHOLE_MUSCLE = STAGE1[1]


def check_region(region: str) -> str:
    """Return ``region`` lower-cased, or raise :class:`LegcompInputError` if unknown."""
    r = str(region).strip().lower()
    if r not in REGIONS:
        raise LegcompInputError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    return r


def labels(region: str | None = None, stage: int | None = None) -> list[Label]:
    """All labels, optionally filtered by region (``thigh``/``calf``) and stage (1/2).

    Stage-1 labels are shared by both regions and listed once (region ``"both"``).
    """
    if region is not None:
        region = check_region(region)
    out: list[Label] = []
    if stage in (None, 1):
        out.extend(STAGE1)
    if stage in (None, 2):
        for r in REGIONS:
            if region in (None, r):
                out.extend(MUSCLES[r])
    if stage not in (None, 1, 2):
        raise LegcompInputError(f"unknown stage {stage!r}; expected 1 or 2")
    return out


def stage_labels(stage: int, region: str) -> tuple[Label, ...]:
    """Labels of one network: stage 1 (SAT, whole muscle) or the region's muscles."""
    if stage == 1:
        return STAGE1
    if stage == 2:
        return MUSCLES[check_region(region)]
    raise LegcompInputError(f"unknown stage {stage!r}; expected 1 or 2")


def n_classes(stage: int, region: str) -> int:
    """Number of output classes of a stage's network, background included."""
    return len(stage_labels(stage, region)) + 1


def label_by_name(name: str, region: str) -> Label:
    """Look up a stage-1 or stage-2 label of ``region`` by its machine name."""
    for lab in (*STAGE1, *MUSCLES[check_region(region)]):
        if lab.name == name:
            return lab
    raise LegcompInputError(f"unknown structure {name!r} for region {region}")


def labels_json(region: str | None = None) -> str:
    """The label table as JSON: a list of objects (id, name, display, stage, region, abbrev, color)."""
    return json.dumps([asdict(lab) for lab in labels(region)], indent=2)


def write_itksnap_labels(path: str | Path, stage: int, region: str) -> Path:
    """Write an ITK-SNAP label description file for one stage's label map."""
    lines = ["################################################",
             f"# ITK-SNAP Label Description File — legcomp {region} stage {stage}",
             "# IDX  -R-  -G-  -B-  -A--  VIS MSH  LABEL",
             "################################################",
             '    0    0    0    0   0      0   0   "Clear Label"']
    for lab in stage_labels(stage, region):
        r, g, b = lab.color
        lines.append(f'{lab.id:5d} {r:4d} {g:4d} {b:4d}   1      1   1   "{lab.name}"')
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_slicer_colortable(path: str | Path, stage: int, region: str) -> Path:
    """Write a 3D Slicer colour table (``.ctbl``: id name R G B A) for one stage's label map."""
    lines = [f"# legcomp {region} stage {stage} colour table", "0 background 0 0 0 0"]
    for lab in stage_labels(stage, region):
        r, g, b = lab.color
        lines.append(f"{lab.id} {lab.name} {r} {g} {b} 255")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def colormap(stage: int, region: str) -> dict[int, tuple[float, float, float]]:
    """Label id -> RGB colour as floats 0-1 (for matplotlib)."""
    return {lab.id: tuple(c / 255 for c in lab.color) for lab in stage_labels(stage, region)}


def label_rgba(labels: np.ndarray, stage: int, region: str, alpha: float = 0.45) -> np.ndarray:
    """RGBA float32 image (..., 4) of a label map in the anatomy colours; background transparent.

    Args:
        labels: integer label map of any shape (e.g. an axial slice (x, y)) with ``stage`` ids.
        alpha: opacity 0-1 of labelled pixels.
    """
    labels = np.asarray(labels)
    rgba = np.zeros((*labels.shape, 4), np.float32)
    for lab_id, col in colormap(stage, region).items():
        sel = labels == lab_id
        rgba[sel, :3] = col
        rgba[sel, 3] = alpha
    return rgba
