"""Train the bundled default weights: phantom cohorts, then the four networks of the cascade.

Run on a GPU machine (it also runs on a CPU, slowly):

    python scripts/train_default_weights.py --out runs/default --n 48 --minutes 6

1. generates ``--n`` thigh and ``--n`` calf phantoms in parallel (seeds 1000.., half of them with
   domain-randomised appearance and geometry, ``legcomp phantom --randomize``);
2. trains thigh/calf stage 1 and stage 2 (``fast`` config, fold 0 of 5) concurrently, each for at
   most ``--minutes`` (``legcomp train``, resuming from checkpoints already in ``--out``);
3. copies each best ``<region>_stage<k>.pt`` and writes ``<region>_stage<k>.provenance.json``
   (command, phantom seeds, git commit, validation DSC per structure) beside it.

Phantom seeds used here (1000-1999) must never be used for the held-out accuracy benchmark
(``bench/bench_accuracy.py`` uses 9000+).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TRAIN_SEED0 = 1000


def _one(args: tuple[str, int, bool, str]) -> str:
    region, seed, randomize, root = args
    import torch

    torch.set_num_threads(1)
    from legcomp.phantom import generate, write_phantom

    folder = Path(root) / region / f"{region}_{seed:05d}"
    if not (folder / "truth.json").exists():
        write_phantom(generate(region, seed, randomize=randomize), folder)
    return str(folder)


def make_cohorts(root: Path, n: int, workers: int) -> dict[str, list[int]]:
    jobs = [(r, TRAIN_SEED0 + i, i % 2 == 1, str(root)) for r in ("thigh", "calf") for i in range(n)]
    t0 = time.time()
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(_one, jobs))
    print(f"phantoms: {len(jobs)} in {time.time() - t0:.0f} s", flush=True)
    return {r: [s for rr, s, _, _ in jobs if rr == r] for r in ("thigh", "calf")}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return os.environ.get("LEGCOMP_COMMIT", "unknown")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="models folder (checkpoints, logs, weights)")
    ap.add_argument("--data", default=None, help="phantom folder (default OUT/../phantoms)")
    ap.add_argument("--n", type=int, default=48, help="phantoms per region")
    ap.add_argument("--minutes", type=float, default=6.0, help="training wall time per network")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--networks", default="thigh1,thigh2,calf1,calf2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights-out", default=None, help="copy best weights + provenance here")
    a = ap.parse_args()
    out = Path(a.out)
    data = Path(a.data) if a.data else out.parent / "phantoms"
    seeds = make_cohorts(data, a.n, a.workers)
    procs = []
    for net in a.networks.split(","):
        region, stage = net[:-1], int(net[-1])
        cmd = [sys.executable, "-m", "legcomp.training", "--data", str(data / region), "--stage", str(stage),
               "--region", region, "--folds", "5", "--fold", "0", "--config", "fast", "--out", str(out / net),
               "--epochs", str(a.epochs), "--iters", str(a.iters), "--batch", str(a.batch),
               "--time-limit", str(a.minutes), "--device", a.device, "--no-progress", "--patience", "0"]
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / f"{net}.log", "a")
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, a.workers // 4)))
        procs.append((net, region, stage, cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        print("started", " ".join(cmd[1:]), flush=True)
    rc = 0
    for net, region, stage, cmd, p in procs:
        code = p.wait()
        print(f"{net}: exit {code}", flush=True)
        rc |= code
        summary_path = out / net / f"{region}_stage{stage}.summary.json"
        if a.weights_out and (out / net / f"{region}_stage{stage}.pt").exists():
            dest = Path(a.weights_out)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / f"{region}_stage{stage}.pt").write_bytes((out / net / f"{region}_stage{stage}.pt").read_bytes())
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            prov = {"command": "python scripts/train_default_weights.py " + " ".join(sys.argv[1:]),
                    "train_command": "legcomp train " + " ".join(cmd[3:]),
                    "phantom_seeds": f"{min(seeds[region])}-{max(seeds[region])} (odd offsets randomized)",
                    "git_commit": git_commit(), "trained_on": "synthetic legcomp phantoms only",
                    "summary": summary}
            (dest / f"{region}_stage{stage}.provenance.json").write_text(json.dumps(prov, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
