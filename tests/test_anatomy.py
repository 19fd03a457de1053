"""The anatomy table: ids and names of the seed study, exports."""

import json

import pytest

from legcomp import anatomy
from legcomp.cli import main
from legcomp.errors import LegcompInputError

SEED_THIGH = ["rectus_femoris", "vastus_lateralis", "vastus_intermedius", "vastus_medialis", "sartorius", "gracilis",
              "biceps_femoris", "semitendinosus", "semimembranosus", "adductor_brevis_pectineus", "adductor_longus",
              "adductor_magnus_quadratus_femoris", "gluteus_maximus"]
SEED_CALF = ["gastrocnemius_medialis", "gastrocnemius_lateralis", "soleus", "flexor_digitorum_longus",
             "flexor_hallucis_longus", "tibialis_posterior", "peroneus_longus_brevis", "tibialis_anterior",
             "extensor_hallucis_digitorum_longus"]


def test_seed_ids_and_order():
    assert [(l.id, l.name) for l in anatomy.STAGE1] == [(1, "subcutaneous_fat"), (2, "whole_muscle")]
    assert [(l.id, l.name) for l in anatomy.THIGH_MUSCLES] == list(enumerate(SEED_THIGH, start=1))
    assert [(l.id, l.name) for l in anatomy.CALF_MUSCLES] == list(enumerate(SEED_CALF, start=1))
    assert anatomy.n_classes(1, "calf") == 3 and anatomy.n_classes(2, "thigh") == 14 and anatomy.n_classes(2, "calf") == 10


def test_colours_distinct_within_each_map():
    for stage, region in [(1, "thigh"), (2, "thigh"), (2, "calf")]:
        cols = [l.color for l in anatomy.stage_labels(stage, region)]
        assert len(set(cols)) == len(cols)
        assert all(0 <= c <= 255 for col in cols for c in col)


def test_unknown_region_is_an_input_error():
    with pytest.raises(LegcompInputError, match="unknown region 'knee'"):
        anatomy.check_region("knee")


def test_labels_json_cli(capsys):
    assert main(["labels", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {(r["stage"], r["region"], r["id"], r["name"]) for r in table} == (
        {(1, "both", 1, "subcutaneous_fat"), (1, "both", 2, "whole_muscle")}
        | {(2, "thigh", i, n) for i, n in enumerate(SEED_THIGH, 1)}
        | {(2, "calf", i, n) for i, n in enumerate(SEED_CALF, 1)})
    assert main(["labels", "--region", "calf", "--json"]) == 0
    calf = json.loads(capsys.readouterr().out)
    assert {r["region"] for r in calf} == {"both", "calf"} and len(calf) == 11


def test_itksnap_and_slicer_exports(tmp_path):
    assert main(["labels", "--region", "thigh", "--itksnap", str(tmp_path)]) == 0
    text = (tmp_path / "thigh_stage2_itksnap.label").read_text()
    assert '"gluteus_maximus"' in text and text.count("\n") == 5 + 13
    assert main(["labels", "--region", "calf", "--slicer", str(tmp_path)]) == 0
    rows = [l.split() for l in (tmp_path / "calf_stage2_slicer.ctbl").read_text().splitlines() if not l.startswith("#")]
    assert rows[1][:2] == ["1", "gastrocnemius_medialis"] and len(rows) == 10


def test_label_rgba_uses_the_table_colours():
    import numpy as np

    lab = anatomy.label_by_name("sartorius", "thigh")
    img = np.array([[0, lab.id], [99, 0]])
    rgba = anatomy.label_rgba(img, 2, "thigh", alpha=0.6)
    assert rgba.shape == (2, 2, 4) and rgba.dtype == np.float32
    assert np.allclose(rgba[0, 1], [*(c / 255 for c in lab.color), 0.6])
    assert rgba[0, 0, 3] == 0 and rgba[1, 0, 3] == 0  # background and unknown ids stay transparent
