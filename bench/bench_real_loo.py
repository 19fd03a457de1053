"""Leave-one-source-out validation of the muscle networks on the real scans in ``../shared/realdata``.

Held out: huashan_thigh_001 (real dystrophic thighs with the authors' reference labels) together with
the label map of the same person (multiethnic ``Training__T2__THIGH_061``). The thigh muscle network
is trained without them (``--train``: studies synthesised from every other label map, plus
template phantoms, starting from the bundled weights) and then scored on them. The calf has no real
Dixon scan with labels: the healthy qmritools_calf is scored by what a person checks first (every
calf muscle present in each leg, in its compartment, and the share of stage-1 muscle left without
a muscle label).

Printed per leg: DSC per reference muscle on the reference's labelled slices, their mean, whole
muscle against the union of the reference muscles, and the share of stage-1 muscle without a muscle
label (which the quantification would count as InterMAT).

    python bench/bench_real_loo.py --weights DIR                    # score a weights folder
    python bench/bench_real_loo.py --train --out devwork/loo --minutes 60 --per-map 3
    python bench/bench_real_loo.py ... --docs docs                  # also the overlays for the README
    python bench/bench_real_loo.py                                  # the shipped weights (trained on the case too:
                                                                    # their provenance says so, and so do the tables)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
HELD_OUT = {"huashan_thigh_001": ["THIGH_061"]}
"""Real labelled case -> label-map sources of the same person, left out with it."""

ANTERIOR = ("tibialis_anterior", "extensor_hallucis_digitorum_longus")
POSTERIOR = ("gastrocnemius_medialis", "gastrocnemius_lateralis", "soleus")
DEEP = ("flexor_digitorum_longus", "flexor_hallucis_longus", "tibialis_posterior")
MIDLINE_MM = 15.0
"""Half-width (mm) of the band about the body midline where a thigh holds no muscle (below the hip)."""


def trained_on(case: str, region: str, weights=None) -> bool:
    """Whether the stage-1 or stage-2 network of ``region`` in ``weights`` (default: bundled) was trained
    on the study ``case``: its provenance's training split (or that of a run it continued) names it."""
    from legcomp.inference.cascade import cascade_paths
    from legcomp.training.provenance import read_provenance

    for path in cascade_paths(region, weights).values():
        d = read_provenance(path)
        while isinstance(d, dict):
            if any(Path(str(t)).name == case for t in (d.get("split") or {}).get("train", [])):
                return True
            d = d.get("previous")
    return False


