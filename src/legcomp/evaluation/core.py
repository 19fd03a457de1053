"""Evaluate predicted label maps against reference ones: per-subject metrics and a summary.

Arrays are (x, y, z), canonical RAS+. Metrics (column ``metric`` of the tidy table):

* per structure (SAT and whole muscle from stage 1, each muscle from stage 2; both legs
  together, ``leg = "total"``): ``dsc`` (0-1), ``hd95_mm``, ``pred_volume_ml``,
  ``true_volume_ml``, ``volume_error_pct`` (signed, 100 (pred - true) / true) and
  ``abs_volume_error_pct``;
* for ``mat``, ``intramat`` and ``intermat``, per leg and total: ``pred_fat_volume_ml`` and
  ``true_fat_volume_ml`` (both by :func:`legcomp.quantification.quantify` with the same fat
  rule and the reference's leg map: the seed study's protocol), ``fat_volume_error_pct``,
  ``abs_fat_volume_error_pct``; and, where the reference folder has a ``truth.json`` with
  exact fat volumes (the phantom's), ``exact_fat_volume_ml``,
  ``exact_fat_volume_error_pct`` (prediction vs exact) and ``reference_fat_volume_error_pct``
  (quantify(reference) vs exact: the error of the threshold method itself), and the same
  for the partial-volume-aware estimate (``pred_pv_fat_volume_ml``,
  ``exact_pv_fat_volume_error_pct``, ``reference_pv_fat_volume_error_pct``).

DSC of a structure absent from both maps is NaN; HD95 is NaN when either map lacks it. A structure the
reference does not label at all (no id of the ``mapping`` maps to it) is not applicable: it has no
segmentation rows, so it stays out of the means, and the summary names it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.evaluation.metrics import confusion, dice_from_confusion, hausdorff95, relative_error_pct
from legcomp.io.atomic import staged_output
from legcomp.io.study import DixonStudy
from legcomp.preprocessing.legs import leg_map
from legcomp.quantification.core import quantify

log = logging.getLogger(__name__)

METRIC_COLUMNS: tuple[str, ...] = ("subject", "region", "leg", "structure", "metric", "value")
FAT_STRUCTURES: tuple[str, ...] = ("mat", "intramat", "intermat")
PRED_NAMES: dict[str, tuple[str, ...]] = {"stage1": ("stage1",), "stage2": ("stage2",)}
TRUTH_FALLBACK: dict[str, tuple[str, ...]] = {"stage1": ("stage1",), "stage2": ("stage2", "reference_labels", "labels")}


@dataclass
class Evaluation:
    """Result of :func:`evaluate_paths`.

    Attributes:
        metrics: tidy per-subject table (columns :data:`METRIC_COLUMNS`).
        summary: per structure, leg and metric: mean, sd (ddof 1), n over subjects.
        errors: subject -> one-line reason it could not be evaluated.
        not_labelled: subject -> structures its reference does not label (left out, not scored 0).
    """

    metrics: pd.DataFrame
    summary: pd.DataFrame
    errors: dict[str, str] = field(default_factory=dict)
    not_labelled: dict[str, list[str]] = field(default_factory=dict)


def _seg_metrics(pred: np.ndarray, truth: np.ndarray, labs, spacing, vox_ml: float,
                 skip: frozenset[str] = frozenset()) -> list[tuple[str, str, float]]:
    n = max([lab.id for lab in labs] + [int(pred.max()), int(truth.max())]) + 1
    c = confusion(pred, truth, n)
    dsc = dice_from_confusion(c)
    vp, vt = c.sum(1) * vox_ml, c.sum(0) * vox_ml
    out = []
    for lab in labs:
        if lab.name in skip:  # the reference does not label it: not applicable
            continue
        i = lab.id
        out.append((lab.name, "dsc", float(dsc[i])))
        hd = hausdorff95(pred == i, truth == i, spacing) if vp[i] > 0 and vt[i] > 0 else float("nan")
        out.append((lab.name, "hd95_mm", hd))
        err = relative_error_pct(float(vp[i]), float(vt[i]))
        out += [(lab.name, "pred_volume_ml", float(vp[i])), (lab.name, "true_volume_ml", float(vt[i])),
                (lab.name, "volume_error_pct", err), (lab.name, "abs_volume_error_pct", abs(err))]
    return out


_LEG_KEYS = {"left", "right", "total"}


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x)) else None


def _phantom_fat_volumes(truth: dict) -> dict[tuple[str, str], float]:
    """legcomp's phantom layout: ``{"legs": {leg: {...}}, "total": {...}}`` with ``intramat_ml``,
    ``intermat_ml`` and ``whole_muscle.fat_volume_ml`` (= MAT)."""
    out: dict[tuple[str, str], float] = {}
    if not isinstance(truth, dict):
        return out
    blocks = dict(truth.get("legs") or {}) if isinstance(truth.get("legs"), dict) else {}
    if isinstance(truth.get("total"), dict):
        blocks["total"] = truth["total"]
    for leg, d in blocks.items():
        if leg not in _LEG_KEYS or not isinstance(d, dict):
            continue
        intra, inter = _num(d.get("intramat_ml")), _num(d.get("intermat_ml"))
        wm = d.get("whole_muscle")
        mat = _num(wm.get("fat_volume_ml")) if isinstance(wm, dict) else None
        if mat is None and intra is not None and inter is not None:
            mat = intra + inter
        for s, v in (("mat", mat), ("intramat", intra), ("intermat", inter)):
            if v is not None:
                out[(leg, s)] = v
    return out


def exact_fat_volumes(truth: dict) -> dict[tuple[str, str], float]:
    """Exact fat volumes (mL) ``(leg, structure) -> value`` found in a phantom ``truth.json``.

    legcomp's phantom layout (``legs``/``total`` blocks with ``intramat_ml``, ``intermat_ml``,
    ``whole_muscle.fat_volume_ml``) is read first. Otherwise, read defensively: any numeric
    leaf whose key path names a leg (left/right/total; a path without one counts as total)
    and one of mat/intramat/intermat, and whose path mentions
    fat volume (keys containing ``fat`` or ``ml``, not ``fraction``), is taken. Keys are
    matched case-insensitively; unknown layouts give an empty dict.
    """
    phantom = _phantom_fat_volumes(truth)
    if phantom:
        return phantom
    found: dict[tuple[str, str], tuple[int, float]] = {}

    def walk(node, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (str(k).lower(),))
            return
        if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(float(node)):
            return
        toks = set()
        for p in path:
            toks.update(p.replace("-", "_").replace("/", "_").split("_"))
            toks.add(p)
        structs = [s for s in FAT_STRUCTURES if s in path or s in toks]
        if len(structs) != 1 or any("fraction" in p or p in ("ff", "fat_fraction") for p in path):
            return
        if any(p in ("count", "voxels", "n_voxels") for p in path):
            return
        legs = [p for p in path if p in _LEG_KEYS] or [t for t in toks if t in _LEG_KEYS]
        leg = legs[-1] if legs else "total"
        joined = "/".join(path)
        score = ("fat" in joined) + ("ml" in joined) + ("pv" not in joined)
        if score == 0 and path[-1] not in structs:
            return
        key = (leg, structs[0])
        if key not in found or score > found[key][0]:
            found[key] = (score, float(node))

    walk(truth, ())
    out = {k: v for k, (_, v) in found.items()}
    if "total" not in {leg for leg, _ in out}:
        for s in FAT_STRUCTURES:
            if ("left", s) in out and ("right", s) in out:
                out[("total", s)] = out[("left", s)] + out[("right", s)]
    return out


def evaluate_subject(pred_stage1: np.ndarray | None, pred_stage2: np.ndarray | None,
                     true_stage1: np.ndarray | None, true_stage2: np.ndarray | None, study: DixonStudy, *,
                     region: str | None = None, fat_rule: str = "seed", truth: dict | None = None,
                     legs: np.ndarray | None = None, subject: str | None = None,
                     not_labelled: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Metrics of one subject (tidy DataFrame, columns :data:`METRIC_COLUMNS`).

    Args:
        pred_stage1, pred_stage2: predicted label maps (x, y, z) or None.
        true_stage1, true_stage2: reference label maps or None; a stage is evaluated when
            both its prediction and its reference are given.
        study: the Dixon study (fat/water for the fat measures, affine for mm and mL).
        region: ``thigh``/``calf`` (default: the study's).
        fat_rule: fat rule for MAT/IntraMAT/InterMAT (see :func:`legcomp.quantification.fat_mask`).
        truth: parsed ``truth.json`` (exact fat volumes), optional.
        legs: leg map; default from the reference labels, shared by prediction and reference.
        not_labelled: structures the reference does not label: no segmentation metrics (not applicable).
    """
    subject = subject or study.name
    reg = region or study.region
    pairs = [(1, pred_stage1, true_stage1), (2, pred_stage2, true_stage2)]
    if all(p is None or t is None for _, p, t in pairs):
        raise LegcompInputError(f"{subject}: no stage with both a prediction and a reference to compare")
    # fat measures: prediction and reference quantified the same way, on the reference's legs
    ts1 = true_stage1 if pred_stage1 is not None else None
    ts2 = true_stage2 if pred_stage2 is not None else None
    if legs is None:
        fg = np.zeros(study.shape, bool)
        for a in (ts1, ts2):
            if a is not None:
                fg |= np.asarray(a) > 0
        legs = leg_map(fg, study.affine, muscles=ts2, region=reg if ts2 is not None else None)
    qp = quantify(study, pred_stage1 if ts1 is not None else None, pred_stage2 if ts2 is not None else None,
                  region=reg, fat_rule=fat_rule, legs=legs, subject=subject, keep_hip=True)
    # keep_hip: both compared over the whole field of view (hip slices are a reporting choice, not an error)
    qt = quantify(study, ts1, ts2, region=reg, fat_rule=fat_rule, legs=legs, subject=subject, keep_hip=True)
    spacing, vox_ml = study.spacing, study.voxel_volume_ml
    rows: list[tuple[str, str, float]] = []
    for stage, p, t in pairs:
        if p is None or t is None:
            continue
        p, t = np.asarray(p), np.asarray(t)
        if p.shape != study.shape or t.shape != study.shape:
            raise LegcompInputError(f"{subject}: stage-{stage} maps {p.shape} / {t.shape} "
                                    f"differ from the study's {study.shape}")
        rows += [("total", *r) for r in _seg_metrics(p, t, anatomy.stage_labels(stage, reg), spacing, vox_ml,
                                                      frozenset(not_labelled))]
    exact = exact_fat_volumes(truth) if truth else {}

    def fat_table(q, measure: str = "fat_volume_ml") -> dict[tuple[str, str], float]:
        t = q.table[(q.table.measure == measure) & q.table.structure.isin(FAT_STRUCTURES)]
        return {(r.leg, r.structure): float(r.value) for r in t.itertuples(index=False)}

    fp, ft = fat_table(qp), fat_table(qt)
    pvp, pvt = fat_table(qp, "pv_fat_volume_ml"), fat_table(qt, "pv_fat_volume_ml")
    for key in sorted(set(fp) & set(ft)):
        leg, s = key
        err = relative_error_pct(fp[key], ft[key])
        rows += [(leg, s, "pred_fat_volume_ml", fp[key]), (leg, s, "true_fat_volume_ml", ft[key]),
                 (leg, s, "fat_volume_error_pct", err), (leg, s, "abs_fat_volume_error_pct", abs(err))]
        if key in exact:
            e = relative_error_pct(fp[key], exact[key])
            rows += [(leg, s, "exact_fat_volume_ml", exact[key]), (leg, s, "exact_fat_volume_error_pct", e),
                     (leg, s, "reference_fat_volume_error_pct", relative_error_pct(ft[key], exact[key])),
                     (leg, s, "pred_pv_fat_volume_ml", pvp[key]),
                     (leg, s, "exact_pv_fat_volume_error_pct", relative_error_pct(pvp[key], exact[key])),
                     (leg, s, "reference_pv_fat_volume_error_pct", relative_error_pct(pvt[key], exact[key]))]
    df = pd.DataFrame(rows, columns=["leg", "structure", "metric", "value"])
    df.insert(0, "region", reg)
    df.insert(0, "subject", subject)
    return df[list(METRIC_COLUMNS)]


