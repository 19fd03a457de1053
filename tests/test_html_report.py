"""The quality-control report: confidence maps and measure, flags, report.html, the cohort index.html, DICOM-SEG.

No browser here: the pages are parsed with html.parser (every image embedded and decodable, the slice
slider and one image per slice and layer), and the page's script is run in Node.js against a minimal
stand-in of the DOM when Node is installed.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from legcomp import anatomy
from legcomp.cli import main
from legcomp.inference import Cascade
from legcomp.io import read_study
from legcomp.phantom import generate, write_phantom
from legcomp.preprocessing import inputs as prep
from legcomp.quantification import quantify
from legcomp.report import flags as qc
from legcomp.report.cohort import tukey_outliers, write_cohort_index
from legcomp.report.html import render_study_report
from legcomp.report.overlay import crop_box

TINY = dict(matrix=(96, 64, 12), spacing=(4.0, 4.0, 8.0))


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def phantom():
    return generate("thigh", 7, **TINY)


@pytest.fixture(scope="module")
def thigh_case(tmp_path_factory, phantom):
    return write_phantom(phantom, tmp_path_factory.mktemp("ph") / "thigh_00007")


def _quantified(ph, conf1: float = 0.95, conf2: float = 0.9):
    study = ph.to_study()
    conf = {1: np.full(study.shape, conf1, np.float32), 2: np.full(study.shape, conf2, np.float32)}
    q = quantify(study, ph.stage1, ph.stage2, region="thigh", confidence=conf)
    return study, q


def _set(table: pd.DataFrame, structure: str, leg: str, measure: str, value: float) -> pd.DataFrame:
    t = table.copy()
    t.loc[(t.structure == structure) & (t.leg == leg) & (t.measure == measure), "value"] = value
    return t


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text of ``<script>`` elements."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[tuple[dict, str]] = []
        self._script: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs)
            self.scripts.append((self._script, ""))

    def handle_data(self, data):
        if self._script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _png(data: str) -> Image.Image:
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


# --------------------------------------------------------------------------- confidence

def test_labels_and_confidence_on_a_finer_grid():
    """The chosen label's resampled probability; the labels are exactly labels_from_probabilities'."""
    rng = np.random.default_rng(0)
    p = rng.random((4, 6, 5, 3)).astype(np.float32)
    p /= p.sum(0)
    work, study = SimpleNamespace(shape=(6, 5, 3)), SimpleNamespace(shape=(12, 10, 3))
    labels, conf = prep.labels_and_confidence(p, work, study)
    assert np.array_equal(labels, prep.labels_from_probabilities(p, work, study))
    up = np.stack([prep.resample(c, study.shape, 1) for c in p])
    assert np.allclose(conf, np.take_along_axis(up, labels[None].astype(int), 0)[0], atol=1e-6)
    assert np.allclose(conf, up.max(0), atol=1e-6) and conf.min() > 0.25  # 4 classes: the maximum is >= 1/4
    same_labels, same_conf = prep.labels_and_confidence(p, work, work)
    assert np.array_equal(same_labels, p.argmax(0)) and np.allclose(same_conf, p.max(0))


def test_predict_with_confidence_changes_no_label(thigh_case, tiny_weights):
    study = read_study(thigh_case)
    cascade = Cascade.load("thigh", tiny_weights, "cpu")
    s1, s2 = cascade.predict(study)
    c1_, c2_, conf = cascade.predict(study, return_confidence=True)
    assert np.array_equal(s1, c1_) and np.array_equal(s2, c2_)
    assert set(conf) == {1, 2} and all(c.shape == study.shape and c.dtype == np.float32 for c in conf.values())
    # stage 1 runs on the study's own grid here: its confidence is the maximum class probability
    prob = cascade.stage1.probabilities(prep.stage1_input(study, method=prep.normalisation_of(cascade.stage1.meta)))
    assert np.allclose(conf[1], prob.max(0), atol=1e-6)
    assert conf[1].min() >= 1 / 3 - 1e-6 and conf[1].max() <= 1 + 1e-6
    assert np.all(conf[2][s1 != anatomy.WHOLE_MUSCLE.id] == 1.0)


def test_quantify_confidence_is_the_mean_over_each_structure(phantom):
    study = phantom.to_study()
    c1 = np.where(phantom.stage1 == anatomy.SAT.id, 0.9, 0.6).astype(np.float32)
    c2 = np.where(phantom.stage2 == 1, 0.5, 0.8).astype(np.float32)
    # half of the right leg's SAT less sure: its mean drops, the left leg's does not
    right_sat = (phantom.stage1 == anatomy.SAT.id) & (phantom.legs == 2)
    idx = np.flatnonzero(right_sat)[::2]
    c1.flat[idx] = 0.5
    q = quantify(study, phantom.stage1, phantom.stage2, region="thigh", confidence={1: c1, 2: c2})
    assert q.value("subcutaneous_fat", "confidence", "left") == pytest.approx(0.9, abs=1e-6)
    n, k = right_sat.sum(), len(idx)
    assert q.value("subcutaneous_fat", "confidence", "right") == pytest.approx((0.9 * (n - k) + 0.5 * k) / n, abs=1e-3)
    assert q.value("rectus_femoris", "confidence", "total") == pytest.approx(0.5, abs=1e-6)
    assert q.value("vastus_lateralis", "confidence", "left") == pytest.approx(0.8, abs=1e-6)
    assert q.value("whole_muscle", "confidence", "total") == pytest.approx(0.6, abs=1e-6)
    t = q.table
    assert set(t[t.measure == "confidence"].unit) == {"fraction"}
    assert not len(t[(t.measure == "confidence") & t.structure.isin(["mat", "intramat", "intermat"])])
    plain = quantify(study, phantom.stage1, phantom.stage2, region="thigh")
    assert "confidence" not in set(plain.table.measure)  # without maps: the table as before
    with pytest.raises(Exception, match="confidence map shape"):
        quantify(study, phantom.stage1, None, region="thigh", confidence={1: c1[:-1]})


# --------------------------------------------------------------------------- flags

def test_flags_each_with_its_reason(phantom):
    _, q = _quantified(phantom)
    base = q.table.copy()
    base.loc[base.measure == "incomplete", "value"] = 0.0
    assert qc.study_flags(base, {}) == []
    t = _set(base, "rectus_femoris", "total", "incomplete", 1.0)
    t = _set(t, "sartorius", "left", "confidence", 0.5)
    right = q.value("vastus_lateralis", "volume_ml", "right")
    t = _set(t, "vastus_lateralis", "left", "volume_ml", 2.0 * right)
    run = {"fat_water_swap": {"verdict": "partial", "note": "fat-water swap: left leg slices 3-5"},
           "hip": {"slices": [10, 11, 12, 15], "in_volumes": False,
                   "left_out_ml": {"left": {"subcutaneous_fat": 10.0, "whole_muscle": 20.0},
                                   "right": {"subcutaneous_fat": 5.0, "whole_muscle": 25.0}}}}
    flags = {f.kind: f for f in qc.study_flags(t, run)}
    assert list(flags) == ["fat_water_swap", "hip_left_out", "cut_by_fov", "low_confidence", "asymmetry"]
    assert flags["fat_water_swap"].reason == "fat-water swap: left leg slices 3-5"
    assert "10-12, 15" in flags["hip_left_out"].reason and "whole muscle 45 mL" in flags["hip_left_out"].reason
    assert flags["cut_by_fov"].structures == ("rectus_femoris",)
    assert flags["low_confidence"].structures == ("sartorius",) and "left sartorius 0.50" in flags["low_confidence"].reason
    assert flags["asymmetry"].structures == ("vastus_lateralis",)
    # a swap verdict of none, hip slices kept: no flag
    quiet = {"fat_water_swap": {"verdict": "none", "note": None}, "hip": {"slices": [10], "in_volumes": True}}
    assert qc.study_flags(base, quiet) == []
    # a small structure is not compared; one leg only is a flag of its own and no asymmetry
    small = _set(_set(base, "gracilis", "left", "volume_ml", 1.0), "gracilis", "right", "volume_ml", 3.0)
    assert qc.study_flags(small, {}) == []
    large = _set(_set(base, "gracilis", "left", "volume_ml", 10.0), "gracilis", "right", "volume_ml", 30.0)
    assert [f.structures for f in qc.study_flags(large, {})] == [("gracilis",)]
    one = base.copy()
    one.loc[(one.leg == "right") & (one.measure == "volume_ml"), "value"] = 0.0
    assert [f.kind for f in qc.study_flags(one, {})] == ["single_leg"]
    tags = qc.row_flags(t)
    assert tags[("rectus_femoris", "total")] == ["cut by FOV"] and tags[("sartorius", "left")] == ["low confidence"]
    assert tags[("vastus_lateralis", "right")] == ["L/R 2.00"]


# --------------------------------------------------------------------------- report.html

def test_report_is_self_contained_with_every_slice_at_native_resolution(phantom):
    study, q = _quantified(phantom)
    table = _set(q.table, "gracilis", "right", "confidence", 0.4)
    run = {"study": "thigh_00007", "legcomp_version": "9.9", "region": "thigh", "region_decided_by": "option --region",
           "fat_rule": "seed", "seconds": {"segmentation": 1.0}, "slice_coverage": q.meta["slice_coverage"],
           "weights": {"stage1": {"file": "w1.pt", "sha256_16": "abcdef0123456789"}}, "notes": ["a <note>"]}
    html = render_study_report(study, phantom.stage1, phantom.stage2, "thigh", table, run)
    page = _parse(html)
    nz = study.shape[2]
    bx, by = crop_box(phantom.stage1 > 0)
    cols, rows = bx.stop - bx.start, by.stop - by.start  # displayed columns run along x, rows along y
    # no network: nothing loaded from anywhere but the page itself
    assert not re.search(r'(src|href)="(?!data:|#)', html) and "http" not in html.split("<body>")[1].split("<script")[0]
    imgs = page.find("img")
    assert len(imgs) >= 3 * 3 + 1 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    for a in page.find("img", **{"class": "base"}):
        assert _png(a["src"].split(",", 1)[1]).size == (cols, rows)
    slider = page.find("input", type="range", id="slice")
    assert len(slider) == 1 and slider[0]["min"] == "0" and slider[0]["max"] == str(nz - 1)
    data = json.loads(next(text for attrs, text in page.scripts if attrs.get("id") == "slice-data"))
    assert set(data["layers"]) == {"water", "fat", "ff", "s1", "s2"} and len(data["captions"]) == nz
    for layer, pngs in data["layers"].items():
        assert len(pngs) == nz
        img = _png(pngs[nz // 2])
        assert img.size == (cols, rows) and img.mode == ("L" if layer in ("water", "fat") else
                                                          "RGB" if layer == "ff" else "RGBA")
    # outlines: the stage-2 layer of a mid slice holds every muscle's colour found on it
    z = nz // 2
    rgba = np.asarray(_png(data["layers"]["s2"][z]))
    shown = {tuple(c) for c in rgba[rgba[..., 3] > 0][:, :3]}
    for lab in anatomy.THIGH_MUSCLES:
        assert ((phantom.stage2[:, :, z] == lab.id).any()) == (lab.color in shown), lab.name
    # legend of full names, flags at the top, tables per leg, provenance
    for lab in (*anatomy.STAGE1, *anatomy.THIGH_MUSCLES):
        assert lab.display in html
    assert html.index('id="flags"') < html.index('id="slices"')
    assert "right gracilis 0.40" in html and "a &lt;note&gt;" in html
    assert [a["data-leg"] for a in page.find("table", **{"class": "volumes"})] == ["left", "right", "total"]
    assert f"{q.value('whole_muscle', 'volume_ml', 'total'):.1f}" in html
    assert "abcdef0123456789" in html and "option --region" in html and "over the whole image" in html
    assert "slice 0, z = " in data["captions"][0]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_report_script_moves_the_slices(phantom, tmp_path):
    """The page's own script, run by Node against a stand-in DOM: the slider changes every image and the caption,
    the outline boxes hide their layer, and the script has no error."""
    study, q = _quantified(phantom)
    html = render_study_report(study, phantom.stage1, phantom.stage2, "thigh", q.table, {"study": "x"})
    page = _parse(html)
    data = next(text for attrs, text in page.scripts if attrs.get("id") == "slice-data")
    code = next(text for attrs, text in page.scripts if not attrs)
    imgs = [{"layer": a["data-layer"]} for a in page.find("img") if "data-layer" in a]
    stub = """