def score_thigh(root: Path, weights, device: str = "cpu") -> dict:
    """DSC per muscle and leg on huashan_thigh_001 (labelled slices), whole muscle, unlabelled muscle share."""
    from legcomp import anatomy
    from legcomp.evaluation.metrics import dice
    from legcomp.inference import Cascade
    from legcomp.io import read_label_map, read_study
    from legcomp.preprocessing.legs import leg_map
    from legcomp.quantification import apply_label_mapping, load_label_mapping

    study = read_study(root / "huashan_thigh_001")
    t0 = time.perf_counter()
    s1, s2, conf = Cascade.load("thigh", weights, device).predict(study, return_confidence=True)
    seconds = time.perf_counter() - t0
    mapping = load_label_mapping("huashan_thigh")
    ref = apply_label_mapping(read_label_map(root / "huashan_thigh_001" / "reference_labels.nii.gz", study),
                              mapping, "thigh")
    legs = leg_map((ref > 0) | (s1 > 0), study.affine)
    zs = np.flatnonzero((ref > 0).any(axis=(0, 1)))
    lab_z = np.zeros(study.shape, bool)
    lab_z[:, :, zs.min():zs.max() + 1] = True
    mapped = sorted({anatomy.label_by_name(n, "thigh").id for n in mapping.values() if n})
    out: dict = {"seconds": round(seconds, 1), "labelled_slices": [int(zs.min()), int(zs.max())],
                 "n_slices": int(study.shape[2]), "muscles": {}, "confidence": {}, "legs": {}}
    for lab_id in mapped:
        name = anatomy.MUSCLES["thigh"][lab_id - 1].name
        out["muscles"][name] = {leg: round(dice(s2[(legs == i) & lab_z] == lab_id, ref[(legs == i) & lab_z] == lab_id), 4)
                                for i, leg in anatomy.LEGS.items()}
        # the network's own confidence (mean probability of its label over the structure, as volumes.csv),
        # which a user sees without a reference: does it rank the muscles as the DSC does?
        out["confidence"][name] = {leg: round(float(conf[2][(legs == i) & lab_z & (s2 == lab_id)].mean()), 4)
                                   if ((legs == i) & lab_z & (s2 == lab_id)).any() else None
                                   for i, leg in anatomy.LEGS.items()}
    pairs = [(out["confidence"][m][leg], out["muscles"][m][leg]) for m in out["muscles"] for leg in anatomy.LEGS.values()
             if out["confidence"][m][leg] is not None]
    if len(pairs) >= 3:
        from scipy.stats import spearmanr
        out["confidence_dsc_spearman"] = round(float(spearmanr(*zip(*pairs)).statistic), 3)
    # stage-1 muscle near the body midline on the slices below the hip: between the thighs, where the
    # genitals lie and no thigh muscle does (the reference's muscle there is printed beside it as a check)
    from legcomp.preprocessing.legs import hip_slices, split_legs
    split = split_legs(s1 > 0, study.affine)
    hip = hip_slices(split.coverage, "thigh")
    mid_x = np.where(np.isfinite(split.midline_x), split.midline_x, np.nanmedian(split.midline_x))
    x_mm = np.abs(np.arange(study.shape[0])[:, None] - mid_x[None, :]) * study.spacing[0]  # (x, z)
    midline = (x_mm < MIDLINE_MM)[:, None, :] & ~hip[None, None, :]
    midline = np.broadcast_to(midline, study.shape)
    out["midline_ml"] = {"stage1_muscle": round(float(((s1 == anatomy.WHOLE_MUSCLE.id) & midline).sum()
                                                      * study.voxel_volume_ml), 1),
                         "reference_muscle": round(float(((ref > 0) & midline).sum() * study.voxel_volume_ml), 1)}
    for i, leg in anatomy.LEGS.items():
        sel = (legs == i) & lab_z
        mus = (s1 == anatomy.WHOLE_MUSCLE.id) & (legs == i)
        out["legs"][leg] = {
            "reference_muscle_in_stage1_muscle": round(
                float((mus & sel & (ref > 0)).sum() / max(1, (sel & (ref > 0)).sum())), 4),
            "mean_muscle_dsc": round(float(np.mean([out["muscles"][m][leg] for m in out["muscles"]])), 4),
            "whole_muscle_vs_reference_union": round(dice(s1[sel] == anatomy.WHOLE_MUSCLE.id, ref[sel] > 0), 4),
            "stage1_muscle_without_label": round(float((mus & (s2 == 0)).sum() / max(1, mus.sum())), 4),
            "stage1_muscle_without_label_labelled_slices": round(
                float((mus & lab_z & (s2 == 0)).sum() / max(1, (mus & lab_z).sum())), 4),
            # context: the reference labels residual muscle only, not fat-replaced muscle
            "reference_without_label_labelled_slices": round(
                float((mus & lab_z & (ref == 0)).sum() / max(1, (mus & lab_z).sum())), 4)}
    out["_arrays"] = (study, s1, s2, ref)
    return out


def score_calf(root: Path, weights, device: str = "cpu") -> dict:
    """Per leg of the healthy qmritools_calf: each muscle's volume (mL), compartment checks, unlabelled share."""
    from legcomp import anatomy
    from legcomp.inference import Cascade
    from legcomp.io import read_study
    from legcomp.preprocessing.legs import leg_map

    study = read_study(root / "qmritools_calf")
    s1, s2 = Cascade.load("calf", weights, device).predict(study)
    legs = leg_map(s1 > 0, study.affine)
    vox = study.voxel_volume_ml
    out: dict = {"legs": {}}
    ids = {lab.name: lab.id for lab in anatomy.CALF_MUSCLES}
    for i, leg in anatomy.LEGS.items():
        mus = (s1 == anatomy.WHOLE_MUSCLE.id) & (legs == i)
        vols = {n: round(float(((s2 == k) & (legs == i)).sum() * vox), 1) for n, k in ids.items()}

        def y_of(names):
            pts = [np.argwhere((s2 == ids[n]) & (legs == i)) for n in names]
            pts = [p for p in pts if len(p)]
            return float(np.concatenate(pts)[:, 1].mean()) if pts else float("nan")

        ya, yd, yp = y_of(ANTERIOR), y_of(DEEP), y_of(POSTERIOR)  # RAS+: y grows anteriorly
        out["legs"][leg] = {"volumes_ml": vols, "present": int(sum(v >= 1.0 for v in vols.values())),
                            "compartments_in_order": bool(ya > yd > yp),
                            "stage1_muscle_without_label": round(float((mus & (s2 == 0)).sum() / max(1, mus.sum())), 4)}
    out["_arrays"] = (study, s1, s2)
    return out


