"""Quality-control flags of one study, from its volumes table and run.json.

A flag says what a reviewer should look at and why: a fat-water swap (from run.json's
``fat_water_swap`` record), hip/pelvis slices left out of the volumes (run.json ``hip``), structures
cut by the field of view (the ``incomplete`` measure), low network confidence (the ``confidence``
measure below :data:`LOW_CONFIDENCE`), left/right volume asymmetry beyond :data:`ASYMMETRY_RATIO`,
and a study with one leg only. The study report and the cohort index both use
:func:`study_flags`, so they always agree.

Tables are legcomp's tidy quantification tables (``volumes.csv``: subject, region, leg, structure,
measure, value, unit); volumes in mL, fat fractions and confidences 0-1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from legcomp import anatomy

LOW_CONFIDENCE = 0.87
"""A structure whose confidence (mean probability of the chosen label, 0-1) is below this is flagged.
Set from ``bench/bench_confidence.py``: on clean and degraded phantoms it flags 40 of the 64
segmentations with DSC < 0.8 and 5 of the 331 others (clean phantoms: 0.91 and above)."""

ASYMMETRY_RATIO = 1.3
"""A structure whose larger leg's volume exceeds the smaller's by more than this ratio is flagged."""

ASYMMETRY_MIN_ML = 5.0
"""Structures smaller than this (mL) in both legs are not compared (a few voxels swing the ratio)."""

FAT_MEASURES_NAMES: dict[str, str] = {
    "mat": "MAT (all fat in whole muscle)",
    "intramat": "IntraMAT (fat inside the muscles)",
    "intermat": "InterMAT (fat between the muscles)",
}
"""Display names of the fat compartments of the quantification table."""

TITLES: dict[str, str] = {
    "fat_water_swap": "Fat-water swap",
    "hip_left_out": "Hip slices left out",
    "cut_by_fov": "Cut by the field of view",
    "low_confidence": "Low confidence",
    "asymmetry": "Left/right asymmetry",
    "single_leg": "One leg only",
}
"""Flag kind -> short title, in the order the report lists them."""


@dataclass(frozen=True)
class Flag:
    """One quality-control flag: its kind (a key of :data:`TITLES`), the reason in one line, and the
    structures it concerns (machine names; empty for a study-wide flag)."""

    kind: str
    reason: str
    structures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def title(self) -> str:
        """Short title for tables and badges."""
        return TITLES.get(self.kind, self.kind)

    def to_json(self) -> dict:
        """JSON form (kind, title, reason, structures) for run.json."""
        return {**asdict(self), "structures": list(self.structures), "title": self.title}


def display_name(structure: str, region: str | None) -> str:
    """Full name of a structure of the table: from :mod:`legcomp.anatomy`, or the fat compartments."""
    if structure in FAT_MEASURES_NAMES:
        return FAT_MEASURES_NAMES[structure]
    for lab in (*anatomy.STAGE1, *(anatomy.MUSCLES.get(str(region), ()))):
        if lab.name == structure:
            return lab.display
    return structure.replace("_", " ")


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """The tidy table as one row per (structure, leg) and one column per measure (NaN where absent)."""
    if table.empty:
        return pd.DataFrame()
    return table.pivot_table(index=["structure", "leg"], columns="measure", values="value", aggfunc="first")


def cell(w: pd.DataFrame, structure: str, leg: str, measure: str) -> float:
    """One value of a :func:`wide` table (NaN when absent)."""
    try:
        return float(w.at[(structure, leg), measure])
    except KeyError:
        return float("nan")


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out, vals = [], sorted(set(int(v) for v in values))
    while vals:
        lo = hi = vals.pop(0)
        while vals and vals[0] == hi + 1:
            hi = vals.pop(0)
        out.append(f"{lo}" if lo == hi else f"{lo}-{hi}")
    return ", ".join(out)


def _structures(w: pd.DataFrame, region: str) -> list[str]:
    """Segmented structures of the table in anatomy order (SAT, whole muscle, muscles)."""
    have = set(w.index.get_level_values(0)) if len(w) else set()
    order = [lab.name for lab in (*anatomy.STAGE1, *anatomy.MUSCLES.get(region, ()))]
    return [s for s in order if s in have]


def row_flags(table: pd.DataFrame, *, low_confidence: float = LOW_CONFIDENCE,
              asymmetry_ratio: float = ASYMMETRY_RATIO) -> dict[tuple[str, str], list[str]]:
    """Short flags of each (structure, leg) row of the report's tables: ``cut by FOV``, ``low confidence``,
    ``L/R x.xx`` (on both legs and the total)."""
    w = wide(table)
    out: dict[tuple[str, str], list[str]] = {}
    if w.empty:
        return out
    region = str(table["region"].iloc[0])
    for (structure, leg), row in w.iterrows():
        tags = []
        if row.get("incomplete", 0) == 1:
            tags.append("cut by FOV")
        conf = row.get("confidence", np.nan)
        if np.isfinite(conf) and conf < low_confidence:
            tags.append("low confidence")
        out[(structure, leg)] = tags
    for s, ratio in asymmetries(w, region, asymmetry_ratio).items():
        for leg in ("left", "right", "total"):
            out.setdefault((s, leg), []).append(f"L/R {ratio:.2f}" if np.isfinite(ratio) else "one leg empty")
    return out


def asymmetries(w: pd.DataFrame, region: str, ratio: float = ASYMMETRY_RATIO) -> dict[str, float]:
    """Structures whose left/right volume ratio (larger over smaller) exceeds ``ratio`` -> that ratio
    (inf when one leg has none); none when only one leg holds whole muscle."""
    if not (cell(w, anatomy.WHOLE_MUSCLE.name, "left", "volume_ml") > 0
            and cell(w, anatomy.WHOLE_MUSCLE.name, "right", "volume_ml") > 0):
        return {}
    out = {}
    for s in _structures(w, region):
        left, right = (cell(w, s, leg, "volume_ml") for leg in ("left", "right"))
        if not (np.isfinite(left) and np.isfinite(right)) or max(left, right) < ASYMMETRY_MIN_ML:
            continue
        r = max(left, right) / min(left, right) if min(left, right) > 0 else float("inf")
        if r > ratio:
            out[s] = r
    return out


def study_flags(table: pd.DataFrame, run: dict | None = None, *, low_confidence: float = LOW_CONFIDENCE,
                asymmetry_ratio: float = ASYMMETRY_RATIO) -> list[Flag]:
    """The flags of one study, in the order of :data:`TITLES`.

    Args:
        table: the study's tidy quantification table (``volumes.csv``).
        run: its run.json as a dict (``fat_water_swap``, ``hip`` are read when present).
    """
    run = run or {}
    flags: list[Flag] = []
    swap = run.get("fat_water_swap")
    if isinstance(swap, dict) and (swap.get("verdict") in ("whole", "partial", "not_dixon")):
        flags.append(Flag("fat_water_swap", str(swap.get("note") or f"swap detector verdict: {swap['verdict']}")))
    elif swap is True or (isinstance(swap, str) and swap):
        flags.append(Flag("fat_water_swap", swap if isinstance(swap, str) else "fat-water swap detected"))
    hip = run.get("hip")
    if isinstance(hip, dict) and hip.get("slices") and hip.get("in_volumes") is False:
        left_out = hip.get("left_out_ml") or {}
        mus = sum(float(v.get(anatomy.WHOLE_MUSCLE.name, 0)) for v in left_out.values())
        sat = sum(float(v.get(anatomy.SAT.name, 0)) for v in left_out.values())
        flags.append(Flag("hip_left_out", f"input slices {_ranges(hip['slices'])} show the hip/pelvis (legs joined): "
                                          f"left out of the volumes (whole muscle {mus:.0f} mL, SAT {sat:.0f} mL)"))
    w = wide(table)
    if w.empty:
        return flags
    region = str(table["region"].iloc[0])
    names = _structures(w, region)
    cut = [s for s in names if cell(w, s, "total", "incomplete") == 1]
    if cut:
        flags.append(Flag("cut_by_fov", f"{len(cut)} structure(s) reach the first or last slice with a large "
                                        f"cross-section and go on beyond the image; their volumes are partial: "
                                        f"{', '.join(display_name(s, region) for s in cut)}", tuple(cut)))
    low = [(s, leg, c) for s in names for leg in ("left", "right")
           if np.isfinite(c := cell(w, s, leg, "confidence")) and c < low_confidence]
    if low:
        flags.append(Flag("low_confidence", f"mean network probability below {low_confidence:.2f}: " + ", ".join(
            f"{leg} {display_name(s, region).lower()} {c:.2f}" for s, leg, c in low),
            tuple(dict.fromkeys(s for s, _, _ in low))))
    asym = asymmetries(w, region, asymmetry_ratio)
    if asym:
        parts = [f"{display_name(s, region).lower()} (left {cell(w, s, 'left', 'volume_ml'):.0f} mL, right "
                 f"{cell(w, s, 'right', 'volume_ml'):.0f} mL)" for s in asym]
        flags.append(Flag("asymmetry", f"left/right volume ratio above {asymmetry_ratio:.2f}: " + ", ".join(parts),
                          tuple(asym)))
    present = [leg for leg in ("left", "right") if cell(w, anatomy.WHOLE_MUSCLE.name, leg, "volume_ml") > 0]
    if len(present) == 1:
        flags.append(Flag("single_leg", f"whole muscle found in the {present[0]} leg only"))
    return flags