const listeners = {}; const classes = new Set();
function el(id) { return {id, value: "0", checked: true, textContent: "", style: {setProperty(){}},
  addEventListener(t, f) { listeners[id + ":" + t] = f; }}; }
const els = {"slice-data": {textContent: DATA}, "slice": el("slice"), "slice-label": el("slice-label"),
  "show-s1": el("show-s1"), "show-s2": el("show-s2"), "zoom": el("zoom"),
  "viewer": {style: {setProperty(){}}, classList: {toggle(c, on) { on ? classes.add(c) : classes.delete(c); }},
             querySelectorAll() { return IMGS; }}};
const IMGS = IMG_SPECS.map(s => ({src: "", getAttribute() { return s.layer; }}));
global.document = {getElementById: id => els[id], addEventListener() {}};
CODE
const D = JSON.parse(DATA);
els.slice.value = "3"; listeners["slice:input"]();
const bad = IMGS.filter(im => im.src !== "data:image/png;base64," + D.layers[im.getAttribute()][3]);
els["show-s2"].checked = false; listeners["show-s2:change"]();
console.log(JSON.stringify({bad: bad.length, n: IMGS.length, caption: els["slice-label"].textContent,
                            hidden: [...classes]}));
"""
    js = (stub.replace("DATA", json.dumps(data)).replace("IMG_SPECS", json.dumps(imgs)).replace("CODE", code))
    (tmp_path / "page.js").write_text(js)
    res = subprocess.run(["node", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"bad": 0, "n": len(imgs), "caption": json.loads(data)["captions"][3], "hidden": ["hide-s2"]}


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _headless(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
def test_report_in_a_real_browser(phantom, tmp_path):
    """report.html in headless Chromium: the page loads with no script error, and moving the slider
    changes the pictures and the caption (read back from the DOM the browser leaves)."""
    study, q = _quantified(phantom)
    html = render_study_report(study, phantom.stage1, phantom.stage2, "thigh", q.table, {"study": "x"})
    probe = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
window.addEventListener("load", function () {
  var s = document.getElementById("slice"), img = document.querySelector("img[data-layer]");
  var before = img.src, cap0 = document.getElementById("slice-label").textContent;
  s.value = String(parseInt(s.max, 10)); s.dispatchEvent(new Event("input"));
  var out = document.createElement("pre"); out.id = "probe";
  out.textContent = JSON.stringify({errors: window.__errors, changed: img.src !== before,
    caption_changed: document.getElementById("slice-label").textContent !== cap0,
    images: document.querySelectorAll("img[data-layer]").length});
  document.body.appendChild(out);
});
</script>"""
    # the probe is registered before the page's own script runs, so it sees its errors too
    page = tmp_path / "report.html"
    page.write_text(html.replace("<body>", "<body>" + probe, 1) if "<body>" in html else probe + html)
    res = _headless("--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stdout[-2000:]
    out = json.loads(m.group(1).replace("&quot;", '"'))
    assert out["errors"] == []
    assert out["changed"] and out["caption_changed"] and out["images"] >= 3
    assert "Uncaught" not in res.stderr  # console errors Chromium logs


# --------------------------------------------------------------------------- index.html

def test_tukey_outliers():
    assert list(tukey_outliers(np.array([10.0, 11, 9, 10.5, 30]))) == [False] * 4 + [True]
    assert not tukey_outliers(np.array([1.0, 100.0, 1.0])).any()  # too few to tell
    assert list(tukey_outliers(np.array([10.0, np.nan, 11, 9, 10.5, 30]))) == [False] * 5 + [True]


def test_cohort_index_rows_links_failures_and_plots(phantom, tmp_path):
    _, q = _quantified(phantom)
    out = tmp_path / "out"
    dirs = []
    for i, scale in enumerate((1.0, 1.05, 0.95, 1.02, 3.0)):
        d = out / f"s{i}"
        d.mkdir(parents=True)
        t = q.table.assign(subject=f"s{i}")
        t.loc[t.measure == "volume_ml", "value"] *= scale
        t.to_csv(d / "volumes.csv", index=False)
        (d / "run.json").write_text(json.dumps({"study": f"s{i}", "region": "thigh"}))
        (d / "report.html").write_text("<html></html>")
        dirs.append(d)
    (out / "s1" / "report.html").unlink()  # e.g. run with --no-report: listed, not linked
    path = write_cohort_index(out, [*dirs, out / "never_written"], [{"study": "/data/bad", "error": "no fat <series>"}])
    html = path.read_text()
    page = _parse(html)
    links = [a["href"] for a in page.find("a")]
    assert [h for h in links if h.endswith("report.html")] == ["s0/report.html", "s2/report.html", "s3/report.html",
                                                                "s4/report.html"]
    assert "cohort_volumes.csv" in links and "failures.csv" in links
    studies = re.search(r'<table class="studies">.*?</table>', html, re.S).group(0)
    assert studies.count("<tr>") == 1 + 5 and "never_written" not in html
    assert "/data/bad" in html and "no fat &lt;series&gt;" in html
    assert html.count('class="badge cut_by_fov"') == 5  # the phantom's muscles go on beyond its 12 slices
    plots = [a for a in page.find("img") if "plot" in a.get("class", "")]
    assert len(plots) == 3 and all(_png(a["src"].split(",", 1)[1]).size[0] > 400 for a in plots)


# --------------------------------------------------------------------------- the pipeline

def test_run_writes_report_flags_and_confidence(tmp_path, thigh_case, tiny_weights):
    out = tmp_path / "out"
    assert main(["run", str(thigh_case), "--out", str(out), "--weights", str(tiny_weights), "--quiet",
                 "--device", "cpu"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (out / "report.html").is_file() and "report.html" in run["outputs"] and run["seconds"]["report"] > 0
    assert isinstance(run["qc_flags"], list) and run["dicom_seg"] is None
    table = pd.read_csv(out / "volumes.csv")
    conf = table[table.measure == "confidence"]
    assert set(conf.structure) >= {"subcutaneous_fat", "whole_muscle"}  # NaN where a structure is empty
    # at least 1 / the number of classes: 3 in stage 1, 14 in the thigh's stage 2
    assert conf.value.notna().any() and conf.value.dropna().between(1 / 14, 1).all()
    assert 'id="slice"' in (out / "report.html").read_text()
    bare = tmp_path / "bare"
    assert main(["run", str(thigh_case), "--out", str(bare), "--weights", str(tiny_weights), "--quiet",
                 "--device", "cpu", "--no-report"]) == 0
    assert not (bare / "report.html").exists() and "qc_flags" in json.loads((bare / "run.json").read_text())


def test_cohort_run_writes_index(tmp_path, thigh_case, tiny_weights):
    cohort = tmp_path / "cohort"
    shutil.copytree(thigh_case, cohort / "thigh_a")
    write_phantom(generate("calf", 3, **TINY), cohort / "calf_b")
    bad = cohort / "thigh_bad"
    bad.mkdir()
    shutil.copy(thigh_case / "water.nii.gz", bad / "water.nii.gz")
    out = tmp_path / "out"
    assert main(["run", str(cohort), "--out", str(out), "--weights", str(tiny_weights), "--quiet",
                 "--device", "cpu"]) == 1
    html = (out / "index.html").read_text()
    assert 'href="thigh_a/report.html"' in html and 'href="calf_b/report.html"' in html
    assert "thigh_bad" in html and "no fat image" in html
    assert 'id="plots-thigh"' in html and 'id="plots-calf"' in html


# --------------------------------------------------------------------------- DICOM-SEG

def _write_dicom_series(folder: Path, kind: str, data: np.ndarray, study_uid: str, frame_uid: str, number: int) -> str:
    """One classic MR series (x = column, y = row, z = slice), axial, complete patient/study modules."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "MR", "P1", "Test^Leg", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20240101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber, ds.FrameOfReferenceUID = "", "", frame_uid
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uid, number, k + 1
        ds.SeriesDescription, ds.ImageType = f"dixon {kind}", ["DERIVED", "PRIMARY", "DIXON", kind.upper()]
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-190.0, -120.0, 8.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [4.0, 4.0], 8.0
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T.astype(np.uint16)).tobytes()
        ds.save_as(folder / f"{kind}_{k:03d}.dcm", enforce_file_format=True)
    return uid


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory, phantom):
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("dicom") / "thigh_dicom"
    study_uid, frame_uid = generate_uid(), generate_uid()
    scale = 1000.0 / float(phantom.water.max())
    water_uid = _write_dicom_series(folder, "water", phantom.water * scale, study_uid, frame_uid, 1)
    _write_dicom_series(folder, "fat", phantom.fat * scale, study_uid, frame_uid, 2)
    return SimpleNamespace(folder=folder, water_uid=water_uid)


def test_dicom_seg_reads_back_to_the_same_masks(tmp_path, dicom_case, phantom):
    pytest.importorskip("highdicom")
    import pydicom

    from legcomp.io.dicom import read_dicom_study
    from legcomp.report.dicom_seg import read_dicom_seg, write_dicom_seg

    study = read_dicom_study(dicom_case.folder, region="thigh")
    assert study.orientation == "LPS"  # the input's axes differ from the canonical ones: the mapping is exercised
    s1 = np.zeros(study.shape, np.uint8)
    s1[10:80, 8:56, 1:11], s1[20:70, 16:48, 2:10] = anatomy.SAT.id, anatomy.WHOLE_MUSCLE.id
    s2 = np.zeros(study.shape, np.uint8)
    s2[20:40, 16:30, 2:10], s2[45:60, 30:48, 4:7] = 1, 5  # rectus femoris, sartorius; off-centre, asymmetric
    path = write_dicom_seg(study, s1, s2, "thigh", tmp_path / "segmentation.dcm")
    back = read_dicom_seg(path, study)
    assert set(back) == {"subcutaneous_fat", "whole_muscle", "rectus_femoris", "sartorius"}
    assert np.array_equal(back["subcutaneous_fat"], s1 == anatomy.SAT.id)
    assert np.array_equal(back["whole_muscle"], s1 == anatomy.WHOLE_MUSCLE.id)
    assert np.array_equal(back["rectus_femoris"], s2 == 1) and np.array_equal(back["sartorius"], s2 == 5)
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_case.water_uid
    segs = {s.TrackingID: s for s in ds.SegmentSequence}
    assert segs["sartorius"].SegmentLabel == "Sartorius"
    assert segs["whole_muscle"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "127954009"
    assert segs["rectus_femoris"].AnatomicRegionSequence[0].CodeMeaning == "Thigh"
    import highdicom as hd
    rgb = hd.color.CIELabColor.from_dicom_value(segs["sartorius"].RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(rgb, anatomy.THIGH_MUSCLES[4].color, atol=2)


def test_run_on_dicom_writes_segmentation_unless_told_not_to(tmp_path, dicom_case, tiny_weights):
    pytest.importorskip("highdicom")
    out = tmp_path / "out"
    assert main(["run", str(dicom_case.folder), "--out", str(out), "--weights", str(tiny_weights), "--quiet",
                 "--device", "cpu", "--region", "thigh"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["dicom_seg"] == {"written": True, "file": "segmentation.dcm"} and (out / "segmentation.dcm").is_file()
    off = tmp_path / "off"
    assert main(["run", str(dicom_case.folder), "--out", str(off), "--weights", str(tiny_weights), "--quiet",
                 "--device", "cpu", "--region", "thigh", "--no-dicom-seg"]) == 0
    assert not (off / "segmentation.dcm").exists() and "dicom_seg" not in json.loads((off / "run.json").read_text())
