"""Wall time and peak memory of ``legcomp run`` on one 40-slice two-leg thigh phantom.

Compares the bundled ``fast`` weights with the ``seed`` configuration (the seed study's network
size: 64-128-256-512, bottleneck 1024; untrained weights of that size, for timing only, with
the same patch size and working grid as the bundled weights). Each run is a fresh
``legcomp run`` process; peak RSS is that process's maximum resident set size.

    python bench/bench_run.py [--device cpu] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_once(study: Path, out: Path, weights: Path | None, device: str) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "legcomp.cli", "run", str(study), "--out", str(out), "--device", device, "--quiet"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"legcomp run failed: {p.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024**2  # KiB -> GiB


def seed_config_weights(folder: Path) -> Path:
    from legcomp.inference import weights_path
    from legcomp.models import build_network, read_weights_meta, save_weights

    folder.mkdir(parents=True, exist_ok=True)
    for stage in (1, 2):
        meta, _ = read_weights_meta(weights_path("thigh", stage))
        model = build_network("seed", int(meta["in_channels"]), int(meta["n_classes"]))
        extra = {k: meta[k] for k in ("patch_size", "working_spacing", "with_stage1") if k in meta}
        save_weights(folder / f"thigh_stage{stage}.pt", model, config="seed", region="thigh", stage=stage,
                     normalisation=meta.get("normalisation"), trained_on="untrained (timing only)", **extra)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-seed", action="store_true", help="only the bundled fast weights")
    a = ap.parse_args()
    from legcomp.models import count_parameters, load_weights
    from legcomp.inference import weights_path
    from legcomp.phantom import generate, write_phantom

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = write_phantom(generate("thigh", 9500), tmp / "thigh_09500")
        rows = []
        configs = [("fast (bundled)", None)] + ([] if a.skip_seed else [("seed (untrained)", seed_config_weights(tmp / "seedw"))])
        for name, wdir in configs:
            params = sum(count_parameters(load_weights(weights_path("thigh", s, wdir))[0]) for s in (1, 2))
            for r in range(a.repeats):
                wall, rss = run_once(study, tmp / f"out_{r}", wdir, a.device)
                rows.append((name, params, r, wall, rss))
        print(f"legcomp run, 40-slice two-leg thigh phantom (288 x 192 x 40, 1.5 x 1.5 x 5 mm), device={a.device}, "
              f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
        print(f"{'config':18s} {'params (s1+s2)':>15s} {'run':>4s} {'wall s':>8s} {'peak RSS GiB':>13s}")
        for name, params, r, wall, rss in rows:
            print(f"{name:18s} {params:15,d} {r:4d} {wall:8.1f} {rss:13.2f}")


if __name__ == "__main__":
    main()
