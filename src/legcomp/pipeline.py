"""The main job: read -> segment (cascade) -> quantify -> report, for one study or a cohort.

Outputs per study (in the input geometry): ``stage1.nii.gz``, ``stage2.nii.gz``, and with
quantification ``volumes.csv``, ``volumes.json``, ``mat/intramat/intermat.nii.gz``,
``overlay.png``, ``report.html`` (the quality-control page, :mod:`legcomp.report.html`), for DICOM input
``segmentation.dcm`` (:mod:`legcomp.report.dicom_seg`), and ``run.json`` (provenance: legcomp version, weights, what each stage's weights were
trained on (``weights_trained_on``: per stage, the provenance JSON beside that stage's weights file),
region and how it was decided, timings, the ``fingerprint`` of inputs, weights and options and the ``outputs``
written: :mod:`legcomp.resume`; a re-run skips a study done from the same ones). Each study is written to a
temporary folder inside its output folder and moved into place only when complete, so a failure leaves nothing
half-written. In a cohort, one failing study is
reported (``failures.csv``) and the others go on; the cohort table is ``cohort_volumes.csv``, its
page ``index.html`` (:mod:`legcomp.report.cohort`). With ``workers`` or ``scheduler`` a cohort's studies run
on Dask, one task each (:mod:`legcomp.cluster`), with the same outputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from legcomp import __version__
from legcomp.errors import LegcompInputError
from legcomp.inference.cascade import Cascade
from legcomp.io import DixonStudy, find_studies, read_study
from legcomp.io.atomic import check_output_folder, safe_name, staged_output


CLUSTER_PARAMS = frozenset({"workers", "scheduler", "memory_per_worker"})
"""``run_cohort`` parameters that say where studies run, not what they give (left out of the fingerprint)."""

OUTPUT_FILES = ("stage1.nii.gz", "stage2.nii.gz", "volumes.csv", "volumes.json", "mat.nii.gz", "intramat.nii.gz",
                "intermat.nii.gz", "overlay.png", "report.html", "segmentation.dcm", "run.json")
"""Files a study's output folder may hold; stale ones from an earlier run are removed."""


@functools.lru_cache(maxsize=None)
def _sha256(path: str | Path) -> str:
    """First 16 hex digits of a file's SHA-256 (weights files: hashed once per cohort run)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _trained_on(weights_file: str) -> str:
    """The provenance JSON beside a weights file (``<stem>.provenance.json``, whatever its keys: written by
    ``legcomp train``, or hand-written as beside the bundled weights), as JSON text read once per cohort;
    ``{"trained_on": "unknown"}`` without one."""
    from legcomp.training.provenance import read_provenance

    return json.dumps(read_provenance(weights_file))


def resolve_region(study: DixonStudy, region: str | None) -> tuple[str, str]:
    """(region, how): the option, else the study's folder/file names, else image-based detection."""
    if region:
        from legcomp.anatomy import check_region
        return check_region(region), "option --region"
    if study.region in ("thigh", "calf"):
        return study.region, "folder or file name"
    from legcomp.inference.region import region_features
    try:
        feats = region_features(study)
    except LegcompInputError as exc:  # say so when the images are no water/fat pair at all
        from legcomp.preprocessing.swap import not_dixon_reason
        why = not_dixon_reason(study.water, study.fat)
        if not why:
            raise
        raise LegcompInputError(f"{exc}; not a Dixon water/fat pair: {why}") from None
    return feats["region"], f"detected from the image ({feats['reason']})"


