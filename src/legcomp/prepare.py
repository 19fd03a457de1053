"""Turn expert muscle labels on real studies into training studies for ``legcomp train``.

Expert labels rarely come in legcomp's two label maps: they use their own ids, and they hold the
individual muscles but no SAT / whole-muscle map, sometimes for one leg only or for part of the
slices. :func:`prepare_study` makes a training study of them with *partial labels*, so that training
never learns an unlabelled structure as background:

* ``stage2``: the muscle labels, translated to legcomp ids with a label mapping when given.
  Slices of a labelled leg that hold no muscle label of that leg (e.g. hip slices left out by the
  experts) are :data:`legcomp.anatomy.IGNORE` (255) over the whole of that leg's side of the slice
  (every voxel the leg map gives that leg, not only where stage 1 sees muscle: the stage-1 map is a
  prediction there and may miss muscle, and at inference stage 2 is read inside stage 1's whole
  muscle only, so nothing is lost). ``unlabelled_slices="background"`` keeps them 0 (the old behaviour).
  A "labelled slice" of a leg is an axial slice (z of the canonical RAS+ grid) holding at least one
  labelled muscle voxel of that leg;
* ``stage1``: the study's own stage-1 map when it has one, else the bundled (or given) stage-1
  network's prediction with every labelled muscle voxel set to whole muscle (left as predicted
  on slices without muscle labels: stage 1 is complete there);
* ``legs``: 1 left / 2 right, kept only for legs that hold muscle labels, so that an unlabelled
  leg is left out of training instead of being learnt as "no muscle here";
* the label record (:data:`legcomp.anatomy.LABEL_RECORD`, ``study.label_record``): the region's
  muscles the stage-2 map does not label, i.e. those the mapping never maps to and those it maps
  but the labels do not hold, ``{"source": ..., "stage1": {"unlabelled": []},
  "stage2": {"unlabelled": [names]}}``; training gives them class weight 0 (partial-label loss).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from legcomp import __version__, anatomy
from legcomp.errors import LegcompInputError
from legcomp.inference.cascade import Cascade
from legcomp.io import DixonStudy, find_studies, read_study
from legcomp.io.atomic import staged_output
from legcomp.io.nifti import read_label_map, write_study
from legcomp.pipeline import for_each_study, write_failures
from legcomp.preprocessing.legs import leg_map
from legcomp.quantification.mapping import apply_label_mapping, load_label_mapping, mapping_stage

PREPARED_FILES = ("water.nii.gz", "fat.nii.gz", "in_phase.nii.gz", "opposed_phase.nii.gz", "stage1.nii.gz",
                  "stage2.nii.gz", "legs.nii.gz", anatomy.LABEL_RECORD, "prepare.json")
"""Files a prepared study folder holds."""

UNLABELLED_SLICES: tuple[str, ...] = ("ignore", "background")
"""What the stage-2 map holds on the slices of a labelled leg without any muscle label of that leg:
``ignore`` (:data:`legcomp.anatomy.IGNORE`, left out of training) or ``background`` (0)."""


def prepare_study(study: DixonStudy, muscles: np.ndarray, region: str, cascade: Cascade | None = None,
                  legs: tuple[int, ...] | None = None, *, unlabelled_slices: str = "ignore",
                  mapped: Iterable[str] | None = None, source: str = "legcomp prepare") -> tuple[DixonStudy, dict]:
    """A training study (labels ``stage1``, ``stage2``, ``legs`` and a label record) from a study and
    its muscle labels (see the module doc).

    Args:
        study: canonical study; its own ``stage1`` label map is used when present.
        muscles: legcomp stage-2 ids of ``region`` (uint8, the study's canonical grid, (x, y, z)).
        region: ``thigh`` or ``calf``.
        cascade: network whose stage 1 fills in a missing stage-1 map (needed only then).
        legs: anatomy.LEGS ids to keep (default: every leg with a muscle label).
        unlabelled_slices: ``ignore`` (default): the stage-2 map is IGNORE (255) on a kept leg's side of
            every axial slice where that leg has no muscle label; ``background``: 0 there.
        mapped: the region's muscle names the labels can hold (a label mapping's names); the others
            are recorded as unmapped. None: every muscle could be labelled.
        source: the label record's ``"source"``.
    Returns:
        (study with the three label maps and ``label_record``, a dict saying what was derived:
        ``legs_kept``, ``legs_left_out``, ``muscles_labelled``, ``muscles_unmapped``, ``muscles_absent``
        (mapped but not in the kept legs' labels), ``unlabelled_slices``, ``slices_without_labels``
        (per kept leg, z indices of the canonical grid), ``label_record``).
    Raises:
        LegcompInputError: no muscle label, ids beyond the region's, a missing stage 1 and no cascade,
            an unknown ``unlabelled_slices`` or ``mapped`` name.
    """
    region = anatomy.check_region(region)
    m = np.asarray(muscles)
    if m.shape != study.shape:
        raise LegcompInputError(f"muscle labels of shape {m.shape} do not match the images {study.shape}",
                                study.source or study.name)
    n = len(anatomy.MUSCLES[region])
    if not (m > 0).any():
        raise LegcompInputError("the muscle labels are empty", study.source or study.name)
    if int(m.max()) > n:
        raise LegcompInputError(f"muscle label ids go up to {int(m.max())} but the {region} has {n} muscles "
                                "(give a label mapping)", study.source or study.name)
    if unlabelled_slices not in UNLABELLED_SLICES:
        raise LegcompInputError(f"unlabelled_slices must be one of {', '.join(UNLABELLED_SLICES)}, "
                                f"got {unlabelled_slices!r}")
    names = [lab.name for lab in anatomy.MUSCLES[region]]
    mapped_names = set(names) if mapped is None else set(mapped)
    if mapped_names - set(names):
        raise LegcompInputError(f"not {region} muscles: {', '.join(sorted(mapped_names - set(names)))}")
    m = m.astype(np.uint8)
    info: dict = {}
    if "stage1" in study.labels:
        s1 = np.asarray(study.labels["stage1"]).astype(np.uint8)
        info["stage1"] = "the study's own stage-1 labels, labelled muscles set to whole muscle"
    else:
        if cascade is None:
            raise LegcompInputError("the study has no stage-1 labels and no stage-1 network was given",
                                    study.source or study.name)
        s1 = cascade.predict_stage1(study)
        info["stage1"] = f"predicted by {cascade.sources.get(1, 'the stage-1 network')}, labelled muscles set to whole muscle"
    s1 = np.where(m > 0, np.uint8(anatomy.WHOLE_MUSCLE.id), s1).astype(np.uint8)
    side = leg_map(s1 > 0, study.affine, muscles=m, region=region)
    labelled = sorted(int(i) for i in np.unique(side[m > 0]) if i)
    keep = labelled if legs is None else [i for i in labelled if i in legs]
    if not keep:
        raise LegcompInputError("no leg left with muscle labels", study.source or study.name)
    in_keep = np.isin(side, keep)
    legs_map = np.where(in_keep, side, 0).astype(np.uint8)
    stage2 = np.where(in_keep, m, 0).astype(np.uint8)
    # slices of a kept leg without any muscle label of that leg: no label there, not background
    no_label: dict[str, list[int]] = {}
    for leg in keep:
        in_leg = side == leg
        has = ((m > 0) & in_leg).any(axis=(0, 1))
        empty = np.flatnonzero(~has & in_leg.any(axis=(0, 1)))
        no_label[anatomy.LEGS[leg]] = [int(z) for z in empty]
        if unlabelled_slices == "ignore" and empty.size:
            sel = in_leg.copy()
            sel[:, :, has] = False
            stage2[sel] = anatomy.IGNORE
    info["legs_kept"] = [anatomy.LEGS[i] for i in keep]
    info["legs_left_out"] = [anatomy.LEGS[i] for i in sorted(set(anatomy.LEGS) - set(keep)) if (side == i).any()]
    present = set(np.unique(stage2).tolist()) - {0, anatomy.IGNORE}
    info["muscles_labelled"] = [anatomy.MUSCLES[region][i - 1].name for i in sorted(present)]
    labelled_names = set(info["muscles_labelled"])
    info["muscles_unmapped"] = [n for n in names if n not in mapped_names and n not in labelled_names]
    info["muscles_absent"] = [n for n in names if n in mapped_names and n not in labelled_names]
    info["unlabelled_slices"] = unlabelled_slices
    info["slices_without_labels"] = no_label
    own_s1 = (study.label_record or {}).get("stage1", {}).get("unlabelled", []) if "stage1" in study.labels else []
    record = {"source": source, "stage1": {"unlabelled": list(own_s1)},
              "stage2": {"unlabelled": [n for n in names if n not in labelled_names]}}
    info["label_record"] = record
    out = dataclasses.replace(study, labels={"stage1": s1, "stage2": stage2, "legs": legs_map}, label_record=record)
    return out, info


def prepare_cohort(input: str | Path, out: str | Path, *, labels: str, region: str, mapping: str | None = None,
                   weights: str | None = None, device: str = "auto", progress: bool = True,
                   unlabelled_slices: str = "ignore") -> int:
    """Prepare every study under ``input`` (its muscle labels in the file ``labels`` inside its folder).

    Writes ``out/<study>/`` with the four contrasts and ``stage1``, ``stage2`` (IGNORE = 255 on the
    unlabelled slices of a labelled leg unless ``unlabelled_slices="background"``), ``legs`` in the
    study's input geometry, the label record ``label_record.json`` (muscles the mapping never maps to
    or the labels do not hold) and ``prepare.json`` (what was derived, the label record included);
    each folder atomically. A failing study is reported (``failures.csv``) and the others go on.
    Returns the exit code (0 all done, 1 some failed).
    """
    input, out = Path(input), Path(out)
    region = anatomy.check_region(region)
    studies = find_studies(input)
    if not studies:
        raise LegcompInputError("no Dixon study found (water and fat NIfTI files or DICOM series)", input)
    if unlabelled_slices not in UNLABELLED_SLICES:
        raise LegcompInputError(f"unlabelled_slices must be one of {', '.join(UNLABELLED_SLICES)}, "
                                f"got {unlabelled_slices!r}")
    mp = load_label_mapping(mapping) if mapping else None
    mapped = None
    if mp is not None:
        if mapping_stage(mp, region, mp.path) != 2:
            raise LegcompInputError("prepare needs a mapping to stage-2 (individual muscle) names", mp.path)
        mapped = {n for n in mp.values() if n is not None}
    cascade: Cascade | None = None

    def one(path: Path, name: str) -> None:
        nonlocal cascade
        label_file = path / labels
        if not label_file.is_file():
            raise LegcompInputError(f"no label file {labels!r} in the study folder", path)
        study = read_study(path, region=region, name=name)
        muscles = read_label_map(label_file, study)
        if mp is not None:
            muscles = apply_label_mapping(muscles, mp, region, label_file)
        if "stage1" not in study.labels and cascade is None:
            cascade = Cascade.load(region, weights, device)
        src = f"legcomp prepare {__version__}: labels {label_file}" + (f", mapping {mp.path}" if mp is not None else "")
        prepared, info = prepare_study(study, muscles, region, cascade, unlabelled_slices=unlabelled_slices,
                                       mapped=mapped, source=src)
        with staged_output(out / name, managed=PREPARED_FILES) as tmp:
            write_study(prepared, tmp)
            prov = {"legcomp_version": __version__, "source": str(path), "labels": str(label_file),
                    "mapping": getattr(mp, "path", None) if mp is not None else None, "region": region, **info}
            (tmp / "prepare.json").write_text(json.dumps(prov, indent=2))
        gaps = "; ".join(f"{leg} {_ranges(z)}" for leg, z in info["slices_without_labels"].items() if z)
        gaps = f", slices without labels ({unlabelled_slices}): {gaps}" if gaps else ""
        print(f"{name}: {', '.join(info['legs_kept'])} leg(s), {len(info['muscles_labelled'])} muscles, "
              f"{len(info['label_record']['stage2']['unlabelled'])} unlabelled{gaps} -> {out / name}")

    failures = for_each_study(input, studies, one, progress=progress)
    write_failures(out, failures)
    print(f"{len(studies) - len(failures)} of {len(studies)} studies prepared, {len(failures)} failed; wrote {out}")
    return 1 if failures else 0


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
