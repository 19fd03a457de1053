"""The main job: read -> segment (cascade) -> quantify -> report, for one study or a cohort.

Outputs per study (in the input geometry): ``stage1.nii.gz``, ``stage2.nii.gz``, and with
quantification ``volumes.csv``, ``volumes.json``, ``mat/intramat/intermat.nii.gz``,
``overlay.png`` and ``run.json`` (provenance: legcomp version, weights, what each stage's weights were
trained on (``weights_trained_on``: per stage, the provenance JSON beside that stage's weights file),
region and how it was decided, timings). Each study is written to a temporary folder and moved into place only when
complete, so a failure leaves nothing half-written. In a cohort, one failing study is
reported (``failures.csv``) and the others go on; the cohort table is ``cohort_volumes.csv``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from legcomp import __version__
from legcomp.errors import LegcompInputError
from legcomp.inference.cascade import Cascade
from legcomp.io import DixonStudy, find_studies, read_study
from legcomp.io.atomic import staged_output


OUTPUT_FILES = ("stage1.nii.gz", "stage2.nii.gz", "volumes.csv", "volumes.json", "mat.nii.gz", "intramat.nii.gz",
                "intermat.nii.gz", "overlay.png", "run.json")
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
    feats = region_features(study)
    return feats["region"], f"detected from the image ({feats['reason']})"


def process_study(study: DixonStudy, out_dir: Path, cascade: Cascade, *, region_how: str = "",
                  quantify: bool = True, overlay: bool = True, fat_rule: str = "seed") -> Path:
    """Segment (and quantify) one study into ``out_dir``, atomically. Returns ``out_dir``."""
    out_dir = Path(out_dir)
    with staged_output(out_dir, managed=OUTPUT_FILES) as tmp:
        t0 = time.perf_counter()
        stage1, stage2 = cascade.predict(study)
        t_seg = time.perf_counter() - t0
        if not stage1.any():
            raise LegcompInputError("the stage-1 network found no muscle or SAT (is this a thigh or calf Dixon "
                                    "study, water and fat not swapped?)", study.source or study.name)
        notes = [] if stage2.any() else ["stage 2 found no individual muscle; only stage-1 structures quantified"]
        study.save_like_input(stage1, tmp / "stage1.nii.gz")
        study.save_like_input(stage2, tmp / "stage2.nii.gz")
        t_quant = 0.0
        if quantify:
            from legcomp.quantification import quantify as run_quantify
            from legcomp.quantification import write_quantification
            t1 = time.perf_counter()
            q = run_quantify(study, stage1, stage2 if stage2.any() else None, region=cascade.region,
                             fat_rule=fat_rule, subject=study.name)
            write_quantification(q, study, tmp)
            t_quant = time.perf_counter() - t1
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
        }
        (tmp / "run.json").write_text(json.dumps(prov, indent=2))
    return out_dir


def for_each_study(input: Path, studies: list[Path], work: Callable[[Path, str], None], *,
                   progress: bool = True) -> list[dict]:
    """Call ``work(path, name)`` for each study folder under ``input`` (name: its path below ``input``,
    joined by ``_``). One failing study is reported on stderr and recorded, and the others go on
    (one bad subject never stops a cohort). Returns the failures: ``{"study": path, "error": text}``.
    """
    failures = []
    for path in tqdm(studies, desc="studies", unit="study", disable=not progress, file=sys.stderr):
        name = "_".join(path.relative_to(input).parts) if path != input else path.name
        try:
            work(path, name)
        except LegcompInputError as exc:
            msg = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            failures.append({"study": str(path), "error": msg})
            print(f"legcomp: error: {msg}", file=sys.stderr)
        except Exception as exc:
            failures.append({"study": str(path), "error": f"{type(exc).__name__}: {exc}"})
            print(f"legcomp: error: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return failures


def write_failures(out: Path, failures: list[dict]) -> None:
    """``out/failures.csv`` (study, error), when there are any."""
    if failures:
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(failures).to_csv(out / "failures.csv", index=False)


def run_cohort(input: str | Path, out: str | Path, *, region: str | None = None, weights: str | None = None,
               device: str = "auto", quantify: bool = True, overlay: bool = True, fat_rule: str = "seed",
               progress: bool = True) -> int:
    """Run the cascade on one study folder or on every study under ``input``.

    Returns the exit code: 0 when every study succeeded, 1 when some failed (listed in
    ``OUT/failures.csv``). A single study that fails raises :class:`LegcompInputError`.
    """
    input, out = Path(input), Path(out)
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
            cascades[reg] = Cascade.load(reg, weights, device)
            if weights:
                for stage, src in cascades[reg].sources.items():
                    if Path(src).parent != Path(weights):
                        print(f"legcomp: {reg} stage {stage}: none in {weights}, using the bundled {Path(src).name}",
                              file=sys.stderr)
        return cascades[reg]

    if single:
        study = read_study(input, region=region)
        reg, how = resolve_region(study, region)
        process_study(study, out, get_cascade(reg), region_how=how, quantify=quantify, overlay=overlay,
                      fat_rule=fat_rule)
        print(f"{study.name}: {reg}, wrote {out}")
        return 0

    tables = []
    names: set[str] = set()

    def one(path: Path, name: str) -> None:
        study = read_study(path, region=region, name=name)
        reg, how = resolve_region(study, region)
        target = out / name
        if name in names:
            raise LegcompInputError("two studies with the same name", path)
        names.add(name)
        process_study(study, target, get_cascade(reg), region_how=how, quantify=quantify, overlay=overlay,
                      fat_rule=fat_rule)
        if quantify and (target / "volumes.csv").exists():
            tables.append(pd.read_csv(target / "volumes.csv"))

    failures = for_each_study(input, studies, one, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    if tables:
        pd.concat(tables, ignore_index=True).to_csv(out / "cohort_volumes.csv", index=False)
    write_failures(out, failures)
    print(f"{len(studies) - len(failures)} of {len(studies)} studies done, {len(failures)} failed; wrote {out}")
    return 1 if failures else 0