def summarize(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean, SD (ddof 1; NaN for one subject) and n over subjects per structure, leg and metric."""
    if metrics.empty:
        return pd.DataFrame(columns=["region", "leg", "structure", "metric", "mean", "sd", "n"])
    g = metrics.groupby(["region", "leg", "structure", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", sd="std", n="count").reset_index()
    return out


def summary_markdown(summary: pd.DataFrame, errors: dict[str, str] | None = None, n_subjects: int | None = None,
                     not_labelled: dict[str, list[str]] | None = None) -> str:
    """The summary as a markdown table: one row per structure (and leg), ``mean ± SD`` per metric; then the
    structures a reference does not label (left out of the means) and the subjects not evaluated."""
    lines = ["# legcomp evaluation summary", ""]
    if n_subjects is not None:
        lines += [f"Subjects evaluated: {n_subjects}" + (f"; failed: {len(errors)}" if errors else ""), ""]
    for names, subjects in _group_subjects(not_labelled or {}).items():
        lines += [f"Not labelled by the reference, left out of the means (not applicable, not DSC 0): "
                  f"{', '.join(names)} ({', '.join(subjects)})", ""]
    for (region, group) in (summary.groupby("region", sort=False) if not summary.empty else []):
        for title, metrics in (("Segmentation", ["dsc", "hd95_mm", "volume_error_pct", "abs_volume_error_pct"]),
                               ("Fat volumes", ["fat_volume_error_pct", "abs_fat_volume_error_pct",
                                                "exact_fat_volume_error_pct", "reference_fat_volume_error_pct",
                                                "exact_pv_fat_volume_error_pct"])):
            sub = group[group.metric.isin(metrics)]
            if sub.empty:
                continue
            present = [m for m in metrics if m in set(sub.metric)]
            lines += [f"## {title} ({region})", "", "| structure | leg | " + " | ".join(present) + " | n |",
                      "|---|---|" + "---|" * (len(present) + 1)]
            for (s, leg), rows in sub.groupby(["structure", "leg"], sort=False):
                cells = []
                for m in present:
                    r = rows[rows.metric == m]
                    if r.empty or not np.isfinite(r["mean"].iloc[0]):
                        cells.append("–")
                    else:
                        mu, sd = float(r["mean"].iloc[0]), float(r["sd"].iloc[0])
                        cells.append(f"{mu:.3f}" + (f" ± {sd:.3f}" if np.isfinite(sd) else ""))
                lines.append(f"| {s} | {leg} | " + " | ".join(cells) + f" | {int(rows['n'].max())} |")
            lines.append("")
    if errors:
        lines += ["## Subjects not evaluated", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    return "\n".join(lines)


def _group_subjects(not_labelled: dict[str, list[str]]) -> dict[tuple[str, ...], list[str]]:
    """Subjects grouped by the (sorted) structures their reference leaves unlabelled; empty lists left out."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for subject, names in sorted(not_labelled.items()):
        if names:
            groups.setdefault(tuple(sorted(names)), []).append(subject)
    return groups


def not_labelled_by(mapping, region: str, stage: int) -> list[str]:
    """Structures of ``stage`` that no id of a label mapping maps to: the reference does not label them."""
    mapped = {name for name in mapping.values() if name}
    return [lab.name for lab in anatomy.stage_labels(stage, region) if lab.name not in mapped]


def _find_nii(folder: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for ext in (".nii.gz", ".nii"):
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def _is_study_folder(folder: Path) -> bool:
    from legcomp.io.nifti import classify_files

    try:
        return "water" in classify_files(folder)[0]
    except LegcompInputError:
        return True


def _is_pred_folder(folder: Path) -> bool:
    return any(_find_nii(folder, s) for s in PRED_NAMES.values())


def _evaluate_pair(pred_dir: Path, truth_dir: Path, *, fat_rule: str, mapping,
                   region: str | None) -> tuple[pd.DataFrame, list[str]]:
    """Metrics of one subject, and the structures its reference does not label (by the mapping)."""
    from legcomp.io.nifti import read_label_map, read_study
    from legcomp.quantification.mapping import apply_label_mapping, load_label_mapping, mapping_stage

    study = read_study(truth_dir, region=region)
    mp = load_label_mapping(mapping) if isinstance(mapping, (str, Path)) else mapping
    reg = region or (study.region if study.region != "unknown" else getattr(mp, "region", None))
    if reg in (None, "unknown"):
        raise LegcompInputError("region unknown; pass region", truth_dir)
    mstage = mapping_stage(mp, reg) if mp is not None else None
    preds, truths = {}, {}
    for kind in ("stage1", "stage2"):
        p = _find_nii(pred_dir, PRED_NAMES[kind])
        preds[kind] = read_label_map(p, study) if p is not None else None
        t = study.labels.get(kind)
        tpath: object = truth_dir / f"{kind}.nii.gz"
        if t is None:
            stems = TRUTH_FALLBACK[kind] if (mp is not None and mstage == int(kind[-1])) else (kind,)
            tp = _find_nii(truth_dir, stems)
            t = read_label_map(tp, study) if tp is not None else None
            tpath = tp
        if t is not None and mp is not None and mstage == int(kind[-1]):
            t = apply_label_mapping(t, mp, reg, tpath)
        truths[kind] = t
    truth_json = None
    tj = truth_dir / "truth.json"
    if tj.is_file():
        try:
            truth_json = json.loads(tj.read_text())
        except ValueError as exc:
            log.warning("%s: unreadable truth.json (%s); exact fat volumes skipped", tj, exc)
    legs = study.labels.get("legs")
    if legs is not None and not legs.any():
        legs = None
    unlabelled = not_labelled_by(mp, reg, mstage) if mp is not None and mstage is not None else []
    metrics = evaluate_subject(preds["stage1"], preds["stage2"], truths["stage1"], truths["stage2"], study,
                               region=reg, fat_rule=fat_rule, truth=truth_json, legs=legs, subject=truth_dir.name,
                               not_labelled=frozenset(unlabelled))
    return metrics, unlabelled


def evaluate_paths(pred: str | Path, truth: str | Path, out_dir: str | Path | None = None, *,
                   fat_rule: str = "seed", mapping: str | Path | dict | None = None,
                   region: str | None = None) -> Evaluation:
    """Evaluate one subject folder, or a folder of subject folders matched by name.

    Args:
        pred: folder with ``stage1.nii.gz`` / ``stage2.nii.gz``, or a folder of such folders.
        truth: the reference: a study folder (images + ``stage1``/``stage2``, optional
            ``truth.json``), or a folder of them with the same subject names.
        out_dir: where to write ``metrics.csv``, ``summary.csv``, ``summary.md`` (None: don't).
        fat_rule: fat rule for MAT/IntraMAT/InterMAT.
        mapping: label mapping (file, shipped name or dict) applied to the reference map of
            its stage (e.g. ``huashan_thigh`` for ``reference_labels.nii.gz``).
    Returns:
        :class:`Evaluation`; a subject that fails is listed in ``errors`` and the rest go on.
    Raises:
        LegcompInputError: missing folders, or no subject could be matched.
    """
    pred, truth = Path(pred), Path(truth)
    for p in (pred, truth):
        if not p.is_dir():
            raise LegcompInputError("not a folder", p)
    if _is_pred_folder(pred):
        # one subject: the reference is ``truth`` itself, or its sub-folder of the same name
        tdir = truth / pred.name if (truth / pred.name).is_dir() and not _is_study_folder(truth) else truth
        pairs = [(pred.name, pred, tdir)]
    else:
        subs = sorted(d for d in pred.iterdir() if d.is_dir() and _is_pred_folder(d))
        if not subs:
            raise LegcompInputError("no stage1/stage2 predictions found (neither here nor in sub-folders)", pred)
        pairs = [(d.name, d, truth / d.name) for d in subs]
    frames, errors = [], {}
    not_labelled: dict[str, list[str]] = {}
    for name, pdir, tdir in pairs:
        try:
            if not tdir.is_dir():
                raise LegcompInputError("no matching reference folder", tdir)
            frame, not_labelled[name] = _evaluate_pair(pdir, tdir, fat_rule=fat_rule, mapping=mapping, region=region)
            frames.append(frame)
        except Exception as exc:  # one bad subject is reported, the rest go on
            errors[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("evaluation of %s failed: %s", name, errors[name])
    if not frames and errors and len(pairs) == 1:
        raise LegcompInputError(next(iter(errors.values())))
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(METRIC_COLUMNS))
    summary = summarize(metrics)
    result = Evaluation(metrics=metrics, summary=summary, errors=errors,
                        not_labelled={k: v for k, v in not_labelled.items() if v})
    if out_dir is not None:
        write_evaluation(result, out_dir)
    return result


def write_evaluation(ev: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.csv``, ``summary.csv``, ``summary.md`` (and ``errors.csv`` if any) atomically."""
    out_dir = Path(out_dir)
    names = {"metrics": "metrics.csv", "summary": "summary.csv", "markdown": "summary.md"}
    with staged_output(out_dir, managed=[*names.values(), "errors.csv"]) as tmp:
        ev.metrics.to_csv(tmp / names["metrics"], index=False, float_format="%.6g")
        ev.summary.to_csv(tmp / names["summary"], index=False, float_format="%.6g")
        n = ev.metrics.subject.nunique() if not ev.metrics.empty else 0
        (tmp / names["markdown"]).write_text(summary_markdown(ev.summary, ev.errors, n, ev.not_labelled))
        if ev.errors:
            names["errors"] = "errors.csv"
            pd.DataFrame(sorted(ev.errors.items()), columns=["subject", "error"]).to_csv(tmp / names["errors"], index=False)
    return {k: out_dir / n_ for k, n_ in names.items()}
