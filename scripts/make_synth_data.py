"""Synthesise the training studies of the bundled weights from every label map in ``../shared/realdata``.

One folder per study under OUT/<region>/ (``legcomp synth`` output). ``--exclude`` leaves sources out by
substring (leave-one-source-out: the huashan_thigh_001 benchmark is the same person as the
multiethnic ``Training__T2__THIGH_061`` map, which ``--exclude THIGH_061`` removes).

    python scripts/make_synth_data.py --out devwork/synth --per-map 3 --workers 2 [--exclude THIGH_061]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def sources(root: Path) -> list[tuple[str, str, str, tuple | None, float]]:
    """(region, label map, mapping, z range, weight on the number of samples) of every map."""
    out = []
    me = root / "thigh_label_maps" / "multiethnic"
    for p in sorted(me.glob("*.nii.gz")):
        out.append(("thigh", str(p), str(me / "labels.json"), None, 1.0))
    mm = root / "thigh_label_maps" / "musclemap"
    out.append(("thigh", str(mm / "test_dseg.nii.gz"), str(mm / "labels.json"), None, 3.0))
    qt = root / "qmritools_thigh"
    out.append(("thigh", str(qt / "reference_labels.nii.gz"), str(qt / "labels.json"), (2, 23), 4.0))
    qc = root / "qmritools_calf_labels"
    out.append(("calf", str(qc / "reference_labels.nii.gz"), str(qc / "labels.json"), None, 1.0))
    return out


def _one(job: tuple) -> str:
    from legcomp.phantom.generator import write_phantom
    from legcomp.phantom.synth import load_source, study_name, synthesize

    region, lm, mp, zr, seed, out = job
    src = load_source(lm, mp, region, zr)
    folder = Path(out) / region / study_name(src, seed)
    if not folder.exists():  # a re-run completes an interrupted one
        write_phantom(synthesize(src, seed), folder)
    return folder.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", default=str(REALDATA))
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-map", type=int, default=3, help="studies per multiethnic map (others by weight)")
    ap.add_argument("--calf", type=int, default=30, help="studies from the calf label map")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--exclude", action="append", default=[], help="leave out maps whose path contains this")
    ap.add_argument("--regions", nargs="+", default=["thigh", "calf"])
    a = ap.parse_args()
    jobs = []
    for region, lm, mp, zr, w in sources(Path(a.realdata)):
        if region not in a.regions or any(x in lm for x in a.exclude):
            continue
        n = a.calf if region == "calf" else int(round(a.per_map * w))
        jobs += [(region, lm, mp, zr, a.seed + i, a.out) for i in range(n)]
    jobs.sort(key=lambda j: (j[4], j[1]))  # every map early on, so a cut-short run is still varied
    t0 = time.time()
    with ProcessPoolExecutor(a.workers) as ex:
        for i, name in enumerate(ex.map(_one, jobs), 1):
            print(f"{i}/{len(jobs)} {name} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
