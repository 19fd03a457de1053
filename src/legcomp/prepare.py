"""Turn expert muscle labels on real studies into training studies for ``legcomp train``.

Expert labels rarely come in legcomp's two label maps: they use their own ids, and they hold the
individual muscles but no SAT / whole-muscle map, sometimes for one leg only. :func:`prepare_study`
makes a training study of them:

* ``stage2``: the muscle labels, translated to legcomp ids with a label mapping when given;
* ``stage1``: the study's own stage-1 map when it has one, else the bundled (or given) stage-1
  network's prediction with every labelled muscle voxel set to whole muscle;
* ``legs``: 1 left / 2 right, kept only for legs that hold muscle labels, so that an unlabelled
  leg is left out of training instead of being learnt as "no muscle here".

Slices of a labelled leg without any muscle label still count as background in training: label
every slice of a leg, or give studies cropped to the labelled slab.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from legcomp import __version__, anatomy
from legcomp.errors import LegcompInputError
from legcomp.inference.cascade import Cascade
from legcomp.io import DixonStudy, find_studies, read_study
from legcomp.io.atomic import staged_output
from legcomp.io.nifti import read_label_map, write_study
from legcomp.pipeline import for_each_study, write_failures
from legcomp.preprocessing.legs import leg_map
from legcomp.quantification.mapping import apply_label_mapping, load_label_mapping

PREPARED_FILES = ("water.nii.gz", "fat.nii.gz", "in_phase.nii.gz", "opposed_phase.nii.gz", "stage1.nii.gz",
                  "stage2.nii.gz", "legs.nii.gz", "prepare.json")
"""Files a prepared study folder holds."""


def prepare_study(study: DixonStudy, muscles: np.ndarray, region: str, cascade: Cascade | None = None,
                  legs: tuple[int, ...] | None = None) -> tuple[DixonStudy, dict]:
    """A training study (labels ``stage1``, ``stage2``, ``legs``) from a study and its muscle labels.

    Args:
        study: canonical study; its own ``stage1`` label map is used when present.
        muscles: legcomp stage-2 ids of ``region`` (uint8, the study's canonical grid, (x, y, z)).
        region: ``thigh`` or ``calf``.
        cascade: network whose stage 1 fills in a missing stage-1 map (needed only then).
        legs: anatomy.LEGS ids to keep (default: every leg with a muscle label).
    Returns:
        (study with the three label maps, a dict saying what was derived).
    Raises:
        LegcompInputError: no muscle label, ids beyond the region's, or a missing stage 1 and no cascade.
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
    info["legs_kept"] = [anatomy.LEGS[i] for i in keep]
    info["legs_left_out"] = [anatomy.LEGS[i] for i in sorted(set(anatomy.LEGS) - set(keep)) if (side == i).any()]
    info["muscles_labelled"] = [anatomy.MUSCLES[region][i - 1].name for i in sorted(set(np.unique(stage2)) - {0})]
    out = dataclasses.replace(study, labels={"stage1": s1, "stage2": stage2, "legs": legs_map})
    return out, info


def prepare_cohort(input: str | Path, out: str | Path, *, labels: str, region: str, mapping: str | None = None,
                   weights: str | None = None, device: str = "auto", progress: bool = True) -> int:
    """Prepare every study under ``input`` (its muscle labels in the file ``labels`` inside its folder).

    Writes ``out/<study>/`` with the four contrasts and ``stage1``, ``stage2``, ``legs`` in the
    study's input geometry, plus ``prepare.json``; each folder atomically. A failing study is
    reported (``failures.csv``) and the others go on. Returns the exit code (0 all done, 1 some failed).
    """
    input, out = Path(input), Path(out)
    region = anatomy.check_region(region)
    studies = find_studies(input)
    if not studies:
        raise LegcompInputError("no Dixon study found (water and fat NIfTI files or DICOM series)", input)
    mp = load_label_mapping(mapping) if mapping else None
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
        prepared, info = prepare_study(study, muscles, region, cascade)
        with staged_output(out / name, managed=PREPARED_FILES) as tmp:
            write_study(prepared, tmp)
            prov = {"legcomp_version": __version__, "source": str(path), "labels": str(label_file),
                    "mapping": getattr(mp, "path", None) if mp is not None else None, "region": region, **info}
            (tmp / "prepare.json").write_text(json.dumps(prov, indent=2))
        print(f"{name}: {', '.join(info['legs_kept'])} leg(s), {len(info['muscles_labelled'])} muscles -> {out / name}")

    failures = for_each_study(input, studies, one, progress=progress)
    write_failures(out, failures)
    print(f"{len(studies) - len(failures)} of {len(studies)} studies prepared, {len(failures)} failed; wrote {out}")
    return 1 if failures else 0