def process_study(study: DixonStudy, out_dir: Path, cascade: Cascade, *, region_how: str = "",
                  quantify: bool = True, overlay: bool = True, fat_rule: str = "seed", keep_hip: bool = False,
                  fingerprint: dict | None = None, report: bool = True, dicom_seg: bool = True,
                  fix_swap: bool = False, keep_ids: bool = False) -> Path:
    """Segment (and quantify) one study into ``out_dir``, atomically. Returns ``out_dir``.

    Before segmenting, water and fat are checked for a fat-water swap (whole series, slices, a leg or a
    region; :mod:`legcomp.preprocessing.swap`) and for not being a Dixon pair at all: a one-line note on
    stderr and in run.json (``fat_water_swap``, ``notes``). ``fix_swap``: exchange them back where
    swapped first (recorded in ``fat_water_swap.fixed``).

    ``report``: write ``report.html`` (with quantification); ``dicom_seg``: write ``segmentation.dcm``
    for a study read from DICOM. The quality-control flags go to run.json (``qc_flags``) either way.

    ``keep_hip``: keep the hip/pelvis slices (legs joined) in the volumes; run.json records each
    slice's coverage (``slice_coverage``) and the hip slices (``hip``) either way.
    """
    out_dir = Path(out_dir)
    from legcomp.preprocessing.swap import screen_study
    study, swap = screen_study(study, fix=fix_swap)
    with staged_output(out_dir, managed=OUTPUT_FILES) as tmp:
        t0 = time.perf_counter()
        stage1, stage2, confidence = cascade.predict(study, return_confidence=True)
        t_seg = time.perf_counter() - t0
        if not stage1.any():
            why = swap.note() or "is this a thigh or calf Dixon study, water and fat not swapped?"
            raise LegcompInputError(f"the stage-1 network found no muscle or SAT ({why})", study.source or study.name)
        notes = [swap.note()] if swap.note() else []
        notes += [] if stage2.any() else ["stage 2 found no individual muscle; only stage-1 structures quantified"]
        study.save_like_input(stage1, tmp / "stage1.nii.gz")
        study.save_like_input(stage2, tmp / "stage2.nii.gz")
        t_quant = 0.0
        if quantify:
            from legcomp.quantification import quantify as run_quantify
            from legcomp.quantification import write_quantification
            t1 = time.perf_counter()
            q = run_quantify(study, stage1, stage2 if stage2.any() else None, region=cascade.region,
                             fat_rule=fat_rule, subject=study.name, keep_hip=keep_hip, confidence=confidence)
            write_quantification(q, study, tmp)
            t_quant = time.perf_counter() - t1
            notes += q.meta["notes"]
            hip, coverage = q.meta["hip"], q.meta["slice_coverage"]
        else:
            from legcomp.preprocessing.legs import coverage_report, split_legs
            coverage = coverage_report(split_legs(stage1 > 0, study.affine), study.affine, cascade.region,
                                       input_affine=study.input_affine)
            hip = None
        if overlay:
            from legcomp.report.overlay import save_overlay
            save_overlay(study.water, study.fat, stage1, stage2, cascade.region, study.spacing, tmp / "overlay.png",
                         title=f"{study.name} ({cascade.region})")
        prov = {
            "legcomp_version": __version__, "study": study.name, "source": study.source,
            "region": cascade.region, "region_decided_by": region_how,
            "contrasts_derived": list(study.derived), "shape": list(study.input_shape or study.shape),
            "spacing_mm": list(study.spacing), "orientation": study.orientation,
            "weights": {f"stage{s}": {"file": p, "sha256_16": _sha256(p)} for s, p in cascade.sources.items()},
            "weights_trained_on": {f"stage{s}": json.loads(_trained_on(str(p))) for s, p in cascade.sources.items()},
            "fat_rule": fat_rule if quantify else None,
            "seconds": {"segmentation": round(t_seg, 2), "quantification": round(t_quant, 2)},
            "device": str(cascade.stage1.device),
            "notes": notes,
            "fat_water_swap": swap.to_json(),
            "keep_hip": keep_hip, "hip": hip, "slice_coverage": coverage,
        }
        if fingerprint is not None:  # what made these outputs (legcomp.resume): a re-run skips the study
            from legcomp.resume import weights_fingerprint
            prov["fingerprint"] = {**fingerprint, "weights": weights_fingerprint(cascade.sources)}
        if dicom_seg:
            prov["dicom_seg"] = _write_dicom_seg(study, stage1, stage2, cascade.region, tmp, prov, keep_ids=keep_ids)
        if quantify:  # last: the flags and the report read the whole of run.json
            _write_report(study, stage1, stage2, cascade.region, q.table, prov, tmp, report)
        prov["outputs"] = sorted({f.name for f in tmp.iterdir()} | {"run.json"})
        (tmp / "run.json").write_text(json.dumps(prov, indent=2))
    return out_dir


