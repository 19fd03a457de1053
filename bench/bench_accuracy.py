"""Accuracy of the bundled weights on fresh phantoms whose seeds were never used in training.

Training used seeds 1000-1999 (``scripts/train_default_weights.py``); this benchmark uses seeds
9000.. (default options, i.e. the physically modelled appearance without domain randomisation;
``--randomize`` for domain-randomised ones).
For each region it runs the cascade, then ``legcomp evaluate`` against the exact label maps and
prints DSC (mean +- SD over subjects) per structure, plus the fat-volume errors.

    python bench/bench_accuracy.py [--n 10] [--regions thigh,calf] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SEED0 = 9000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--regions", default="thigh,calf")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default=None, help="weights folder (default: bundled)")
    ap.add_argument("--out", default=None, help="keep predictions and metric tables here")
    ap.add_argument("--randomize", action="store_true",
                    help="domain-randomised phantoms (contrast, resolution, slice gaps, infiltration)")
    a = ap.parse_args()
    from legcomp.evaluation import evaluate_paths
    from legcomp.inference import Cascade
    from legcomp.io import read_study
    from legcomp.phantom import generate, write_phantom

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out) if a.out else Path(tmp)
        for region in a.regions.split(","):
            cascade = Cascade.load(region, a.weights, a.device)
            truth_root, pred_root = root / region / "truth", root / region / "pred"
            t_seg = 0.0
            for i in range(a.n):
                folder = write_phantom(generate(region, SEED0 + i, randomize=a.randomize),
                                       truth_root / f"{region}_{SEED0 + i:05d}")
                study = read_study(folder)
                t0 = time.perf_counter()
                s1, s2 = cascade.predict(study)
                t_seg += time.perf_counter() - t0
                (pred_root / folder.name).mkdir(parents=True, exist_ok=True)
                study.save_like_input(s1, pred_root / folder.name / "stage1.nii.gz")
                study.save_like_input(s2, pred_root / folder.name / "stage2.nii.gz")
            ev = evaluate_paths(pred_root, truth_root, root / region / "eval")
            m = ev.metrics
            print(f"\n{region}: {a.n} {'domain-randomised ' if a.randomize else ''}phantoms "
                  f"(seeds {SEED0}-{SEED0 + a.n - 1}), mean segmentation time "
                  f"{t_seg / a.n:.1f} s/study")
            dsc = m[(m["metric"] == "dsc") & (m["leg"] == "total")]
            tab = dsc.groupby("structure", sort=False)["value"].agg(["mean", "std", "min"])
            print("DSC per structure (mean, SD, min over subjects)")
            print(tab.round(3).to_string())
            for metric in ("abs_volume_error_pct", "abs_fat_volume_error_pct", "exact_fat_volume_error_pct",
                           "reference_fat_volume_error_pct"):
                sel = m[(m["metric"] == metric) & (m["leg"] == "total")
                        & m["structure"].isin(["subcutaneous_fat", "whole_muscle", "mat", "intermat", "intramat"])]
                if len(sel):
                    print(f"\n{metric} (mean over subjects)")
                    print(sel.groupby("structure", sort=False)["value"].agg(["mean", "std"]).round(1).to_string())


if __name__ == "__main__":
    main()