def print_tables(thigh: dict | None, calf: dict | None, title: str, seen: bool = False) -> None:
    print(f"\n## {title}")
    if thigh:
        z0, z1 = thigh["labelled_slices"]
        status = "IN THESE WEIGHTS' TRAINING DATA: a training fit, not a result" if seen else "held out"
        print(f"\nhuashan_thigh_001 ({status}), DSC on the reference's labelled slices {z0}-{z1} of "
              f"0-{thigh['n_slices'] - 1}; segmentation {thigh['seconds']} s\n")
        print("| muscle | left | right | confidence left | confidence right |\n|---|---|---|---|---|")
        conf = thigh.get("confidence", {})

        def c(m: str, leg: str) -> str:
            v = conf.get(m, {}).get(leg)
            return "-" if v is None else f"{v:.3f}"
        for m, d in thigh["muscles"].items():
            print(f"| {m} | {d['left']:.3f} | {d['right']:.3f} | {c(m, 'left')} | {c(m, 'right')} |")
        L, R = thigh["legs"]["left"], thigh["legs"]["right"]
        print(f"| **mean over muscles** | **{L['mean_muscle_dsc']:.3f}** | **{R['mean_muscle_dsc']:.3f}** |")
        print(f"| whole muscle vs union of reference muscles | {L['whole_muscle_vs_reference_union']:.3f} | "
              f"{R['whole_muscle_vs_reference_union']:.3f} |")
        print(f"| reference muscle inside stage-1 muscle (labelled slices) | "
              f"{L['reference_muscle_in_stage1_muscle']:.1%} | {R['reference_muscle_in_stage1_muscle']:.1%} |")
        print(f"| stage-1 muscle without a muscle label (all slices) | {L['stage1_muscle_without_label']:.1%} | "
              f"{R['stage1_muscle_without_label']:.1%} |")
        print(f"| the same, labelled slices only | {L['stage1_muscle_without_label_labelled_slices']:.1%} | "
              f"{R['stage1_muscle_without_label_labelled_slices']:.1%} |")
        print(f"| (the reference's own share there) | {L['reference_without_label_labelled_slices']:.1%} | "
              f"{R['reference_without_label_labelled_slices']:.1%} |")
        mid = thigh["midline_ml"]
        print(f"\nStage-1 muscle within {MIDLINE_MM:.0f} mm of the body midline below the hip (between the thighs): "
              f"{mid['stage1_muscle']:.1f} mL (reference muscle there: {mid['reference_muscle']:.1f} mL)")
        if "confidence_dsc_spearman" in thigh:
            print(f"\nSpearman correlation of the network's confidence with DSC over muscles and legs: "
                  f"{thigh['confidence_dsc_spearman']:+.2f}")
    if calf:
        print("\nqmritools_calf (healthy, no labels): volume per muscle (mL)\n")
        print("| muscle | left | right |\n|---|---|---|")
        for m in calf["legs"]["left"]["volumes_ml"]:
            print(f"| {m} | {calf['legs']['left']['volumes_ml'][m]:.1f} | {calf['legs']['right']['volumes_ml'][m]:.1f} |")
        L, R = calf["legs"]["left"], calf["legs"]["right"]
        print(f"| muscles present (>= 1 mL) of 9 | {L['present']} | {R['present']} |")
        print(f"| anterior > deep > superficial posterior (centroids) | {L['compartments_in_order']} | "
              f"{R['compartments_in_order']} |")
        print(f"| stage-1 muscle without a muscle label | {L['stage1_muscle_without_label']:.1%} | "
              f"{R['stage1_muscle_without_label']:.1%} |")