def _write_dicom_seg(study: DixonStudy, stage1, stage2, region: str, tmp: Path, prov: dict, *,
                     keep_ids: bool = False) -> dict | None:
    """``segmentation.dcm`` for a study read from DICOM; run.json's record of it (None for other input).
    Without ``keep_ids`` the patient's name, IDs and birth date copied from the source are emptied."""
    from legcomp.io.dicom import is_dicom_folder
    from legcomp.report import dicom_seg

    if not (study.source and Path(study.source).is_dir() and is_dicom_folder(study.source)):
        return None
    if not dicom_seg.available():
        return {"written": False, "reason": "highdicom is not installed (pip install highdicom)"}
    t0 = time.perf_counter()
    try:
        dicom_seg.write_dicom_seg(study, stage1, stage2 if stage2.any() else None, region, tmp / "segmentation.dcm")
        if not keep_ids:
            from legcomp.io.dicom import strip_patient_ids
            strip_patient_ids(tmp / "segmentation.dcm")
    except Exception as exc:  # noqa: BLE001 - a DICOM-SEG problem must not lose the study's other outputs
        why = str(exc) if isinstance(exc, dicom_seg.DicomSegSkipped) else f"highdicom: {type(exc).__name__}: {exc}"
        prov["notes"].append(f"segmentation.dcm not written: {why}")
        return {"written": False, "reason": why}
    prov["seconds"]["dicom_seg"] = round(time.perf_counter() - t0, 2)
    return {"written": True, "file": "segmentation.dcm"}


def _write_report(study: DixonStudy, stage1, stage2, region: str, table: pd.DataFrame, prov: dict, tmp: Path,
                  report: bool) -> None:
    """Quality-control flags into run.json (``qc_flags``) and, with ``report``, ``report.html``."""
    from legcomp.report.flags import study_flags

    flags = study_flags(table, prov)
    prov["qc_flags"] = [f.to_json() for f in flags]
    if report:
        from legcomp.report.html import write_study_report
        t0 = time.perf_counter()
        write_study_report(tmp / "report.html", study, stage1, stage2, region, table, prov, flags)
        prov["seconds"]["report"] = round(time.perf_counter() - t0, 2)


def cohort_name(input: Path, path: Path) -> str:
    """A study's output folder name: its path below the cohort folder ``input``, joined by ``_``, made safe."""
    return safe_name("_".join(path.relative_to(input).parts) if path != input else path.name)


def failure_record(path: Path, exc: Exception) -> dict:
    """``{"study": path, "error": one line}`` for a study that failed with ``exc`` (failures.csv's row)."""
    if isinstance(exc, LegcompInputError):
        return {"study": str(path), "error": str(exc) if str(path) in str(exc) else f"{path}: {exc}"}
    return {"study": str(path), "error": f"{type(exc).__name__}: {exc}"}


def report_failure(record: dict) -> None:
    """Print a failed study's one-line reason on stderr."""
    err = record["error"]
    print(f"legcomp: error: {err if record['study'] in err else record['study'] + ': ' + err}", file=sys.stderr)


def load_cascade(region: str, weights: str | None, device: str) -> Cascade:
    """Load a region's cascade, saying on stderr which network comes from the bundled weights instead of
    ``weights`` (a folder holding only one of the region's two networks)."""
    cascade = Cascade.load(region, weights, device)
    if weights:
        for stage, src in cascade.sources.items():
            if Path(src).parent != Path(weights):
                print(f"legcomp: {region} stage {stage}: none in {weights}, using the bundled {Path(src).name}",
                      file=sys.stderr)
    return cascade


@dataclass(frozen=True)
class CohortJob:
    """What to do with each study of a cohort (plain data: sent as it is to cluster workers)."""

    options: dict
    region: str | None = None
    weights: str | None = None
    device: str = "auto"
    overwrite: bool = False
    keep_ids: bool = False
    quantify: bool = True
    overlay: bool = True
    fat_rule: str = "seed"
    keep_hip: bool = False
    report: bool = True
    dicom_seg: bool = True
    fix_swap: bool = False

    def fingerprint(self, path: Path) -> dict:
        """What the outputs of the study at ``path`` are made from (:mod:`legcomp.resume`), weights aside."""
        from legcomp import resume

        return {"inputs": resume.input_fingerprint(path), "options": self.options}

    def up_to_date(self, target: Path, fingerprint: dict) -> bool:
        """True when ``target`` holds complete outputs of this fingerprint and weights (never with ``overwrite``)."""
        from legcomp import resume

        return not self.overwrite and resume.is_up_to_date(target, fingerprint["inputs"], self.options, self.weights)

    def process(self, path: Path, target: Path, name: str | None, get_cascade: Callable[[str], Cascade],
                fingerprint: dict) -> tuple[str, str]:
        """Read, segment and quantify one study into ``target``; returns (study name, region)."""
        study = read_study(path, region=self.region, name=name, keep_ids=self.keep_ids)
        reg, how = resolve_region(study, self.region)
        process_study(study, target, get_cascade(reg), region_how=how, quantify=self.quantify,
                      overlay=self.overlay, fat_rule=self.fat_rule, keep_hip=self.keep_hip, fingerprint=fingerprint,
                      report=self.report, dicom_seg=self.dicom_seg, fix_swap=self.fix_swap, keep_ids=self.keep_ids)
        return study.name, reg

    def run(self, path: Path, target: Path, name: str, get_cascade: Callable[[str], Cascade]) -> bool:
        """Process one study into ``target`` unless it is up to date there; True when it was skipped."""
        fingerprint = self.fingerprint(path)
        if self.up_to_date(target, fingerprint):
            return True
        self.process(path, target, name, get_cascade, fingerprint)
        return False

    def volumes(self, target: Path) -> pd.DataFrame | None:
        """The study's ``volumes.csv`` as a table (None without quantification or without the file)."""
        return pd.read_csv(target / "volumes.csv") if self.quantify and (target / "volumes.csv").exists() else None


