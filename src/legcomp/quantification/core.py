"""Per-leg muscle and fat volumes from stage-1 / stage-2 label maps and a Dixon study.

All arrays are (x, y, z), canonical RAS+ (see :mod:`legcomp.io.study`). Volumes are in mL
(voxel count x the voxel volume from the affine), fat fractions are fractions 0-1.

Structures and how they are built (stage-2 labels take precedence over stage 1):

* ``subcutaneous_fat`` (SAT): stage-1 SAT voxels not labelled as a muscle;
* ``whole_muscle``: stage-1 whole muscle united with every stage-2 muscle voxel (when
  only stage 2 is given, the union of the muscles);
* each muscle of the region (stage-2 ids of :mod:`legcomp.anatomy`);
* legs: ``legs`` if given, else :func:`legcomp.preprocessing.legs.split_legs` of the labelled
  voxels (a single leg is named from its anatomy when stage 2 is given; slices where the legs
  are joined are split at the body midline);
* hip/pelvis: slices where the legs are joined in one cross-section above every slice with the
  legs apart (:func:`legcomp.preprocessing.legs.slice_levels`) are left out of every volume and
  fat mask unless ``keep_hip``; ``meta`` says which (``hip``, ``slice_coverage``, ``notes``);
* ``mat`` = fat voxels in whole muscle, ``intramat`` = fat voxels inside a muscle,
  ``intermat`` = fat voxels in whole muscle outside every muscle (so MAT = IntraMAT + InterMAT).

Measures (column ``measure``): ``volume_ml``; ``fat_volume_ml`` (fat voxels by the fat rule,
see :mod:`legcomp.quantification.fat`); ``pv_fat_volume_ml`` (partial-volume aware: sum of
the clipped fat fraction F/(W+F) over the mask x voxel volume); ``mean_fat_fraction``
(voxelwise mean of F/(W+F) over the mask; NaN for an empty mask); ``incomplete`` (1 when the
field of view cuts the structure so that part of its volume is missing: on the first or last
slice along z its cross-section is at least :data:`INCOMPLETE_AREA_FRACTION` of its largest; its
volume is still reported); ``confidence`` (only with confidence maps: the mean, over the structure,
of the network's probability of the label it chose, 0-1).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import legcomp
from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io.atomic import staged_output
from legcomp.io.study import DixonStudy
from legcomp.preprocessing import legs as leg_split
from legcomp.quantification.fat import describe_fat_rule, fat_fraction, fat_mask, parse_fat_rule

COLUMNS: tuple[str, ...] = ("subject", "region", "leg", "structure", "measure", "value", "unit")
"""Columns of the tidy quantification table."""

UNITS: dict[str, str] = {"volume_ml": "mL", "fat_volume_ml": "mL", "pv_fat_volume_ml": "mL",
                         "mean_fat_fraction": "fraction", "incomplete": "flag", "confidence": "fraction"}
"""Unit of each measure."""

INCOMPLETE_AREA_FRACTION = 0.25
"""A structure is ``incomplete`` (cut by the field of view) when its cross-section on the first or last
slice (or next to left-out hip slices) is at least this fraction of its largest: it goes on beyond the
image. One that tapers off inside the image (a thin end on the edge slice) is complete."""

LEG_NAMES: tuple[str, ...] = (*(anatomy.LEGS[k] for k in sorted(anatomy.LEGS)), "total")
MASK_NAMES: tuple[str, ...] = ("mat", "intramat", "intermat")

# composite label: 0 background, 1 SAT, 2 intermuscular (whole muscle outside muscles), 3+k muscle k
_C_SAT, _C_INTER, _C_MUSCLE0 = 1, 2, 2


@dataclass
class Quantification:
    """Result of :func:`quantify`.

    Attributes:
        table: tidy DataFrame with columns :data:`COLUMNS`; ``leg`` is left / right / total.
        masks: ``"mat"``, ``"intramat"``, ``"intermat"`` -> uint8 arrays (x, y, z), canonical;
            ``intramat``/``intermat`` only when stage 2 was given.
        meta: fat rule, voxel volume (mL), spacing (mm), legcomp version, flags, provenance.
    """

    table: pd.DataFrame
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def value(self, structure: str, measure: str, leg: str = "total") -> float:
        """One value of the table (KeyError if absent)."""
        t = self.table
        hit = t[(t.structure == structure) & (t.measure == measure) & (t.leg == leg)]
        if hit.empty:
            raise KeyError((structure, measure, leg))
        return float(hit.value.iloc[0])


def _check_labels(arr: np.ndarray | None, stage: int, region: str, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if arr is None:
        return None
    a = np.asarray(arr)
    if a.shape != tuple(shape):
        raise LegcompInputError(f"{what} shape {a.shape} differs from the study's {tuple(shape)}")
    if not np.issubdtype(a.dtype, np.integer):
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise LegcompInputError(f"{what} must hold integer label ids")
    if a.size and a.min() < 0:
        raise LegcompInputError(f"{what} holds negative label ids")
    n = len(anatomy.stage_labels(stage, region)) if (stage == 1 or region in anatomy.REGIONS) else 0
    mx = int(a.max()) if a.size else 0
    if mx > n:
        bad = [int(v) for v in np.unique(a) if v > n]
        raise LegcompInputError(f"{what} holds label ids {bad} outside the {region if stage == 2 else 'stage-1'} "
                                f"label table (1-{n})")
    if mx == 0:
        raise LegcompInputError(f"{what} is empty (no labelled voxel)")
    return a.astype(np.uint8, copy=False)


def _resolve_region(study: DixonStudy, region: str | None, need: bool) -> str:
    r = region if region is not None else study.region
    if r in (None, "", "unknown"):
        if need:
            raise LegcompInputError(f"{study.name}: region unknown; pass region='thigh' or 'calf' to quantify stage-2 labels")
        return "unknown"
    return anatomy.check_region(r)


def quantify(study: DixonStudy, stage1: np.ndarray | None, stage2: np.ndarray | None, *,
             region: str | None = None, fat_rule: str = "seed", legs: np.ndarray | None = None,
             subject: str | None = None, keep_hip: bool = False,
             confidence: dict[int, np.ndarray] | None = None) -> Quantification:
    """Volumes (mL) and fat measures per leg and in total.

    Args:
        study: the Dixon study (canonical arrays).
        stage1: stage-1 label map (0 background, 1 SAT, 2 whole muscle) or None.
        stage2: stage-2 label map (the region's muscle ids) or None.
        region: ``thigh``/``calf`` (default: the study's region; required with stage 2).
        fat_rule: ``seed``, ``ff:T``, ``sat:T`` or ``abs:V`` (see :func:`fat_mask`).
        legs: leg map (1 left, 2 right); default :func:`~legcomp.preprocessing.legs.split_legs`
            of the labelled voxels.
        subject: name in the table (default ``study.name``).
        keep_hip: keep the hip/pelvis slices (legs joined) in the volumes, split at the body
            midline; by default they are left out, with a note in ``meta["notes"]``.
        confidence: per stage (1, 2), the network's probability of each voxel's label (x, y, z), as
            :meth:`legcomp.inference.Cascade.predict` returns it; adds the measure ``confidence``, its
            mean over a structure (SAT and whole muscle from stage 1, muscles from stage 2).
    Raises:
        LegcompInputError: no label map, empty map, shape mismatch, ids outside the anatomy
            table, unknown fat rule.
    """
    if stage1 is None and stage2 is None:
        raise LegcompInputError(f"{study.name}: nothing to quantify (no stage-1 or stage-2 label map)")
    parse_fat_rule(fat_rule)
    region = _resolve_region(study, region, need=stage2 is not None)
    shape = study.shape
    s1 = _check_labels(stage1, 1, region, shape, "stage-1 map")
    s2 = _check_labels(stage2, 2, region, shape, "stage-2 map")
    muscles = anatomy.stage_labels(2, region) if s2 is not None else ()
    n_comp = _C_MUSCLE0 + 1 + len(anatomy.stage_labels(2, region)) if s2 is not None else 3

    comp = np.zeros(shape, np.uint8)
    flags: dict = {}
    vox_ml = study.voxel_volume_ml
    if s1 is not None:
        comp[s1 == anatomy.SAT.id] = _C_SAT
        comp[s1 == anatomy.WHOLE_MUSCLE.id] = _C_INTER
    if s2 is not None:
        m = s2 > 0
        if s1 is not None:
            flags["muscle_outside_stage1_ml"] = float(np.count_nonzero(m & (s1 == 0))) * vox_ml
            flags["muscle_over_sat_ml"] = float(np.count_nonzero(m & (s1 == anatomy.SAT.id))) * vox_ml
        comp[m] = s2[m] + _C_MUSCLE0
    whole_source = ("stage1 whole muscle united with stage-2 muscles" if s1 is not None and s2 is not None
                    else "stage1 whole muscle" if s1 is not None else "union of stage-2 muscles")

    fg = comp > 0
    split = leg_split.split_legs(fg, study.affine, muscles=s2, region=region if s2 is not None else None)
    if legs is None:
        legs_arr = split.legs
    else:
        legs_arr = np.asarray(legs)
        if legs_arr.shape != tuple(shape):
            raise LegcompInputError(f"leg map shape {legs_arr.shape} differs from the study's {tuple(shape)}")
        if legs_arr.size and (legs_arr.max() > max(anatomy.LEGS) or legs_arr.min() < 0):
            raise LegcompInputError(f"leg map holds ids outside {sorted(anatomy.LEGS)}")
    legs_arr = legs_arr.astype(np.intp, copy=False)
    in_volumes, hip, notes = _hip_rule(study, split, region, comp, legs_arr, keep_hip)
    if not in_volumes.all():
        comp[:, :, ~in_volumes] = 0
        fg = comp > 0
    unassigned = np.count_nonzero(fg & (legs_arr == 0))
    if unassigned:
        flags["unassigned_leg_ml"] = float(unassigned) * vox_ml

    fatm = fat_mask(study, fat_rule, stage1=s1)
    ff = fat_fraction(study.water, study.fat)
    n_leg = max(anatomy.LEGS) + 1
    key = legs_arr * n_comp + comp
    flat = key.ravel()
    size = n_leg * n_comp
    cnt = np.bincount(flat, minlength=size).reshape(n_leg, n_comp).astype(float)
    ffs = np.bincount(flat, weights=ff.ravel(), minlength=size).reshape(n_leg, n_comp)
    fats = np.bincount(flat, weights=fatm.ravel().astype(np.float32), minlength=size).reshape(n_leg, n_comp)
    # first and last slice, and the slices next to those left out (cut there too)
    edge_z = sorted({0, shape[2] - 1} | {z + d for z in np.flatnonzero(~in_volumes) for d in (-1, 1)
                                         if 0 <= z + d < shape[2] and in_volumes[z + d]})
    # per-slice cross-sections (voxels) of every leg and component, for the incomplete flag
    areas = np.bincount((key + np.arange(shape[2]) * size).ravel(),
                        minlength=size * shape[2]).reshape(shape[2], n_leg, n_comp)
    # rows: leg 1, leg 2, total (all legs incl. unassigned)
    leg_ids = sorted(anatomy.LEGS)
    cnt = np.vstack([cnt[leg_ids], cnt.sum(0)])
    ffs = np.vstack([ffs[leg_ids], ffs.sum(0)])
    fats = np.vstack([fats[leg_ids], fats.sum(0)])
    confs = _confidence_sums(confidence, flat, size, (n_leg, n_comp), shape, leg_ids)
    areas = np.concatenate([areas[:, leg_ids], areas.sum(1, keepdims=True)], axis=1)

    def measures(cols: list[int], stage: int | None = None) -> dict[str, np.ndarray]:
        c = cnt[:, cols].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mff = np.where(c > 0, ffs[:, cols].sum(1) / np.maximum(c, 1), np.nan)
            conf = {"confidence": np.where(c > 0, confs[stage][:, cols].sum(1) / np.maximum(c, 1), np.nan)
                    } if stage in confs else {}
        return {**conf, "volume_ml": c * vox_ml, "fat_volume_ml": fats[:, cols].sum(1) * vox_ml,
                "pv_fat_volume_ml": ffs[:, cols].sum(1) * vox_ml, "mean_fat_fraction": mff,
                "incomplete": _cut_by_field_of_view(areas[:, :, cols].sum(2), edge_z).astype(float)}

    structures: list[tuple[str, dict[str, np.ndarray], tuple[str, ...]]] = []
    all_meas = ("volume_ml", "fat_volume_ml", "pv_fat_volume_ml", "mean_fat_fraction", "incomplete", "confidence")
    fat_meas = ("fat_volume_ml", "pv_fat_volume_ml", "mean_fat_fraction", "incomplete")
    muscle_cols = list(range(_C_MUSCLE0 + 1, n_comp)) if s2 is not None else []
    if s1 is not None:
        structures.append((anatomy.SAT.name, measures([_C_SAT], 1), all_meas))
    structures.append((anatomy.WHOLE_MUSCLE.name, measures([_C_INTER, *muscle_cols], 1), all_meas))
    for lab in muscles:
        structures.append((lab.name, measures([lab.id + _C_MUSCLE0], 2), all_meas))
    structures.append(("mat", measures([_C_INTER, *muscle_cols]), fat_meas))
    if s2 is not None:
        structures.append(("intramat", measures(muscle_cols), fat_meas))
        structures.append(("intermat", measures([_C_INTER]), fat_meas))

    subject = subject if subject is not None else study.name
    rows = []
    for name, meas, keep in structures:
        for li, leg in enumerate(LEG_NAMES):
            for m in (m for m in keep if m in meas):
                rows.append((subject, region, leg, name, m, float(meas[m][li]), UNITS[m]))
    table = pd.DataFrame(rows, columns=list(COLUMNS))

    masks = {"mat": (fatm & (comp >= _C_INTER)).astype(np.uint8)}
    if s2 is not None:
        masks["intramat"] = (fatm & (comp > _C_INTER)).astype(np.uint8)
        masks["intermat"] = (fatm & (comp == _C_INTER)).astype(np.uint8)

    present = [anatomy.LEGS[k] for k in leg_ids if cnt[leg_ids.index(k)].sum() > 0]
    incomplete = sorted({n for n, meas, _ in structures if meas["incomplete"][-1] > 0})
    flags.update({"incomplete": incomplete, "legs_present": present, "single_leg": len(present) == 1})
    meta = {"legcomp_version": legcomp.__version__, "subject": subject, "region": region,
            "fat_rule": fat_rule, "fat_rule_definition": describe_fat_rule(fat_rule),
            "voxel_volume_ml": vox_ml, "spacing_mm": list(study.spacing),
            "shape": list(shape), "whole_muscle": whole_source,
            "legs_source": "given" if legs is not None else "leg_map",
            "hip": hip, "notes": notes,
            "slice_coverage": leg_split.coverage_report(split, study.affine, region, input_affine=study.input_affine,
                                                        in_volumes=in_volumes),
            "study_source": study.source, "flags": flags,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return Quantification(table=table, masks=masks, meta=meta)


def _confidence_sums(confidence: dict[int, np.ndarray] | None, flat: np.ndarray, size: int,
                     grid: tuple[int, int], shape: tuple[int, ...], leg_ids: list[int]) -> dict[int, np.ndarray]:
    """Per stage, the sum of its confidence map over each (leg, component) bin: rows leg 1, leg 2, total."""
    out = {}
    for stage, cmap in (confidence or {}).items():
        c = np.asarray(cmap)
        if c.shape != tuple(shape):
            raise LegcompInputError(f"stage-{stage} confidence map shape {c.shape} differs from the study's {tuple(shape)}")
        sums = np.bincount(flat, weights=c.ravel().astype(np.float64), minlength=size).reshape(grid)
        out[int(stage)] = np.vstack([sums[leg_ids], sums.sum(0)])
    return out


def _hip_rule(study: DixonStudy, split: "leg_split.LegSplit", region: str, comp: np.ndarray, legs: np.ndarray,
              keep_hip: bool) -> tuple[np.ndarray, dict, list[str]]:
    """Which slices (z) count in the volumes, the ``hip`` record and notes.

    The hip/pelvis slices (:func:`legcomp.preprocessing.legs.slice_levels`) are left out unless
    ``keep_hip``, or unless no other slice holds a labelled voxel. ``hip``: ``slices`` (input
    slice indices), ``in_volumes``, ``left_out_ml`` (SAT and whole muscle per leg, mL).
    """
    nz = comp.shape[2]
    levels = leg_split.slice_levels(split.coverage, region)
    hip_z = np.array([lv == leg_split.HIP_LEVEL for lv in levels])
    in_volumes = np.ones(nz, bool)
    _, idx = leg_split.input_slice_index(study.input_affine, nz)
    hip = {"slices": [int(idx[z]) for z in np.flatnonzero(hip_z)], "in_volumes": True, "left_out_ml": {}}
    if not hip_z.any():
        return in_volumes, hip, []
    names = ", ".join(str(i) for i in sorted(hip["slices"]))
    what = f"slices {names} show the hip/pelvis (legs joined in one cross-section)"
    others = comp[:, :, ~hip_z].any()
    if keep_hip or not others:
        why = "kept as asked" if keep_hip else "kept: no other slice holds a labelled voxel"
        return in_volumes, hip, [f"{what}: {why}, split between the legs at the body midline"]
    vox_ml = study.voxel_volume_ml
    c, lg = comp[:, :, hip_z], legs[:, :, hip_z]
    for leg_id, leg in anatomy.LEGS.items():
        hip["left_out_ml"][leg] = {anatomy.SAT.name: round(float(np.count_nonzero((c == _C_SAT) & (lg == leg_id))) * vox_ml, 1),
                                   anatomy.WHOLE_MUSCLE.name: round(float(np.count_nonzero((c >= _C_INTER) & (lg == leg_id))) * vox_ml, 1)}
    tot = {k: sum(v[k] for v in hip["left_out_ml"].values()) for k in (anatomy.SAT.name, anatomy.WHOLE_MUSCLE.name)}
    in_volumes[hip_z] = False
    hip["in_volumes"] = False
    return in_volumes, hip, [f"{what}: left out of the volumes (whole muscle {tot[anatomy.WHOLE_MUSCLE.name]:.0f} mL, "
                             f"SAT {tot[anatomy.SAT.name]:.0f} mL); keep them with --keep-hip"]


def _cut_by_field_of_view(area: np.ndarray, edge_z: list[int]) -> np.ndarray:
    """Per row (left, right, total): does the structure reach an edge slice (``edge_z``) with a cross-section
    of at least :data:`INCOMPLETE_AREA_FRACTION` of its largest? ``area``: voxels per (slice, row). A total
    is cut when either leg is."""
    peak = area.max(axis=0)
    at_edge = area[edge_z]
    cut = ((at_edge > 0) & (at_edge >= INCOMPLETE_AREA_FRACTION * peak)).any(axis=0)
    cut[-1] |= cut[:-1].any()
    return cut


def _nan_to_none(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def quantification_json(q: Quantification) -> dict:
    """The nested JSON form: ``{"meta", "units", "legs": {leg: {structure: {measure: value}}}}``."""
    legs: dict = {}
    for r in q.table.itertuples(index=False):
        legs.setdefault(r.leg, {}).setdefault(r.structure, {})[r.measure] = _nan_to_none(float(r.value))
    return {"subject": q.meta.get("subject"), "region": q.meta.get("region"), "meta": q.meta,
            "units": dict(UNITS), "legs": legs}


def write_quantification(q: Quantification, study: DixonStudy, out_dir: str | Path) -> dict[str, Path]:
    """Write ``volumes.csv``, ``volumes.json`` and the fat masks (``mat/intramat/intermat.nii.gz``).

    Masks are written in the study's input geometry. Files are first written to a temporary
    folder beside ``out_dir`` and moved in only when all succeeded.

    Returns:
        file kind -> written path.
    """
    out_dir = Path(out_dir)
    names = {"csv": "volumes.csv", "json": "volumes.json"}
    with staged_output(out_dir, managed=[*names.values(), *(f"{k}.nii.gz" for k in MASK_NAMES)]) as tmp:
        q.table.to_csv(tmp / names["csv"], index=False, float_format="%.6g")
        (tmp / names["json"]).write_text(json.dumps(quantification_json(q), indent=2, allow_nan=False))
        for k, arr in q.masks.items():
            names[k] = f"{k}.nii.gz"
            study.save_like_input(arr, tmp / names[k], dtype=np.uint8)
    return {k: out_dir / n for k, n in names.items()}


def read_labels_for(study: DixonStudy, path: str | Path | None, kind: str, mapping=None, region: str | None = None,
                    mapped_stage: int | None = None) -> np.ndarray | None:
    """A label map for ``study``: from ``path`` (geometry-checked), else the study's own ``kind`` map.

    When ``mapping`` is given and ``mapped_stage`` matches ``kind`` the foreign ids are translated.
    """
    from legcomp.io.nifti import read_label_map
    from legcomp.quantification.mapping import apply_label_mapping

    if path is not None:
        arr = read_label_map(path, study)
    else:
        arr = study.labels.get(kind)
    if arr is not None and mapping is not None and mapped_stage == int(kind[-1]):
        arr = apply_label_mapping(arr, mapping, region, path)
    return arr


def quantify_files(study_path: str | Path, stage1_path: str | Path | None, stage2_path: str | Path | None,
                   out_dir: str | Path | None, *, region: str | None = None, fat_rule: str = "seed",
                   mapping: str | Path | dict | None = None, keep_hip: bool = False) -> Quantification:
    """Read a study and label maps, quantify, and write the outputs (CLI ``legcomp quantify``).

    Args:
        study_path: study folder (or one of its NIfTI files), read with :func:`legcomp.io.nifti.read_study`.
        stage1_path, stage2_path: label maps; None falls back to ``stage1``/``stage2`` files in the study folder.
        out_dir: output folder (None: do not write).
        mapping: label-mapping file / shipped name / dict applied to the map of its stage.
        keep_hip: keep the hip/pelvis slices in the volumes (see :func:`quantify`).
    """
    from legcomp.io.nifti import read_study
    from legcomp.quantification.mapping import load_label_mapping, mapping_stage

    study = read_study(study_path, region=region)
    reg = region or study.region
    mp = load_label_mapping(mapping) if isinstance(mapping, (str, Path)) else mapping
    mstage = None
    if mp is not None:
        reg = reg if reg not in (None, "unknown") else getattr(mp, "region", None)
        if reg is None:
            raise LegcompInputError("region unknown; pass --region", study_path)
        mstage = mapping_stage(mp, reg)
    s1 = read_labels_for(study, stage1_path, "stage1", mp, reg, mstage)
    s2 = read_labels_for(study, stage2_path, "stage2", mp, reg, mstage)
    if s1 is None and s2 is None:
        raise LegcompInputError("no stage-1 or stage-2 label map given or found", study_path)
    legs = study.labels.get("legs")
    if legs is not None and not legs.any():
        legs = None
    try:
        q = quantify(study, s1, s2, region=reg if reg != "unknown" else None, fat_rule=fat_rule, legs=legs,
                     keep_hip=keep_hip)
    except LegcompInputError as exc:  # name the file the problem comes from
        msg = str(exc)
        culprit = stage1_path if msg.startswith("stage-1") else stage2_path if msg.startswith("stage-2") else None
        if exc.path is None and culprit is not None:
            raise LegcompInputError(msg, culprit) from None
        raise
    q.meta["inputs"] = {"study": str(study_path), "stage1": str(stage1_path) if stage1_path else None,
                        "stage2": str(stage2_path) if stage2_path else None,
                        "mapping": getattr(mp, "path", None) if mp is not None else None}
    if out_dir is not None:
        write_quantification(q, study, out_dir)
    return q