def _make_synth():
    spec = importlib.util.spec_from_file_location("make_synth_data", ROOT / "scripts" / "make_synth_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_without(held_out: str, root: Path, out: Path, *, per_map: float, max_maps: int | None, phantoms: int,
                  minutes: float, epochs: int, iters: int, lr: float, seed: int, workers: int,
                  patch: tuple = (96, 96, 32)) -> Path:
    """Synthesise thigh studies from every label map except the held-out person's, add template
    phantoms, fine-tune the bundled thigh muscle network on them; returns the weights folder."""
    from legcomp.phantom import generate_cohort
    from legcomp.training import train

    ms = _make_synth()
    data = out / "data"
    jobs = []
    srcs = [s for s in ms.sources(root) if s[0] == "thigh" and not any(x in s[1] for x in HELD_OUT[held_out])]
    srcs = srcs[:max_maps] if max_maps else srcs
    for region, lm, mp, zr, w in srcs:
        jobs += [(region, lm, mp, zr, seed + i, str(data)) for i in range(max(1, int(round(per_map * w))))]
    for job in jobs:
        ms._one(job)
    if phantoms:
        generate_cohort("thigh", phantoms, 2000 + seed, data / "thigh", progress=False, randomize=True)
    weights = out / "weights"
    summary = train(data / "thigh", stage=2, region="thigh", out=weights, folds=1, epochs=epochs,
                    iters_per_epoch=iters, lr=lr, seed=seed, device="cpu", time_limit_min=minutes, progress=False,
                    init_weights="bundled", workers=workers, patch=patch)
    (out / "loo.json").write_text(json.dumps({"held_out": held_out, "excluded_sources": HELD_OUT[held_out],
                                              "sources": [s[1] for s in srcs], "n_synth": len(jobs),
                                              "n_phantoms": phantoms,
                                              "train": {k: v for k, v in summary.items() if k != "paths"}},
                                             indent=1))
    return weights


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", default=str(REALDATA))
    ap.add_argument("--weights", default=None, help="weights folder to score (default: the bundled weights)")
    ap.add_argument("--train", action="store_true", help="leave-one-source-out training first (thigh stage 2)")
    ap.add_argument("--out", default="devwork/loo", help="with --train: data, weights and loo.json go here")
    ap.add_argument("--per-map", type=float, default=3, help="synthesised studies per label map")
    ap.add_argument("--max-maps", type=int, default=None, help="use only the first N label maps (tiny runs)")
    ap.add_argument("--phantoms", type=int, default=16, help="randomised template phantoms added")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--patch", type=int, nargs=3, default=(96, 96, 32), metavar=("X", "Y", "Z"))
    ap.add_argument("--no-calf", action="store_true")
    ap.add_argument("--docs", default=None, help="write overlay PNGs of the scored weights here")
    ap.add_argument("--json", default=None, help="write the scores as JSON here")
    ap.add_argument("--seen", action="store_true",
                    help="the weights were trained on huashan_thigh_001: say so in the tables and overlay instead "
                         "of 'held out' (found from the weights' provenance anyway; this forces it)")
    a = ap.parse_args(argv)
    root = Path(a.realdata)
    if not (root / "huashan_thigh_001").is_dir():
        sys.exit(f"bench_real_loo: no real data at {root}")
    weights = a.weights
    if a.train:
        weights = train_without("huashan_thigh_001", root, Path(a.out), per_map=a.per_map, max_maps=a.max_maps,
                                phantoms=a.phantoms, minutes=a.minutes, epochs=a.epochs, iters=a.iters, lr=a.lr,
                                seed=a.seed, workers=a.workers, patch=tuple(a.patch))
    a.seen = a.seen or trained_on("huashan_thigh_001", "thigh", weights)
    thigh = score_thigh(root, weights)
    calf = None if a.no_calf else score_calf(root, weights)
    print_tables(thigh, calf, f"weights: {weights or 'bundled'}", seen=a.seen)
    if a.docs:
        from legcomp.report.overlay import save_overlay

        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        study, s1, s2, _ = thigh["_arrays"]
        save_overlay(study.water, study.fat, s1, s2, "thigh", study.spacing, docs / "realdata_thigh.png",
                     title="huashan_thigh_001 (real, dystrophic; "
                           + ("in the training data of these weights)" if a.seen else "held out of training)"),
                     levels=[3, 7, 11])
        if calf:
            cs, c1, c2 = calf["_arrays"]
            save_overlay(cs.water, cs.fat, c1, c2, "calf", cs.spacing, docs / "realdata_calf.png",
                         title="qmritools_calf (real, healthy)")
    res = {"weights": str(weights or "bundled"), "huashan_thigh_001_in_training": bool(a.seen),
           "thigh": {k: v for k, v in thigh.items() if k != "_arrays"},
           "calf": None if calf is None else {k: v for k, v in calf.items() if k != "_arrays"}}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