def for_each_study(input: Path, studies: list[Path], work: Callable[[Path, str], None], *,
                   progress: bool = True, failures: list[dict] | None = None) -> list[dict]:
    """Call ``work(path, name)`` for each study folder under ``input`` (name: its path below ``input``,
    joined by ``_``, made safe as a folder name by :func:`legcomp.io.atomic.safe_name`). One failing
    study is reported on stderr and recorded, and the others go on (one bad subject never stops a
    cohort). Returns the failures: ``{"study": path, "error": text}``, appended to ``failures`` when
    given (so that a caller interrupted half-way still has them).
    """
    failures = [] if failures is None else failures
    for path in tqdm(studies, desc="studies", unit="study", disable=not progress, file=sys.stderr):
        try:
            work(path, cohort_name(input, path))
        except Exception as exc:
            failures.append(failure_record(path, exc))
            report_failure(failures[-1])
    return failures


def write_failures(out: Path, failures: list[dict]) -> None:
    """``out/failures.csv`` (study, error) when there are any; a stale one from an earlier run is removed."""
    if failures:
        write_table(pd.DataFrame(failures, columns=["study", "error"]), out / "failures.csv")
    else:
        (out / "failures.csv").unlink(missing_ok=True)


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (a hidden file beside it, then renamed: same folder, same device)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        table.to_csv(tmp, index=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run_cohort(input: str | Path, out: str | Path, *, region: str | None = None, weights: str | None = None,
               device: str = "auto", quantify: bool = True, overlay: bool = True, fat_rule: str = "seed", keep_hip: bool = False,
               progress: bool = True, keep_ids: bool = False, overwrite: bool = False, report: bool = True,
               dicom_seg: bool = True, fix_swap: bool = False, workers: int | None = None,
               scheduler: str | None = None, memory_per_worker: str | None = None) -> int:
    """Run the cascade on one study folder or on every study under ``input``.

    ``workers`` (a local Dask cluster of that many worker processes) or ``scheduler`` (the address of an
    existing Dask cluster) run a cohort's studies in parallel, one task per study (:mod:`legcomp.cluster`;
    needs ``pip install legcomp[cluster]``); ``memory_per_worker`` (e.g. ``4GB``) bounds each local worker.
    The outputs are the same as serially.

    A study whose outputs are complete and were made from the same inputs, weights and options
    (``run.json``'s fingerprint, :mod:`legcomp.resume`) is skipped unless ``overwrite``. ``keep_ids``:
    DICOM studies are named by their PatientID (default: by their folder). ``fix_swap``: exchange water
    and fat back where they look swapped, before segmenting (:func:`process_study`).

    Returns the exit code: 0 when every study succeeded, 1 when some failed (listed in
    ``OUT/failures.csv``). A single study that fails raises :class:`LegcompInputError`. Interrupted
    (KeyboardInterrupt, or :class:`legcomp.errors.Interrupted` for SIGTERM), a cohort first writes
    ``cohort_volumes.csv`` and ``failures.csv`` (the unfinished studies too) for what finished, then re-raises.
    """
    params = dict(locals())  # first: every parameter, nothing else
    from legcomp import resume
    from legcomp.inference.cascade import resolve_device

    options = resume.run_options({k: v for k, v in params.items() if k not in CLUSTER_PARAMS})
    input, out = Path(input), check_output_folder(out)
    resolve_device(device)  # fail before any work
    if workers is not None or scheduler is not None or memory_per_worker is not None:
        from legcomp.cluster import check_cluster_options
        check_cluster_options(workers, scheduler, memory_per_worker)  # one line naming the extra without Dask
    if weights and not Path(weights).is_dir():
        raise LegcompInputError("weights folder not found", weights)
    studies = find_studies(input)
    if not studies:
        raise LegcompInputError("no Dixon study found (water and fat NIfTI files or DICOM series)", input)
    if fat_rule:
        from legcomp.quantification import parse_fat_rule
        parse_fat_rule(fat_rule)  # fail before any work
    single = len(studies) == 1 and studies[0] == input
    cascades: dict[str, Cascade] = {}

    def get_cascade(reg: str) -> Cascade:
        if reg not in cascades:
            cascades[reg] = load_cascade(reg, weights, device)
        return cascades[reg]

    job = CohortJob(options=options, region=region, weights=weights, device=device, overwrite=overwrite,
                    keep_ids=keep_ids, quantify=quantify, overlay=overlay, fat_rule=fat_rule, keep_hip=keep_hip,
                    report=report, dicom_seg=dicom_seg, fix_swap=fix_swap)
    if single:
        fingerprint = job.fingerprint(input)
        if job.up_to_date(out, fingerprint):
            print(f"{input}: up to date in {out} (same inputs, weights and options; --overwrite redoes it)")
            return 0
        name, reg = job.process(input, out, None, get_cascade, fingerprint)
        print(f"{name}: {reg}, wrote {out}")
        return 0

    tables = []
    names: set[str] = set()
    finished: list[Path] = []
    done_dirs: list[Path] = []
    skipped: list[Path] = []

    def record(path: Path, target: Path, was_skipped: bool, table: pd.DataFrame | None) -> None:
        """A study done (or up to date): into the cohort's lists."""
        if was_skipped:
            skipped.append(path)
        finished.append(path)
        done_dirs.append(target)
        if table is not None:
            tables.append(table)

    def one(path: Path, name: str) -> None:
        target = out / name
        if name in names:
            raise LegcompInputError("two studies with the same name", path)
        names.add(name)
        record(path, target, job.run(path, target, name, get_cascade), job.volumes(target))

    failures: list[dict] = []
    try:
        if workers is not None or scheduler is not None:
            from legcomp.cluster import ClusterSpec, for_each_study_on_cluster
            for_each_study_on_cluster(input, studies, out, job, record, failures, progress=progress,
                                      spec=ClusterSpec(workers, scheduler, memory_per_worker))
        else:
            for_each_study(input, studies, one, progress=progress, failures=failures)
    except KeyboardInterrupt as exc:
        why = f"not done: interrupted by {_signal_name(exc)}"
        failed = {f["study"] for f in failures}
        failures += [{"study": str(p), "error": why} for p in studies if p not in finished and str(p) not in failed]
        _write_cohort_tables(out, tables, failures)
        print(f"legcomp: {why}; {len(finished)} of {len(studies)} studies done, tables written to {out}",
              file=sys.stderr)
        raise
    _write_cohort_tables(out, tables, failures)
    if report and quantify:
        from legcomp.report.cohort import write_cohort_index
        try:
            write_cohort_index(out, done_dirs, failures)
        except Exception as exc:  # noqa: BLE001 - the page must not fail a cohort whose results are written
            print(f"legcomp: index.html not written: {type(exc).__name__}: {exc}", file=sys.stderr)
    done = f"{len(studies) - len(failures)} of {len(studies)} studies done"
    more = f" ({len(skipped)} up to date, skipped; --overwrite redoes them)" if skipped else ""
    print(f"{done}{more}, {len(failures)} failed; wrote {out}")
    return 1 if failures else 0


def _write_cohort_tables(out: Path, tables: list[pd.DataFrame], failures: list[dict]) -> None:
    """``cohort_volumes.csv`` (every finished study's volumes.csv, stacked) and ``failures.csv``."""
    if tables:
        write_table(pd.concat(tables, ignore_index=True), out / "cohort_volumes.csv")
    else:
        (out / "cohort_volumes.csv").unlink(missing_ok=True)  # stale, from an earlier run
    write_failures(out, failures)


def _signal_name(exc: BaseException) -> str:
    """``SIGTERM`` for :class:`legcomp.errors.Interrupted` of that signal, ``SIGINT`` for Ctrl-C."""
    import signal

    try:
        return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
    except ValueError:
        return f"signal {getattr(exc, 'signum', '?')}"
