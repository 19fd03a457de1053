"""DistributedDataParallel smoke test: 2 CPU processes (gloo), tiny data, parameters stay in sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from legcomp.training.toy import write_toy_cohort

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.multiprocessing as mp

    def worker(rank, world, port, data, out, res):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from legcomp.training import train
        s = train(data, stage=1, region="thigh", out=out, folds=1, config="tiny", epochs=1, iters_per_epoch=2,
                  batch=1, patch=(16, 16, 4), working_spacing=None, progress=False, device="cpu", seed=3,
                  cache=os.path.join(res, "cache"))
        with open(os.path.join(res, f"rank{rank}.json"), "w") as fh:
            json.dump(s, fh)

    if __name__ == "__main__":
        data, out, res, port = sys.argv[1:5]
        mp.spawn(worker, args=(2, int(port), data, out, res), nprocs=2, join=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    write_toy_cohort(tmp_path / "data", 2, shape=(32, 16, 4))
    script = tmp_path / "run_ddp.py"
    script.write_text(SCRIPT)
    res = tmp_path / "res"
    res.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path / "out"), str(res),
                           str(_free_port())], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = [json.loads((res / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [x["rank"] for x in s] == [0, 1] and all(x["world_size"] == 2 for x in s)
    assert all(x["steps"] == 2 for x in s)
    # each rank trained on its own shard, yet DDP kept the parameters identical
    assert s[0]["n_train_cases"] == s[1]["n_train_cases"] == 1
    assert abs(s[0]["param_checksum"] - s[1]["param_checksum"]) < 1e-6 * max(1.0, abs(s[0]["param_checksum"]))
    # only rank 0 wrote files
    assert (tmp_path / "out" / "thigh_stage1.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["thigh_stage1.pt", "thigh_stage1.checkpoint.pt", "thigh_stage1.metrics.csv", "thigh_stage1.curve.png",
         "thigh_stage1.summary.json", "thigh_stage1.last.pt", "thigh_stage1.provenance.json",
         "thigh_stage1.last.provenance.json", "train.log"])
    # one preprocessing cache shared by the ranks: each built its own shard's entry
    assert [x["cache"]["built"] for x in s] == [1, 1] and len(list((res / "cache").rglob("manifest.json"))) == 2
    # rank 0's provenance merges every rank's studies and draws
    prov = json.loads((tmp_path / "out" / "thigh_stage1.provenance.json").read_text())
    (src,) = prov["sources"]
    assert src["studies"] == src["used"] == src["train_studies"] == src["train_cases"] == 2
    assert src["draws"] == 4 and prov["world_size"] == 2 and prov["steps"] == 2
