"""Time leg splitting, quantification and evaluation of a synthetic two-leg thigh.

Builds a 288 x 192 x 40 volume (1.5 x 1.5 x 5 mm), two legs each with SAT, whole muscle
and the 13 thigh muscles (angular sectors around a femur, thin intermuscular gaps), a
water/fat pair with fatty infiltration, and a "prediction" = the reference shifted by one
voxel with some muscle labels swapped. Prints a table of wall times (median of repeats).

    .venv/bin/python bench/bench_quantify.py [--threads 2] [--repeats 5] [--phantom]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def synthetic_thigh(shape=(288, 192, 40), spacing=(1.5, 1.5, 5.0), seed: int = 0):
    """(water, fat, stage1, stage2, affine) of a synthetic two-leg thigh, arrays (x, y, z)."""
    from legcomp import anatomy

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.mgrid[:nx, :ny].astype(np.float32)
    s1 = np.zeros(shape, np.uint8)
    s2 = np.zeros(shape, np.uint8)
    muscles = anatomy.stage_labels(2, "thigh")
    for cx in (nx * 0.27, nx * 0.73):
        cy = ny * 0.5
        for z in range(nz):
            r_out = 58 - 8 * z / nz  # thigh narrows towards the knee
            r_mus = r_out - 9
            d = np.hypot((x - cx) / 1.0, (y - cy) / 0.85)
            body = d < r_out
            mus = d < r_mus
            bone = d < 9
            s1[..., z][body] = anatomy.SAT.id
            s1[..., z][mus & ~bone] = anatomy.WHOLE_MUSCLE.id
            s1[..., z][bone] = 0
            ang = (np.arctan2(y - cy, x - cx) + np.pi) / (2 * np.pi) * len(muscles)
            sector = np.floor(ang).astype(int)
            gap = np.abs(ang - np.round(ang)) < 0.04  # intermuscular septa
            inner = mus & ~bone & ~gap
            s2[..., z][inner] = np.array([m.id for m in muscles], np.uint8)[sector[inner] % len(muscles)]
    ff = np.where(s1 == anatomy.SAT.id, 0.9, 0.0).astype(np.float32)
    ff[s1 == anatomy.WHOLE_MUSCLE.id] = rng.beta(1.5, 8.0, size=int((s1 == anatomy.WHOLE_MUSCLE.id).sum()))
    ff[(s1 == anatomy.WHOLE_MUSCLE.id) & (s2 == 0)] = 0.8
    signal = np.where(s1 > 0, 1000.0, 20.0).astype(np.float32) * (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    water = np.clip(signal * (1 - ff), 0, None)
    fat = np.clip(signal * ff, 0, None) + 5.0
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -np.array(shape) * spacing / 2
    return water, fat, s1, s2, affine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--phantom", action="store_true",
                    help="use legcomp.phantom.generate('thigh', 0) (about 30 s to build) instead of the synthetic volume")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from legcomp.evaluation import evaluate_subject, hausdorff95
    from legcomp.io.study import make_study
    from legcomp.preprocessing.legs import leg_map
    from legcomp.quantification import quantify

    if args.phantom:
        from legcomp.phantom import generate

        ph = generate("thigh", 0)
        water, fat, s1, s2, affine = ph.water, ph.fat, ph.stage1, ph.stage2, ph.affine
    else:
        water, fat, s1, s2, affine = synthetic_thigh()
    study = make_study({"water": (water, affine, "water"), "fat": (fat, affine, "fat")}, region="thigh", name="bench")
    p1 = np.roll(s1, 1, axis=0)
    p2 = np.roll(s2, 1, axis=1)
    p2[(p2 == 3) & (np.arange(s2.shape[0])[:, None, None] % 7 == 0)] = 4

    def timeit(fn, n=args.repeats):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)), out

    rows = []
    t, legs = timeit(lambda: leg_map((s1 > 0) | (s2 > 0), study.affine))
    rows.append(("leg_map", t))
    t, q = timeit(lambda: quantify(study, s1, s2))
    rows.append(("quantify (legs computed)", t))
    t, _ = timeit(lambda: quantify(study, s1, s2, legs=legs))
    rows.append(("quantify (legs given)", t))
    t, df = timeit(lambda: evaluate_subject(p1, p2, s1, s2, study))
    rows.append(("evaluate_subject (2 quantify + DSC + HD95 x 15)", t))
    t, _ = timeit(lambda: (quantify(study, p1, p2), evaluate_subject(p1, p2, s1, s2, study)))
    rows.append(("quantify + evaluate (target <= 2 s)", t))
    # HD95: legcomp (bbox-cropped scipy EDT) vs MONAI for the largest structure and one muscle
    try:
        from monai.metrics import compute_hausdorff_distance

        for name, a, b in (("whole muscle", p1 == 2, s1 == 2), ("one muscle", p2 == 5, s2 == 5)):
            t1, h1 = timeit(lambda: hausdorff95(a, b, study.spacing), 3)
            ta = torch.from_numpy(a[None, None]).float()
            tb = torch.from_numpy(b[None, None]).float()
            t2, h2 = timeit(lambda: float(compute_hausdorff_distance(ta, tb, include_background=True, percentile=95,
                                                                     spacing=study.spacing)), 3)
            rows.append((f"HD95 {name}: legcomp {h1:.2f} mm", t1))
            rows.append((f"HD95 {name}: MONAI   {h2:.2f} mm", t2))
    except ImportError:
        pass
    print(f"{'phantom' if args.phantom else 'synthetic'} thigh {s1.shape}, spacing {study.spacing} mm, "
          f"13 muscles, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"{'step':58s} {'seconds':>8s}")
    for name, t in rows:
        print(f"{name:58s} {t:8.3f}")
    tot = q.table[(q.table.leg == "total") & (q.table.measure.isin(["volume_ml", "fat_volume_ml"]))]
    print(f"table rows: {len(q.table)}; whole muscle {q.value('whole_muscle', 'volume_ml'):.1f} mL, "
          f"MAT {q.value('mat', 'fat_volume_ml'):.1f} mL, IntraMAT {q.value('intramat', 'fat_volume_ml'):.1f} mL, "
          f"InterMAT {q.value('intermat', 'fat_volume_ml'):.1f} mL; {len(tot)} total rows")
    d = df[(df.metric == "dsc")]
    print(f"DSC of the shifted prediction: mean {d.value.mean():.3f} over {len(d)} structures")


if __name__ == "__main__":
    main()
