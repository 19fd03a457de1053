"""The README's main job on the bundled example, with the bundled weights, against the example's truth.

``legcomp run examples/thigh_example --out DIR`` (one run shared by the tests of this module), then
``legcomp evaluate`` against the example's exact labels with DSC floors, and run.json's provenance.
Measured (bundled weights, CPU): whole muscle 0.993, SAT 0.982, mean of the 13 thigh muscles 0.939
(lowest: gluteus maximus 0.757, adductor brevis/pectineus 0.824); the floors sit a little below.
Also: a folder whose name says nothing gets its region from the image (run.json says so).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import legcomp
from legcomp import anatomy
from legcomp.cli import main
from legcomp.inference import default_weights_dir
from legcomp.io import read_study
from legcomp.training.provenance import read_provenance

torch.set_num_threads(1)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "thigh_example"
pytestmark = pytest.mark.skipif(
    not (EXAMPLE / "water.nii.gz").is_file() or not (default_weights_dir() / "thigh_stage1.pt").is_file()
    or not (default_weights_dir() / "thigh_stage2.pt").is_file(), reason="example study or bundled weights missing")

FLOORS = {"whole_muscle": 0.98, "subcutaneous_fat": 0.97}
"""DSC floors (measured 0.993 and 0.982)."""
MEAN_MUSCLE_FLOOR = 0.92
"""Floor of the mean DSC of the 13 thigh muscles (measured 0.939 with the muscle network trained on
real-anatomy synthesis; 0.954 with the earlier phantom-only one)."""
EACH_MUSCLE_FLOOR = 0.70
"""Floor of every thigh muscle's DSC (lowest measured: gluteus maximus 0.757; 0.830 before)."""


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """``legcomp run examples/thigh_example --out DIR`` (on the CPU), once for the module."""
    out = tmp_path_factory.mktemp("results") / "thigh_example"
    assert main(["run", str(EXAMPLE), "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def _sha256_16(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def test_example_run_against_its_truth(example_run, tmp_path):
    for f in ("stage1.nii.gz", "stage2.nii.gz", "volumes.csv", "volumes.json", "mat.nii.gz", "overlay.png",
              "run.json"):
        assert (example_run / f).is_file(), f
    ev = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(example_run), "--truth", str(EXAMPLE), "--out", str(ev)]) == 0
    s = pd.read_csv(ev / "summary.csv")
    dsc = s[(s.metric == "dsc") & (s.leg == "total")].set_index("structure")["mean"]
    for name, floor in FLOORS.items():
        assert dsc[name] >= floor, (name, dsc[name])
    muscles = [lab.name for lab in anatomy.MUSCLES["thigh"]]
    assert set(muscles) <= set(dsc.index) and dsc[muscles].notna().all()
    assert dsc[muscles].mean() >= MEAN_MUSCLE_FLOOR, dsc[muscles].to_dict()
    assert (dsc[muscles] >= EACH_MUSCLE_FLOOR).all(), dsc[muscles].to_dict()
    # volumes of the whole muscle and SAT close to the truth
    vol = s[(s.metric == "abs_volume_error_pct") & (s.leg == "total")].set_index("structure")["mean"]
    assert vol["whole_muscle"] < 2 and vol["subcutaneous_fat"] < 5


def test_example_run_json(example_run):
    run = json.loads((example_run / "run.json").read_text())
    assert run["legcomp_version"] == legcomp.__version__
    assert run["study"] == "thigh_example" and run["source"] == str(EXAMPLE)
    assert run["region"] == "thigh" and run["region_decided_by"] == "folder or file name"
    assert set(run["weights"]) == set(run["weights_trained_on"]) == {"stage1", "stage2"}
    for stage in ("stage1", "stage2"):
        w = run["weights"][stage]
        assert Path(w["file"]) == default_weights_dir() / f"thigh_{stage}.pt"
        assert w["sha256_16"] == _sha256_16(w["file"]) and len(w["sha256_16"]) == 16
        prov = run["weights_trained_on"][stage]  # each stage's own provenance file, whole
        assert prov == read_provenance(w["file"]) and prov.get("trained_on") not in (None, "unknown")
    assert run["weights_trained_on"]["stage1"] != run["weights_trained_on"]["stage2"]
    assert run["seconds"]["segmentation"] > 0 and run["seconds"]["quantification"] >= 0
    assert run["fat_rule"] == "seed" and run["device"] == "cpu"
    assert run["shape"] == list(nib.load(str(EXAMPLE / "water.nii.gz")).shape)


def test_region_detected_from_the_image(example_run, tmp_path_factory):
    """The example's water and fat in a folder whose path names no region: detected from the image, thigh,
    and the same segmentation as the run above."""
    folder = tmp_path_factory.mktemp("plain") / "subject_a"
    folder.mkdir()
    for f in ("water.nii.gz", "fat.nii.gz"):
        shutil.copyfile(EXAMPLE / f, folder / f)
    assert read_study(folder).region == "unknown"  # nothing in the path says thigh or calf
    out = tmp_path_factory.mktemp("plain_out") / "subject_a"
    assert main(["run", str(folder), "--out", str(out), "--device", "cpu", "--quiet", "--no-overlay"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["region"] == "thigh" and run["region_decided_by"].startswith("detected from the image")
    for f in ("stage1.nii.gz", "stage2.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f)).dataobj),
                                      np.asarray(nib.load(str(example_run / f)).dataobj))
