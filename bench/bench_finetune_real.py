"""How far one labelled real leg takes the bundled thigh muscle network: leg-wise 2-fold check.

On huashan_thigh_001 (``../shared/realdata``) the bundled stage-2 thigh network is fine-tuned
(``legcomp.training.train`` with ``init_weights``) on one leg's reference labels (mapped with the
shipped ``huashan_thigh`` mapping) and tested on the other leg, then the other way round. The
training study is made as ``legcomp prepare`` makes it: the training leg's whole muscle is the
bundled stage-1 prediction joined with its reference muscles, and the other leg is left out. No validation: the last epoch's
weights are tested, so the held-out leg never chooses anything. Stage 1 stays the bundled network.

Prints DSC per mapped muscle on each held-out leg, bundled vs fine-tuned, and the means. This is
what a lab with a few expert-labelled real legs can expect from ``legcomp train --init``; the
fine-tuned weights are not shipped (they have seen the benchmark subject).

    python bench/bench_finetune_real.py [--minutes 10] [--from-scratch] [--docs docs] [--device auto] [--threads 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", default=str(REALDATA))
    ap.add_argument("--minutes", type=float, default=10.0, help="fine-tuning time per fold (minutes)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weights", default=None, help="weights folder to start from (default: bundled)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", default=None, help="write realdata_thigh_finetuned.png (each leg by the network "
                    "fine-tuned on the other) into this folder")
    ap.add_argument("--from-scratch", action="store_true",
                    help="start from random weights instead of the bundled ones (what the phantom prior is worth)")
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from legcomp import anatomy
    from legcomp.evaluation.metrics import dice
    from legcomp.inference import Cascade
    from legcomp.inference.cascade import Network, weights_path
    from legcomp.io import read_label_map, read_study
    from legcomp.models import load_weights, read_weights_meta
    from legcomp.preprocessing import inputs as prep
    from legcomp.prepare import prepare_study
    from legcomp.preprocessing.legs import leg_map
    from legcomp.quantification import apply_label_mapping, load_label_mapping
    from legcomp.training import train
    from legcomp.training.data import study_cases

    root = Path(a.realdata) / "huashan_thigh_001"
    study = read_study(root)
    mapping = load_label_mapping("huashan_thigh")
    ref = apply_label_mapping(read_label_map(root / "reference_labels.nii.gz", study), mapping, "thigh")
    mapped = sorted({anatomy.label_by_name(n, "thigh").id for n in mapping.values() if n})
    bundled = Cascade.load("thigh", a.weights, a.device)
    s1, s2_bundled = bundled.predict(study)
    legs = leg_map(ref > 0, study.affine)  # as bench_realdata.py: every voxel to a leg
    init = weights_path("thigh", 2, a.weights)
    norm = prep.normalisation_of(read_weights_meta(init)[0])["method"]

    results = {}
    held_out = np.zeros(study.shape, np.uint8)  # each leg labelled by the network that never saw it
    with tempfile.TemporaryDirectory(prefix="legcomp-ft-") as tmp:
        for train_leg, test_leg in ((1, 2), (2, 1)):
            labelled, _ = prepare_study(study, ref, "thigh", bundled, legs=(train_leg,))  # as `legcomp prepare`
            cases = study_cases(labelled, 2, "thigh", normalisation=norm)
            out = Path(tmp) / f"train_{anatomy.LEGS[train_leg]}"
            t0 = time.perf_counter()
            summary = train(None, stage=2, region="thigh", out=out, folds=1, config="fast", epochs=10_000,
                            iters_per_epoch=10, patch=(96, 96, 16), batch=2, lr=a.lr, seed=a.seed,
                            device=a.device, patience=0, time_limit_min=a.minutes, progress=False,
                            cases=(cases, []), init_weights=None if a.from_scratch else init,
                            normalisation=norm)
            model, meta = load_weights(out / "thigh_stage2.pt", region="thigh", stage=2)
            dev = bundled.stage2.device
            tuned = dataclasses.replace(bundled, stage2=Network(model.to(dev).eval(), meta, dev))
            s2 = tuned.predict_stage2(study, s1)
            sel = legs == test_leg
            held_out[sel] = s2[sel]
            results[test_leg] = {
                "bundled": [dice(s2_bundled[sel] == i, ref[sel] == i) for i in mapped],
                "tuned": [dice(s2[sel] == i, ref[sel] == i) for i in mapped],
                "epochs": summary.get("epochs_run"), "minutes": (time.perf_counter() - t0) / 60}

    start = "random weights" if a.from_scratch else f"the weights in {a.weights}" if a.weights else "the bundled weights"
    print(f"huashan_thigh_001, stage 2 trained from {start} on one leg for {a.minutes:g} min, tested on the "
          f"other (DSC against the reference labels)")
    print(f"{'muscle':36s} {'left: start':>14s} {'tuned':>7s} {'right: start':>15s} {'tuned':>7s}   "
          f"(start: the --weights networks, default bundled, before any training)")
    for k, lab_id in enumerate(mapped):
        name = anatomy.MUSCLES["thigh"][lab_id - 1].name
        lft, rgt = results[1], results[2]
        print(f"{name:36s} {lft['bundled'][k]:14.3f} {lft['tuned'][k]:7.3f} {rgt['bundled'][k]:15.3f} "
              f"{rgt['tuned'][k]:7.3f}")
    print(f"{'mean over mapped muscles':36s} {np.nanmean(results[1]['bundled']):14.3f} "
          f"{np.nanmean(results[1]['tuned']):7.3f} {np.nanmean(results[2]['bundled']):15.3f} "
          f"{np.nanmean(results[2]['tuned']):7.3f}")
    for leg_id, r in results.items():
        print(f"trained on the {anatomy.LEGS[3 - leg_id]} leg: {r['epochs']} epochs of 10 steps, "
              f"{r['minutes']:.1f} min including set-up")
    if a.docs:
        from legcomp.report.overlay import save_overlay

        docs = Path(a.docs)
        docs.mkdir(parents=True, exist_ok=True)
        name = "realdata_thigh_scratch.png" if a.from_scratch else "realdata_thigh_finetuned.png"
        save_overlay(study.water, study.fat, s1, held_out, "thigh", study.spacing, docs / name, levels=[3, 7, 11],
                     title=f"huashan_thigh_001: each leg by the stage-2 network trained {a.minutes:g} min on the "
                           f"other leg's labels")
        print(f"overlay written to {docs / name}")


if __name__ == "__main__":
    main()
