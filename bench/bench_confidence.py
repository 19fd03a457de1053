"""Does per-structure confidence rank bad segmentations below good ones?

Template phantoms (never seen in training: seeds 9100..) are rendered clean (the generator's
defaults, SNR 30, bias 0.3) and degraded: Rician noise (SNR 5), a strong coil bias (0.9), an
in-plane Gaussian blur (sigma 1.5 voxels, every contrast) and all three at once. The bundled
cascade segments each; per structure and leg, the confidence written to volumes.csv (the mean,
over the structure, of the network's probability of the label it chose:
:meth:`legcomp.inference.Cascade.predict` with ``return_confidence``) is set against its DSC with
the exact labels. Prints Spearman's rank correlation (all structures, stage 1, stage 2, and within
each structure across conditions) and, for the low-confidence flag of the report
(:data:`legcomp.report.flags.LOW_CONFIDENCE`), how many poor segmentations (DSC < 0.8) it catches.

    python bench/bench_confidence.py [--thigh 2] [--calf 1] [--device cpu]

4-6 minutes on 2 CPU cores (shared with other jobs) with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd
from scipy import ndimage, stats

SEED0 = 9100
POOR_DSC = 0.8
CONDITIONS: dict[str, dict] = {
    "clean": {},
    "noise (SNR 5)": {"snr": 5.0},
    "bias 0.9": {"bias": 0.9},
    "blur 1.5 vx": {"blur": 1.5},
    "all three": {"snr": 5.0, "bias": 0.9, "blur": 1.5},
}


def blurred(ph, sigma: float):
    """The phantom with every contrast blurred in-plane (Gaussian, ``sigma`` voxels along x and y)."""
    if not sigma:
        return ph
    return dataclasses.replace(ph, **{k: ndimage.gaussian_filter(getattr(ph, k), (sigma, sigma, 0))
                                      for k in ("water", "fat", "in_phase", "opposed_phase")})


def dsc_and_confidence(ph, cascade, region: str) -> pd.DataFrame:
    """One row per (structure, leg): DSC against the phantom's labels and the structure's confidence."""
    from legcomp import anatomy
    from legcomp.evaluation.metrics import dice
    from legcomp.preprocessing.legs import leg_map
    from legcomp.quantification import quantify

    study = ph.to_study()
    s1, s2, conf = cascade.predict(study, return_confidence=True)
    q = quantify(study, s1, s2, region=region, confidence=conf, legs=None)
    t = q.table[q.table.measure == "confidence"].set_index(["structure", "leg"])["value"]
    legs = leg_map((s1 > 0) | (ph.stage1 > 0), study.affine)
    rows = []
    for lab in (*anatomy.STAGE1, *anatomy.MUSCLES[region]):
        pred, truth = (s1, ph.stage1) if lab.stage == 1 else (s2, ph.stage2)
        for leg_id, leg in anatomy.LEGS.items():
            in_leg = legs == leg_id
            p, g = (pred == lab.id) & in_leg, (truth == lab.id) & in_leg
            if not g.any() or (lab.name, leg) not in t.index:
                continue
            rows.append({"structure": lab.name, "stage": lab.stage, "leg": leg, "dsc": dice(p, g),
                         "confidence": float(t[(lab.name, leg)])})
    return pd.DataFrame(rows)


def spearman(d: pd.DataFrame) -> str:
    r = stats.spearmanr(d["confidence"], d["dsc"])
    return f"{r.statistic:+.2f} (p {r.pvalue:.1g}, n {len(d)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thigh", type=int, default=2, help="thigh phantoms")
    ap.add_argument("--calf", type=int, default=1, help="calf phantoms")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default=None, help="write every point here")
    a = ap.parse_args()
    from legcomp.inference import Cascade
    from legcomp.phantom import generate
    from legcomp.report.flags import LOW_CONFIDENCE

    t0 = time.perf_counter()
    parts = []
    for region, n in (("thigh", a.thigh), ("calf", a.calf)):
        if n < 1:
            continue
        cascade = Cascade.load(region, None, a.device)
        for i in range(n):
            seed = SEED0 + i
            rendered: dict[tuple, object] = {}
            for cond, opts in CONDITIONS.items():
                gen = {k: v for k, v in opts.items() if k in ("snr", "bias")}
                key = tuple(sorted(gen.items()))
                if key not in rendered:
                    rendered[key] = generate(region, seed, **gen)
                d = dsc_and_confidence(blurred(rendered[key], opts.get("blur", 0.0)), cascade, region)
                parts.append(d.assign(region=region, seed=seed, condition=cond))
                print(f"  {region} {seed} {cond}: mean DSC {d.dsc.mean():.3f}, mean confidence "
                      f"{d.confidence.mean():.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    df = pd.concat(parts, ignore_index=True)
    if a.csv:
        df.to_csv(a.csv, index=False)

    print(f"\nPer condition (mean over structures and legs; {a.thigh} thigh + {a.calf} calf phantoms)")
    tab = df.groupby(["condition", "stage"], sort=False)[["dsc", "confidence"]].mean().unstack("stage")
    tab.columns = [f"{m} stage {s}" for m, s in tab.columns]
    print(tab.round(3).to_string())

    print("\nSpearman rank correlation, confidence vs DSC")
    within = [stats.spearmanr(g.confidence, g.dsc).statistic for _, g in df.groupby(["region", "structure"])
              if g.dsc.nunique() > 1 and g.confidence.nunique() > 1]
    lines = [("all structures", spearman(df)), ("stage 1 (SAT, whole muscle)", spearman(df[df.stage == 1])),
             ("stage 2 (muscles)", spearman(df[df.stage == 2])),
             ("within a structure (median over structures)", f"{np.nanmedian(within):+.2f} ({len(within)} structures)")]
    print(pd.DataFrame(lines, columns=["points", "rho"]).to_string(index=False))

    poor, low = df.dsc < POOR_DSC, df.confidence < LOW_CONFIDENCE
    print(f"\nLow-confidence flag (confidence < {LOW_CONFIDENCE}) against poor segmentations (DSC < {POOR_DSC})")
    print(pd.DataFrame([{"poor": int(poor.sum()), "flagged": int(low.sum()), "poor and flagged": int((poor & low).sum()),
                         "good but flagged": int((~poor & low).sum())}]).to_string(index=False))
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
