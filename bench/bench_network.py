"""Benchmark the Attention-Res-V-Net configs on CPU: parameters, forward time, peak memory.

Usage: python bench/bench_network.py [--threads 2] [--size 128 128 32] [--repeats 3]

Each config runs in its own subprocess so that the peak resident memory (RSS) is its own.
Prints a table: config, levels, parameters, forward time (s) per (1, 2, X, Y, Z) patch in eval
mode, peak RSS (MiB), and one training step's time (forward + backward, batch 1).

Measured 2026-11-25 on the GPU machine's CPU (Intel Xeon, ``taskset -c 0,1``, 2 threads), with
MONAI's attention blocks (batch norm inside the gates; < 1 % of the compute):

    config          params      divisor  forward_s  train_step_s  peak_rss_fwd_MiB  peak_rss_train_MiB
    fast16       5,008,071  (16, 16, 4)      1.231         5.119              1463                2073
    fast16_g1    7,216,455  (16, 16, 4)      1.349         4.616              1392                2079
    narrow8_g4   1,253,451  (16, 16, 4)      0.738         2.775              1247                1642
    seed        74,171,631  (16, 16, 4)     11.254        39.324              2501                5121

Accuracy after the same 300 training steps (stage 1 thigh, 12 randomised phantoms, 2 validation
phantoms, H100, batch 4): validation mean DSC fast16 0.969, fast16_g1 0.969, seed 0.974.
On this project's 2-core machine (shared, load ~2, 1 thread), measured with batch-norm-free attention gates
(since reverted to MONAI's AttentionBlock; the gates are < 1 % of the CPU compute):

    config          params      divisor  forward_s  train_step_s  peak_rss_fwd_MiB  peak_rss_train_MiB
    fast         1,805,239  (16, 16, 4)      0.866         3.809               625                1044
    fast16       5,007,463  (16, 16, 4)      2.643         9.864               769                1503
    narrow8_g4   1,253,143  (16, 16, 4)      1.305         4.455               639                1035
    seed        74,169,223  (16, 16, 4)     25.188       114.244              1878                4230
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CANDIDATES = {
    "fast": "fast",  # 8-16-32-64, bottleneck 128, plain convolutions
    "fast16": {"features": [16, 32, 64, 128], "bottleneck": 256, "groups": 4},  # the first "fast"
    "narrow8_g4": {"features": [8, 16, 32, 64], "bottleneck": 128, "groups": 4},
    "seed": "seed",
}


def _one(config, threads: int, size: list[int], repeats: int) -> dict:
    import resource
    import time

    import torch

    from legcomp.models import build_network, count_parameters, network_divisor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_network(config, 2, 3)
    x = torch.randn(1, 2, *size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.eval()
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    rss_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    t = time.perf_counter()
    loss = model(x).float().mean()
    loss.backward()
    opt.step()
    t_train = time.perf_counter() - t
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"params": count_parameters(model), "divisor": network_divisor(config),
            "forward_s": min(times), "train_step_s": t_train,
            "rss_fwd_mib": (rss_fwd - rss0) / 1024 + rss0 / 1024, "rss_train_mib": rss_train / 1024}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=3, default=[128, 128, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        print(json.dumps(_one(CANDIDATES[a._child], a.threads, a.size, a.repeats)))
        return
    print(f"CPU, {a.threads} threads, input (1, 2, {', '.join(map(str, a.size))}), float32, best of {a.repeats}")
    print(f"{'config':<10} {'params':>11} {'divisor':>12} {'forward_s':>10} {'train_step_s':>13} {'peak_rss_fwd_MiB':>17} "
          f"{'peak_rss_train_MiB':>19}")
    for name in a.configs:
        out = subprocess.run([sys.executable, __file__, "--_child", name, "--threads", str(a.threads),
                              "--size", *map(str, a.size), "--repeats", str(a.repeats)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<10} {r['params']:>11,} {str(tuple(r['divisor'])):>12} {r['forward_s']:>10.3f} "
              f"{r['train_step_s']:>13.3f} {r['rss_fwd_mib']:>17.0f} {r['rss_train_mib']:>19.0f}")


if __name__ == "__main__":
    main()
