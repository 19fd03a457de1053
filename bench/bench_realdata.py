"""The bundled weights (or ``--weights``) on the two real studies in ``../shared/realdata``.

* huashan_thigh_001 (dystrophic thighs, 24 mm slice spacing): DSC per muscle and leg against the
  authors' reference labels, mapped to legcomp ids with the shipped ``huashan_thigh`` mapping;
  the mean over the mapped muscles of each leg.
* qmritools_calf (healthy calves): no labels; the overlay is for a person to judge.

Weights whose provenance shows they were trained on huashan_thigh_001 (the shipped ones are) are
flagged: their DSC there is a training fit, not a result (``bench/bench_real_loo.py`` for held-out
figures).

Writes overlays to ``docs/realdata_thigh.png`` and ``docs/realdata_calf.png`` (``--docs``).

    python bench/bench_realdata.py [--docs docs] [--weights DIR] [--device auto]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def _trained_on(case: str, region: str, weights) -> bool:
    """:func:`bench_real_loo.trained_on` (the provenance check), from the script beside this one."""
    spec = importlib.util.spec_from_file_location("bench_real_loo", Path(__file__).with_name("bench_real_loo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.trained_on(case, region, weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", default=str(REALDATA))
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--docs", default=None, help="write the overlay PNGs into this folder")
    a = ap.parse_args()
    from legcomp import anatomy
    from legcomp.evaluation.metrics import dice
    from legcomp.inference import Cascade
    from legcomp.io import read_label_map, read_study
    from legcomp.preprocessing.legs import leg_map
    from legcomp.quantification import apply_label_mapping, load_label_mapping
    from legcomp.report.overlay import save_overlay

    root = Path(a.realdata)
    # ---- thigh, with reference labels
    study = read_study(root / "huashan_thigh_001")
    cascade = Cascade.load("thigh", a.weights, a.device)
    t0 = time.perf_counter()
    s1, s2 = cascade.predict(study)
    t_thigh = time.perf_counter() - t0
    mapping = load_label_mapping("huashan_thigh")
    ref = apply_label_mapping(read_label_map(root / "huashan_thigh_001" / "reference_labels.nii.gz", study),
                              mapping, "thigh")
    legs = leg_map(ref > 0, study.affine)
    mapped = sorted({anatomy.label_by_name(n, "thigh").id for n in mapping.values() if n})
    seen = _trained_on("huashan_thigh_001", "thigh", a.weights)
    status = "IN THESE WEIGHTS' TRAINING DATA: a training fit, not a result" if seen else "held out of training"
    print(f"huashan_thigh_001 ({status}): {study.shape} voxels at {tuple(round(s, 2) for s in study.spacing)} mm, "
          f"segmentation {t_thigh:.1f} s")
    # the reference labels only some slices (none at the hip): a second table is restricted to them
    ref_z = np.flatnonzero((ref > 0).any(axis=(0, 1)))
    in_ref_z = np.zeros(study.shape, bool)
    in_ref_z[:, :, ref_z] = True
    print(f"reference labels slices {ref_z.min()}-{ref_z.max()} of 0-{study.shape[2] - 1}")
    print(f"{'muscle':36s} {'left DSC':>9s} {'right DSC':>10s} {'left*':>7s} {'right*':>7s}   (* = labelled slices only)")
    per_leg: dict[str, list[float]] = {"left": [], "right": [], "left*": [], "right*": []}
    for lab_id in mapped:
        name = anatomy.MUSCLES["thigh"][lab_id - 1].name
        vals = []
        for restrict in (False, True):
            for leg_id, leg in anatomy.LEGS.items():
                sel = (legs == leg_id) & in_ref_z if restrict else legs == leg_id
                d = dice(s2[sel] == lab_id, ref[sel] == lab_id)
                per_leg[leg + ("*" if restrict else "")].append(d)
                vals.append(d)
        print(f"{name:36s} {vals[0]:9.3f} {vals[1]:10.3f} {vals[2]:7.3f} {vals[3]:7.3f}")
    means = [np.nanmean(per_leg[k]) for k in ("left", "right", "left*", "right*")]
    print(f"{'mean over mapped muscles':36s} {means[0]:9.3f} {means[1]:10.3f} {means[2]:7.3f} {means[3]:7.3f}")
    union = dice(s2 > 0, ref > 0)
    print(f"{'all mapped muscles as one mask':36s} {union:9.3f} (both legs)")

    # where the reference muscles went: stage-1 muscle coverage, and stage-2's label for them
    names = ["none"] + [lab.abbrev for lab in anatomy.MUSCLES["thigh"]]
    covered = (s1 == anatomy.WHOLE_MUSCLE.id) & (ref > 0)
    print(f"\nreference muscle voxels that stage 1 calls muscle: {covered.sum() / max(1, (ref > 0).sum()):.0%}")
    print("what stage 2 calls each reference muscle (fraction of its voxels; the two largest others):")
    for lab_id in mapped:
        got = np.bincount(s2[ref == lab_id], minlength=len(names)) / max(1, (ref == lab_id).sum())
        others = [i for i in np.argsort(got)[::-1] if i != lab_id][:2]
        print(f"  {names[lab_id]:3s} itself {got[lab_id]:4.0%}  " + "  ".join(f"{names[i]} {got[i]:4.0%}" for i in others))

    # ---- calf, no labels
    calf = read_study(root / "qmritools_calf")
    ccascade = Cascade.load("calf", a.weights, a.device)
    t0 = time.perf_counter()
    c1, c2 = ccascade.predict(calf)
    print(f"\nqmritools_calf: {calf.shape} voxels, segmentation {time.perf_counter() - t0:.1f} s; "
          f"SAT {(c1 == 1).sum() * calf.voxel_volume_ml:.0f} mL, whole muscle {(c1 == 2).sum() * calf.voxel_volume_ml:.0f} mL")
    if a.docs:
        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        levels = [3, 7, 11]
        save_overlay(study.water, study.fat, s1, s2, "thigh", study.spacing, docs / "realdata_thigh.png",
                     title="huashan_thigh_001 (real, dystrophic; "
                           + ("in the training data of these weights)" if seen else "held out of training)"),
                     levels=levels)
        save_overlay(study.water, study.fat, s1, ref, "thigh", study.spacing, docs / "realdata_thigh_reference.png",
                     title="huashan_thigh_001: stage-1 prediction | authors' reference muscles (mapped)", levels=levels)
        save_overlay(calf.water, calf.fat, c1, c2, "calf", calf.spacing, docs / "realdata_calf.png",
                     title="qmritools_calf (real, healthy; its Dixon images in no training data)")
        print(f"overlays written to {docs}")


if __name__ == "__main__":
    main()
