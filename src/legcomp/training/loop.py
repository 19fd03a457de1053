"""Training one network of the cascade (stage 1 or 2, thigh or calf).

Single process or multi-process (``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK in the environment,
DistributedDataParallel, NCCL on CUDA / Gloo on CPU, training cases sharded across ranks, only rank 0
validates and writes files).

Files written to ``out`` (stem ``<region>_stage<k>``):

* ``<stem>.pt`` - *the* weights (what ``legcomp run --weights OUT`` loads): a copy of the candidate
  that ``keep`` names (:func:`legcomp.models.save_weights`; validation DSC per structure and
  ``selection`` in the meta). Candidates, each rewritten when it changes:
  ``<stem>.last.pt`` (the last epoch), ``<stem>.best_fold.pt`` (best mean DSC on the k-fold
  validation studies; with ``folds > 1``), ``<stem>.best_val.pt`` (best mean DSC on the ``val_dirs``
  studies; with ``val_dirs``);
* ``<stem>.provenance.json`` beside each weights file (``<stem>.last.provenance.json``...; see
  :mod:`legcomp.training.provenance`);
* ``<stem>.checkpoint.pt`` - last epoch's model, optimizer, progress, RNG states (for ``resume``);
* ``<stem>.metrics.csv`` - one row per epoch (loss, learning rate, seconds, seconds waiting for data,
  k-fold validation ``val_mean_dsc`` / ``dsc_<structure>``, ``val_dirs`` scores ``valset_mean_dsc`` /
  ``valset_dsc_<structure>`` and, with several folders, ``valset<k>_mean_dsc``);
  ``<stem>.valset_cases.csv`` - ``val_dirs`` DSC per case and structure at each validation;
  ``<stem>.curve.png`` - learning curve;
* ``<stem>.summary.json`` - the returned summary; ``train.log`` - the log (appended to).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.models import build_network, count_parameters, network_divisor, resolve_config, save_weights
from legcomp.preprocessing import inputs as prep
from legcomp.training import data as D

log = logging.getLogger(__name__)

DEFAULT_PATCH = {1: (128, 128, 32), 2: (128, 128, 48)}
"""Default patch size (x, y, z voxels) per stage (the seed's 32 / 48 slices)."""


# --------------------------------------------------------------------------- distributed helpers

def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment variables (0, 1, 0 if absent)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` if available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LegcompInputError("CUDA was asked for but is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    st = np.random.get_state()
    py = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(st[1].astype(np.int64)),
           "numpy_pos": int(st[2]), "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), int(st["numpy_pos"]), 0, 0.0))
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except Exception:  # different GPU count
            pass


# --------------------------------------------------------------------------- validation

def validate(model: torch.nn.Module, cases: Sequence[dict], n_classes: int, patch: Sequence[int],
             divisor: Sequence[int], device: torch.device, amp: bool, sw_batch: int = 4) -> np.ndarray:
    """Sliding-window DSC per case and foreground class: float array (cases, n_classes - 1).

    The DSC is ``legcomp evaluate``'s (:func:`legcomp.evaluation.metrics.dice_from_confusion`): NaN
    where the structure is absent from both the prediction and the reference; NaN too where the
    case does not label it (its ``classes``); :data:`legcomp.anatomy.IGNORE` voxels are left out.
    """
    from monai.inferers import sliding_window_inference

    from legcomp.evaluation.metrics import confusion, dice_from_confusion

    rows = []
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for case in cases:
            img = prep.pad_to_multiple(np.asarray(case["image"], np.float32), divisor, minimum=patch, mode="constant")
            x = torch.from_numpy(np.ascontiguousarray(img))[None].to(device)
            logits = sliding_window_inference(x, roi_size=list(patch), sw_batch_size=sw_batch, predictor=model,
                                              overlap=0.25, mode="gaussian")
            nx, ny, nz = case["label"].shape[1:]
            pred = logits[0].argmax(0)[:nx, :ny, :nz].to(torch.uint8).cpu().numpy()
            ref = np.asarray(case["label"][0])
            keep = ref != anatomy.IGNORE
            row = dice_from_confusion(confusion(pred[keep], ref[keep], n_classes))[1:n_classes]
            if "classes" in case:
                row = np.where(np.asarray(case["classes"])[1:] > 0.5, row, np.nan)
            rows.append(row)
    model.train()
    return np.stack(rows) if rows else np.zeros((0, n_classes - 1))


def _mean_dsc(dsc_rows: np.ndarray, names) -> tuple[dict, float]:
    """(per-structure mean over cases, NaN-aware, None where no case has a value; mean over structures)."""
    with np.errstate(all="ignore"):
        per = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in np.asarray(dsc_rows).T]) \
            if len(dsc_rows) else np.full(len(names), np.nan)
    dsc = {lab.name: (None if np.isnan(v) else round(float(v), 4)) for lab, v in zip(names, per)}
    mean = float(np.nanmean(per)) if np.isfinite(per).any() else 0.0
    return dsc, mean


# --------------------------------------------------------------------------- outputs

def _write_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ep = [r["epoch"] for r in rows]
    ax.plot(ep, [r["train_loss"] for r in rows], color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    series = [("val_mean_dsc", "tab:red", "k-fold validation"), ("valset_mean_dsc", "tab:green", "--val studies")]
    ax2 = None
    for key, color, label in series:
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) not in (None, "")]
        if pts:
            ax2 = ax2 or ax.twinx()
            ax2.plot(*zip(*pts), "o-", color=color, ms=3, label=f"{label} mean DSC")
    if ax2 is not None:
        ax2.set_ylabel("mean DSC")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right", fontsize=7)
    ax.set_title(path.stem.replace(".curve", ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_csv(rows: list[dict], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- train

KEEPS = ("auto", "best-val", "last", "best-fold")
"""``keep`` choices: which candidate ``<stem>.pt`` is (``auto``: best-val with ``val_dirs``, else
best-fold with a k-fold validation set, else last)."""


def _hms(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _writable(a):
    """``a``, or a writable in-memory copy of it when it is read-only (a memory-mapped cache array)."""
    a = np.asarray(a)
    return a if a.flags.writeable else np.array(a)


def _copy_atomic(src: Path, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _attach_logging(log_file: Path | None) -> tuple[list[logging.Handler], int]:
    """Send legcomp.training's INFO lines to ``log_file`` and (when logging is not configured) to stderr."""
    import sys

    tlog = logging.getLogger("legcomp.training")
    added: list[logging.Handler] = []
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        added.append(fh)
        if not logging.getLogger().handlers and not any(
                type(h) is logging.StreamHandler for lg in (tlog, logging.getLogger("legcomp")) for h in lg.handlers):
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            added.append(sh)
    for h in added:
        tlog.addHandler(h)
    level = tlog.level
    if tlog.getEffectiveLevel() > logging.INFO:
        tlog.setLevel(logging.INFO)
    return added, level


def train(data_dir, *, stage: int, region: str, out: str | Path, folds: int = 5, fold: int = 0,
          config: str | dict = "fast", epochs: int = 100, iters_per_epoch: int = 50,
          patch: Sequence[int] | None = None, batch: int = 2, lr: float = 1e-3, weight_decay: float = 1e-4,
          loss: str = "dicece", seed: int = 0, device: str = "auto", amp: bool = True, resume: bool = True,
          patience: int = 30, val_interval: int = 1, max_cases: int | None = None, workers: int = 0,
          with_stage1: bool = False, working_spacing: Sequence[float | None] | None = prep.WORKING_SPACING,
          augment: bool = True, time_limit_min: float | None = None, progress: bool = True,
          cases: tuple[list[dict], list[dict]] | None = None,
          init_weights: str | Path | None = None,
          normalisation: str = prep.NORMALISATIONS[0], val_dirs: Sequence[str | Path] | None = None,
          cache: str | Path | None = None, keep: str = "auto", command: str | None = None) -> dict[str, Any]:
    """Train one network of the cascade and save its weights (see the module doc for the files).

    Args:
        data_dir: one data source or a list of them. A source is a folder of labelled studies (any
            layout :func:`legcomp.io.find_studies` finds; the region comes from the path, e.g.
            ``thigh_00012``), optionally with a sampling weight: ``"real/:0.3"``, ``("real/", 0.3)``
            or a :class:`legcomp.training.data.Source` (default weight 1). Each optimizer step draws
            its patches from the sources in proportion to their weights whatever their sizes
            (:func:`legcomp.training.data.source_sampler`); one source samples its cases uniformly.
        stage: 1 (background/SAT/whole muscle from water+fat) or 2 (muscles from opposed phase+water).
        region: ``thigh`` or ``calf``.
        out: output folder (see module doc for the files).
        folds, fold: deterministic k-fold split *per source* (each source's studies by sorted name and
            ``seed``, so adding a source never changes another's split, and one source splits as it
            always did); ``folds=1`` trains on all studies without k-fold validation. With several
            sources, a source with fewer studies than folds is dealt into some of the folds.
        config: network config (``fast``, ``seed``, ``tiny`` or a dict).
        epochs, iters_per_epoch: epochs and optimizer steps per epoch.
        patch: patch size (x, y, z voxels); default 128x128x32 (stage 1) / 128x128x48 (stage 2),
            clamped to the data and rounded to the network divisor.
        batch: patches per step (per process).
        lr, weight_decay: AdamW; the learning rate decays as (1 - progress)^0.9, progress being
            epoch/epochs or, with ``time_limit_min``, the larger of that and the fraction of time used.
        loss: ``dicece`` (Dice + cross-entropy) or ``dicefocal`` (Dice + softmax focal), both marginal
            partial-label losses (:class:`legcomp.training.losses.PartialLabelLoss`): label voxels
            :data:`legcomp.anatomy.IGNORE` are left out, and a structure a study's label record lists as
            unlabelled is merged with background for that study's patches instead of learnt as background.
        seed: seeds the split, weights, patch sampling and augmentation.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        resume: continue from ``<stem>.checkpoint.pt`` in ``out`` when present.
        patience: stop when the monitored mean DSC has not improved for this many epochs (0 = never);
            the ``val_dirs`` score when ``keep`` is best-val, else the k-fold validation's.
        val_interval: validate (k-fold and ``val_dirs``) every this many epochs (and at the last one).
        max_cases: use only the first N studies (sorted by name) of each source.
        workers: DataLoader worker processes (CPU data only; data cached on the GPU uses 0).
        with_stage1: stage 2 gets the stage-1 whole-muscle mask as a third input channel.
        working_spacing: working voxel size (mm, None = native) for the network's inputs.
        augment: use data augmentation.
        time_limit_min: wall-clock budget (minutes, data loading included, summed over resumed runs): the
            learning-rate decay follows whichever of epochs or time runs out first, and training
            stops after the epoch that crosses the budget.
        progress: tqdm progress bars (rank 0). The per-epoch log line is written either way.
        cases: optional pre-built (train cases, validation cases), bypassing ``data_dir``.
        init_weights: start from this weights file (``"bundled"``: the bundled one of this region and
            stage; same region, stage and config) instead of a
            random initialisation, e.g. to continue training bundled weights (fine-tuning).
        normalisation: input intensity normalisation (:data:`legcomp.preprocessing.inputs.NORMALISATIONS`),
            recorded in the weights so inference uses the same.
        val_dirs: folders of labelled studies (e.g. real scans) scored every ``val_interval`` epochs on
            rank 0, all their studies, never trained on: DSC per case and structure (as
            :func:`validate`; structures a study's label record lists as unlabelled and IGNORE voxels
            left out); the best mean is kept as ``<stem>.best_val.pt``.
        cache: preprocessing cache folder (:mod:`legcomp.training.cache`; None = no cache). The
            command line's default is :func:`legcomp.training.cache.default_cache_dir`.
        keep: which candidate ``<stem>.pt`` is: ``best-val``, ``last``, ``best-fold`` or ``auto``
            (:data:`KEEPS`).
        command: the command line recorded in the provenance (default: this process's ``sys.argv``).
    Returns:
        Summary dict: paths written, best epochs, best DSC per structure, per-source counts, timings.

    A study that cannot be read or used is skipped (one logged line naming it and the reason; listed in
    the summary and provenance); :class:`LegcompInputError` only when no usable training study is left.
    """
    import shlex
    import sys

    from monai.data import CacheDataset, DataLoader, ThreadDataLoader, set_track_meta
    from tqdm.auto import tqdm

    from legcomp import __version__
    from legcomp.training import provenance as P
    from legcomp.training.cache import CaseCache
    from legcomp.training.losses import PartialLabelLoss, all_classes

    region = anatomy.check_region(region)
    stage = int(stage)
    if stage not in (1, 2):
        raise LegcompInputError(f"unknown stage {stage!r}; expected 1 or 2")
    if loss not in ("dicece", "dicefocal"):
        raise LegcompInputError(f"unknown loss {loss!r}; expected dicece or dicefocal")
    if keep not in KEEPS:
        raise LegcompInputError(f"unknown keep {keep!r}; expected one of {', '.join(KEEPS)}")
    with_stage1 = bool(with_stage1 and stage == 2)
    normalisation = prep.check_normalisation(normalisation)
    cfg = resolve_config(config)
    divisor = network_divisor(cfg)
    n_classes = anatomy.n_classes(stage, region)
    names = anatomy.stage_labels(stage, region)
    sources = D.parse_sources(data_dir) if cases is None else []
    val_sets = [Path(v) for v in (val_dirs or [])]
    has_fold_val = (folds > 1) if cases is None else bool(cases[1])
    if keep == "auto":
        keep = "best-val" if val_sets else ("best-fold" if has_fold_val else "last")
    elif keep == "best-val" and not val_sets:
        raise LegcompInputError("keep best-val needs validation studies (--val)")
    elif keep == "best-fold" and not has_fold_val:
        raise LegcompInputError("keep best-fold needs a k-fold validation set (--folds > 1)")
    if command is None:
        command = shlex.join(sys.argv)
    rank, world, local_rank = dist_env()
    dev = resolve_device(device, local_rank)
    distributed = world > 1
    own_pg = False
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            own_pg = True
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    is_main = rank == 0
    use_amp = bool(amp and dev.type == "cuda")
    out = Path(out)
    stem = f"{region}_stage{stage}"
    paths = {"weights": out / f"{stem}.pt", "last": out / f"{stem}.last.pt",
             "best_fold": out / f"{stem}.best_fold.pt", "best_val": out / f"{stem}.best_val.pt",
             "checkpoint": out / f"{stem}.checkpoint.pt", "metrics": out / f"{stem}.metrics.csv",
             "valset_cases": out / f"{stem}.valset_cases.csv", "curve": out / f"{stem}.curve.png",
             "summary": out / f"{stem}.summary.json", "log": out / "train.log"}
    candidate = {"last": paths["last"], "best-fold": paths["best_fold"], "best-val": paths["best_val"]}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ws = tuple(working_spacing) if working_spacing is not None else (None, None, None)
    handlers, old_level = _attach_logging(paths["log"] if is_main else None)
    prev_meta = _track_meta_state()
    try:
        if is_main:
            log.info("%s: legcomp %s train %s", stem, __version__, command)

        # ---- data
        cache_obj = CaseCache(cache) if (cache and cases is None) else None
        load_kw = dict(spacing=ws, with_stage1=with_stage1, normalisation=normalisation, cache=cache_obj,
                       progress=progress and is_main)
        split_info: dict[str, Any] = {}
        loaded = D.LoadedStudies()
        case_src: list[int] = []
        reports: list[dict] = []
        if cases is None:
            train_cases, val_cases = [], []
            split_info = {"method": "k-fold per source" if len(sources) > 1 else "k-fold", "train": [], "val": [],
                          "per_source": []}
            for si, src in enumerate(sources):
                study_paths = D.discover(src.path, region, max_cases)
                snames = [p.name for p in study_paths]
                tr_idx, va_idx = D.kfold_split(snames, folds, fold, seed, allow_fewer=len(sources) > 1)
                label = (lambda n: n) if len(sources) == 1 else (lambda n, _s=src: f"{_s.path.name}/{n}")
                split_info["train"] += [label(snames[i]) for i in tr_idx]
                split_info["val"] += [label(snames[i]) for i in va_idx]
                split_info["per_source"].append({"source": str(src.path.resolve()),
                                                 "train": [snames[i] for i in tr_idx],
                                                 "val": [snames[i] for i in va_idx]})
                my_idx = tr_idx[rank::world] if distributed and len(tr_idx) >= world else tr_idx
                tr = D.load_studies([study_paths[i] for i in my_idx], stage, region, **load_kw)
                va = (D.load_studies([study_paths[i] for i in va_idx], stage, region, **load_kw) if is_main
                      else D.LoadedStudies())
                loaded.extend(tr)
                loaded.extend(va)
                for c in tr.cases:
                    train_cases.append(c)
                    case_src.append(si)
                val_cases += va.cases
                reports.append({"studies": len(study_paths), "train_studies": len(tr_idx),
                                "val_studies": len(va_idx),
                                "used": {str(sc.path): [sc.path.name, sc.content, sc.label_record,
                                                        "train" if k < len(tr.studies) else "val", len(sc.cases)]
                                         for k, sc in enumerate(tr.studies + va.studies)},
                                "skipped": tr.skipped + va.skipped})
        else:
            train_cases, val_cases = list(cases[0]), list(cases[1]) if is_main else []
            if distributed and len(train_cases) >= world:
                train_cases = train_cases[rank::world]
            case_src = [0] * len(train_cases)
        # the --val studies (rank 0 scores them)
        valset_cases: list[dict] = []
        valset_info: list[dict] = []
        valset_content: set[str] = set()
        if is_main:
            for k, vdir in enumerate(val_sets):
                got = D.load_studies(D.discover(vdir, region), stage, region, **load_kw)
                for d in got.skipped:
                    d["val_set"] = str(vdir.resolve())
                loaded.extend(got)
                for sc in got.studies:
                    valset_cases += [{**c, "set": k, "study": sc.path.name} for c in sc.cases]
                    valset_content.add(sc.content)
                valset_info.append({"path": str(vdir.resolve()), "studies": len(got.studies) + len(got.skipped),
                                    "used": len(got.studies), "skipped": len(got.skipped),
                                    "cases": sum(len(sc.cases) for sc in got.studies),
                                    "hash": P.studies_hash((sc.path.name, sc.content) for sc in got.studies),
                                    "lacks": P.lacks(sc.label_record for sc in got.studies)})
        # every rank's view of the sources, merged on rank 0
        if distributed and cases is None:
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, reports)
        else:
            gathered = [reports]
        source_info: list[dict] = []
        skipped: list[dict] = []
        for si, src in enumerate(sources):
            used: dict[str, list] = {}
            skip: dict[str, dict] = {}
            for rep in gathered:
                used.update(rep[si]["used"])
                skip.update({d["study"]: {**d, "source": str(src.path.resolve())} for d in rep[si]["skipped"]})
            rep0 = gathered[0][si]
            source_info.append({
                "path": str(src.path.resolve()), "weight": src.weight,
                "share": round(src.weight / sum(s.weight for s in sources), 4),
                "studies": rep0["studies"], "used": len(used), "skipped": len(skip),
                "train_studies": sum(1 for u in used.values() if u[3] == "train"),
                "val_studies": sum(1 for u in used.values() if u[3] == "val"),
                "train_cases": sum(u[4] for u in used.values() if u[3] == "train"),
                "val_cases": sum(u[4] for u in used.values() if u[3] == "val"),
                "hash": P.studies_hash((u[0], u[1]) for u in used.values()),
                "lacks": P.lacks(u[2] for u in used.values()), "draws": 0})
            skipped += list(skip.values())
        skipped += [d for d in loaded.skipped if not any(d["study"] == s["study"] for s in skipped)]
        if not train_cases:
            n_skip = len(skipped)
            raise LegcompInputError(f"no usable training study: {n_skip} skipped as unreadable" if n_skip
                                    else "no training cases (labelled studies) found",
                                    ", ".join(str(s.path) for s in sources) or data_dir)
        if is_main and valset_cases:  # a --val study that is also a training study scores too well
            train_content = {u[1]: u[0] for rep in gathered for r in rep for u in r["used"].values() if u[3] == "train"}
            both = sorted({train_content[c] for c in valset_content if c in train_content})
            if both:
                log.warning("%s: %d --val studies are also training studies (same files): %s", stem, len(both),
                            ", ".join(both[:5]) + (" ..." if len(both) > 5 else ""))
        if is_main and cases is None:
            log.info("%s: %d studies ready in %.1f s (%d from the cache, %d read, %d skipped)%s", stem,
                     len(loaded.studies), loaded.seconds, loaded.hits, loaded.built, len(skipped),
                     f"; cache {cache_obj.root}" if cache_obj else "")
            for info in source_info:
                log.info("%s: source %s weight %g (%.0f %%): %d studies, %d train / %d val studies, %d train cases%s",
                         stem, info["path"], info["weight"], 100 * info["share"], info["studies"],
                         info["train_studies"], info["val_studies"], info["train_cases"],
                         f", {info['skipped']} skipped" if info["skipped"] else "")
            for info in valset_info:
                log.info("%s: --val %s: %d studies, %d cases%s", stem, info["path"], info["used"], info["cases"],
                         f", {info['skipped']} skipped" if info["skipped"] else "")
        if is_main and val_sets and not valset_cases:
            keep_was, keep = keep, ("best-fold" if val_cases else "last")
            log.warning("%s: no usable --val study: keeping %s instead of %s", stem, keep, keep_was)
        if is_main and keep == "best-fold" and not val_cases:
            keep = "last"
            log.warning("%s: no usable k-fold validation study: keeping the last epoch's weights", stem)
        in_channels = int(train_cases[0]["image"].shape[0])
        patch_req = tuple(patch) if patch else DEFAULT_PATCH[stage]
        shapes = [c["image"].shape[1:] for c in train_cases]
        patch_sz = D.fit_patch(patch_req, shapes, divisor)
        if distributed:  # all ranks must agree on the patch size
            import torch.distributed as dist

            t = torch.tensor(patch_sz, dtype=torch.int64, device=dev if dev.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            patch_sz = tuple(int(v) for v in t.tolist())

        data_device = dev if dev.type == "cuda" else None
        set_track_meta(False)
        det, rnd = D.build_transforms(stage, n_classes, patch_sz, device=data_device, augment=augment)
        from monai.transforms import Compose

        # cached arrays are read-only memory maps: the data set's tensors get their own copy (as without a cache)
        ds = CacheDataset([{"image": _writable(c["image"]), "label": _writable(c["label"]),
                            "classes": np.asarray(c.get("classes", np.ones(n_classes)), np.float32)}
                           for c in train_cases],
                          transform=Compose(list(det.transforms) + list(rnd.transforms)), cache_rate=1.0,
                          num_workers=None if data_device is None else 0, progress=False,
                          copy_cache=False)
        read_s = time.perf_counter() - t_start
        gen = torch.Generator().manual_seed(seed + 7919 * rank)
        sampler = D.source_sampler(case_src, [s.weight for s in sources] or [1.0], iters_per_epoch * batch, gen)
        if data_device is not None:  # GPU-resident data: a background thread prepares the next batch
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest 3D kernels
            loader = ThreadDataLoader(ds, batch_size=batch, sampler=sampler, num_workers=0, buffer_size=2)
        else:
            loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=int(workers),
                                persistent_workers=int(workers) > 0)

        # ---- model, optimiser
        _seed_all(seed)
        model = build_network(cfg, in_channels, n_classes).to(dev)
        if distributed and dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = PartialLabelLoss(loss)

        # ---- resume
        st: dict[str, Any] = {"best": -1.0, "best_epoch": -1, "best_dsc": {}, "since_best": 0, "rows": [],
                              "elapsed_s": 0.0, "best_valset": -1.0, "best_valset_epoch": -1, "best_valset_dsc": {},
                              "steps_total": 0, "train_s": 0.0, "read_s": 0.0, "draws": [0] * max(1, len(sources)),
                              "kept_epoch": -1, "init": None}
        start_epoch = 0

        def elapsed() -> float:
            return st["elapsed_s"] + time.perf_counter() - t_start

        def lr_factor(ep: int) -> float:
            prog = ep / max(1, epochs)
            if time_limit_min:
                prog = max(prog, elapsed() / (60.0 * time_limit_min))
            return max(0.0, 1.0 - min(prog, 1.0)) ** 0.9
        run_id = {"stage": stage, "region": region, "folds": folds, "fold": fold, "seed": seed,
                  "config": cfg, "in_channels": in_channels, "normalisation": normalisation}
        if init_weights and not (resume and paths["checkpoint"].is_file()):
            from legcomp.models import bundled_weights, load_weights

            if str(init_weights) == "bundled":
                init_weights = bundled_weights(region, stage)
            init_model, init_meta = load_weights(init_weights, region=region, stage=stage)
            if resolve_config(init_meta["config"]) != cfg or int(init_meta["in_channels"]) != in_channels:
                raise LegcompInputError("initial weights have another network config or input channels", init_weights)
            model.load_state_dict(init_model.state_dict())
            st["init"] = {"file": str(Path(init_weights).resolve()), "sha256_16": P.sha256_16(init_weights)}
            if is_main:
                log.info("%s: initialised from %s", stem, init_weights)
                init_norm = prep.normalisation_of(init_meta)["method"]
                if init_norm != normalisation:
                    log.info("the initial weights were trained with the %s normalisation; fine-tuning with %s",
                             init_norm, normalisation)
        if resume and paths["checkpoint"].is_file():
            ck = torch.load(paths["checkpoint"], map_location="cpu", weights_only=True)
            saved_run = {"normalisation": "in_phase_percentile", **json.loads(ck["run_json"])}  # older checkpoints
            if saved_run != json.loads(json.dumps(run_id)):
                raise LegcompInputError("checkpoint belongs to another run (stage/region/fold/seed/config/"
                                        "normalisation); use another --out or --no-resume", paths["checkpoint"])
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            saved = json.loads(ck["state_json"])
            st.update({k: v for k, v in saved.items() if k != "epoch"})
            if len(st["draws"]) != max(1, len(sources)):
                st["draws"] = [0] * max(1, len(sources))
            start_epoch = saved["epoch"] + 1
            _set_rng_state(ck["rng"])
            if is_main:
                log.info("%s: resumed from %s at epoch %d", stem, paths["checkpoint"], start_epoch + 1)
        st["read_s"] = float(st["read_s"]) + read_s
        rows = st["rows"]
        if is_main and start_epoch > 0 and candidate[keep].is_file():  # resumed, maybe with another --keep
            _copy_atomic(candidate[keep], paths["weights"])
            prov_keep = P.read_provenance(candidate[keep])
            if prov_keep.get("format") == P.FORMAT:
                P.write_provenance(paths["weights"], {**prov_keep, "keep": keep})
                st["kept_epoch"] = prov_keep["weights"].get("epoch", st["kept_epoch"])
        if is_main and paths["valset_cases"].is_file():  # drop per-case rows of epochs not in the checkpoint
            with open(paths["valset_cases"], newline="") as fh:
                old = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= start_epoch]
            if old:
                _write_csv(old, paths["valset_cases"])
            else:
                paths["valset_cases"].unlink()
        net = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

        meta_common = dict(patch_size=list(patch_sz), working_spacing=list(ws), with_stage1=with_stage1,
                           normalisation=prep.normalisation_spec(normalisation), training={
                               "epochs": epochs, "iters_per_epoch": iters_per_epoch, "batch": batch, "lr": lr,
                               "loss": loss, "seed": seed, "folds": folds, "fold": fold, "world_size": world,
                               "n_train_cases": len(train_cases) * (world if distributed else 1),
                               "split": split_info, "keep": keep})
        commit, dirty = P.git_state() if is_main else (None, None)
        trained_on = ("pre-built cases" if cases is not None else "; ".join(
            f"{i['path']} ({i['used']} studies" + (f", weight {i['weight']:g}" if len(sources) > 1 else "") + ")"
            for i in source_info))

        def provenance(kind: str, meta: dict, epochs_run: int) -> dict:
            return {
                "format": P.FORMAT, "format_version": P.FORMAT_VERSION, "trained_on": trained_on,
                "command": command, "legcomp_version": __version__, "git_commit": commit, "git_dirty": dirty,
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "region": region, "stage": stage,
                "weights": {"selection": kind, "epoch": meta["epoch"], "val_mean_dsc": meta["val_mean_dsc"],
                            "valset_mean_dsc": meta["valset_mean_dsc"]},
                "keep": keep, "kept_as": paths["weights"].name,
                "sources": source_info, "val_sets": valset_info, "skipped": skipped, "split": split_info,
                "epochs": {"planned": epochs, "run": epochs_run}, "steps": st["steps_total"],
                "seconds": {"total": round(elapsed(), 1), "training": round(st["train_s"], 1),
                            "reading_data": round(st["read_s"], 1)},
                "device": str(dev), "world_size": world, "amp": use_amp,
                "network": {"config": cfg, "in_channels": in_channels, "n_classes": n_classes,
                            "params": count_parameters(model), "patch_size": list(patch_sz)},
                "training": {"iters_per_epoch": iters_per_epoch, "batch": batch, "lr": lr,
                             "weight_decay": weight_decay, "loss": loss, "seed": seed, "folds": folds, "fold": fold,
                             "augment": augment, "normalisation": normalisation, "working_spacing": list(ws),
                             "with_stage1": with_stage1, "patience": patience, "val_interval": val_interval,
                             "time_limit_min": time_limit_min, "max_cases": max_cases},
                "init_weights": st["init"], "cache": str(cache_obj.root) if cache_obj else None,
            }

        saved_meta: dict[str, dict] = {}

        def save_candidate(kind: str, epoch: int, fold_dsc: dict, fold_mean, vs_dsc: dict, vs_mean) -> None:
            meta = {"epoch": epoch, "val_dsc": fold_dsc,
                    "val_mean_dsc": None if fold_mean is None else round(float(fold_mean), 4),
                    "valset_dsc": vs_dsc, "valset_mean_dsc": None if vs_mean is None else round(float(vs_mean), 4)}
            save_weights(candidate[kind], model, config=cfg, region=region, stage=stage, n_classes=n_classes,
                         in_channels=in_channels, selection=kind, **meta, **meta_common)
            saved_meta[kind] = meta
            P.write_provenance(candidate[kind], provenance(kind, meta, epoch))
            if kind == keep:
                _copy_atomic(candidate[kind], paths["weights"])
                st["kept_epoch"] = epoch
                P.write_provenance(paths["weights"], provenance(kind, meta, epoch))

        # ---- epochs
        epoch = start_epoch - 1
        stop_reason = "epochs"
        t_train = 0.0
        t_wait = 0.0
        n_steps = 0
        first_step_s = None
        epoch_s: list[float] = []
        monitor = "valset" if keep == "best-val" else ("fold" if has_fold_val else None)
        for epoch in range(start_epoch, epochs):
            t_ep = time.perf_counter()
            wait = 0.0
            rnd.set_random_state(seed=(seed * 1000003 + epoch * 9973 + rank) % 2**31)
            gen.manual_seed(seed + 7919 * rank + 104729 * epoch)
            factor = torch.tensor([lr_factor(epoch)])
            if distributed:  # every rank must use rank 0's learning rate
                import torch.distributed as dist

                f = factor.to(dev) if dev.type == "cuda" else factor
                dist.broadcast(f, src=0)
                factor = f.cpu()
            for group in opt.param_groups:
                group["lr"] = lr * float(factor[0])
            net.train()
            losses = []
            bar = tqdm(loader, total=len(loader), desc=f"{stem} epoch {epoch + 1}/{epochs}",
                       disable=not (progress and is_main), leave=False)
            t_fetch = time.perf_counter()
            for item in bar:
                wait += time.perf_counter() - t_fetch
                x = item["image"].to(dev, non_blocking=True)
                y = item["label"].to(dev, non_blocking=True)
                cls = (torch.as_tensor(item["classes"]).to(dev, non_blocking=True) if "classes" in item
                       else all_classes(x.shape[0], n_classes, dev))
                opt.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = net(x)
                lval = loss_fn(logits.float(), y.long(), cls)
                lval.backward()
                opt.step()
                losses.append(float(lval.detach()))
                n_steps += 1
                st["steps_total"] += 1
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_start
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                t_fetch = time.perf_counter()
            bar.close()
            t_train += time.perf_counter() - t_ep
            st["train_s"] = float(st["train_s"]) + time.perf_counter() - t_ep
            t_wait += wait
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                                   "train_loss": float(np.mean(losses)), "val_mean_dsc": ""}
            last = epoch == epochs - 1
            over_time = bool(time_limit_min) and elapsed() >= 60.0 * time_limit_min
            stop = torch.zeros(1)
            if is_main:
                do_val = (epoch + 1) % max(1, val_interval) == 0 or last or over_time
                fold_dsc, fold_mean, vs_dsc, vs_mean = {}, None, {}, None
                if val_cases and do_val:
                    fold_dsc, fold_mean = _mean_dsc(validate(model, val_cases, n_classes, patch_sz, divisor, dev,
                                                             use_amp), names)
                    row["val_mean_dsc"] = round(fold_mean, 4)
                    row.update({f"dsc_{k}": ("" if v is None else v) for k, v in fold_dsc.items()})
                if valset_cases and do_val:
                    vrows = validate(model, valset_cases, n_classes, patch_sz, divisor, dev, use_amp)
                    vs_dsc, vs_mean = _mean_dsc(vrows, names)
                    row["valset_mean_dsc"] = round(vs_mean, 4)
                    row.update({f"valset_dsc_{k}": ("" if v is None else v) for k, v in vs_dsc.items()})
                    if len(val_sets) > 1:
                        for k in range(len(val_sets)):
                            sel = [i for i, c in enumerate(valset_cases) if c["set"] == k]
                            row[f"valset{k + 1}_mean_dsc"] = round(_mean_dsc(vrows[sel], names)[1], 4) if sel else ""
                    _append_case_rows(paths["valset_cases"], epoch + 1, valset_cases, vrows, names, valset_info)
                row["time_s"] = round(time.perf_counter() - t_ep, 2)
                row["data_s"] = round(wait, 2)
                # candidates: the last epoch, the best k-fold validation, the best --val score
                save_candidate("last", epoch + 1, fold_dsc, fold_mean, vs_dsc, vs_mean)
                improved = {"fold": False, "valset": False}
                if fold_mean is not None and fold_mean > st["best"]:
                    st.update(best=fold_mean, best_epoch=epoch + 1, best_dsc=fold_dsc)
                    improved["fold"] = True
                    save_candidate("best-fold", epoch + 1, fold_dsc, fold_mean, vs_dsc, vs_mean)
                if vs_mean is not None and vs_mean > st["best_valset"]:
                    st.update(best_valset=vs_mean, best_valset_epoch=epoch + 1, best_valset_dsc=vs_dsc)
                    improved["valset"] = True
                    save_candidate("best-val", epoch + 1, fold_dsc, fold_mean, vs_dsc, vs_mean)
                scored = {"fold": fold_mean is not None, "valset": vs_mean is not None}
                if monitor and scored[monitor]:
                    if improved[monitor]:
                        st["since_best"] = 0
                    else:
                        st["since_best"] += 1 * max(1, val_interval)
                    if patience and st["since_best"] >= patience:
                        stop[0] = 1
                        stop_reason = "early stopping"
                rows.append(row)
                _write_csv(rows, paths["metrics"])
                if over_time:
                    stop[0] = 1
                    stop_reason = "time limit"
                state = {**st, "epoch": epoch, "elapsed_s": elapsed(), "rows": rows}
                tmp = paths["checkpoint"].with_name(paths["checkpoint"].name + ".tmp")
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "rng": _rng_state(), "state_json": json.dumps(state),
                            "run_json": json.dumps(run_id)}, tmp)
                tmp.replace(paths["checkpoint"])
                # one plain line per epoch
                epoch_s.append(time.perf_counter() - t_ep)
                left = (epochs - epoch - 1) * float(np.mean(epoch_s))
                if time_limit_min:
                    left = min(left, max(0.0, 60.0 * time_limit_min - elapsed()))
                if stop[0]:
                    left = 0.0
                msg = (f"{stem} epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} lr {row['lr']:.3g}")
                if fold_mean is not None:
                    msg += f" val DSC {fold_mean:.4f} (best {st['best']:.4f} @ {st['best_epoch']})"
                if vs_mean is not None:
                    msg += (f" --val DSC {vs_mean:.4f} (best {st['best_valset']:.4f} @ "
                            f"{st['best_valset_epoch']})")
                msg += f" {row['time_s']:.1f} s (data {wait:.1f} s) left {_hms(left)}"
                log.info(msg)
            if distributed:
                import torch.distributed as dist

                s = stop.to(dev) if dev.type == "cuda" else stop
                dist.broadcast(s, src=0)
                stop = s.cpu()
            if bool(stop[0]):
                break
        if start_epoch >= epochs:
            stop_reason = "already complete"
        draws = torch.tensor(sampler.counts, dtype=torch.int64)
        if distributed:
            import torch.distributed as dist

            d = draws.to(dev) if dev.type == "cuda" else draws
            dist.all_reduce(d)
            draws = d.cpu()
        st["draws"] = [int(a) + int(b) for a, b in zip(st["draws"], draws.tolist())]
        for info, n in zip(source_info, st["draws"]):
            info["draws"] = n
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        summary: dict[str, Any] = {
            "stage": stage, "region": region, "config": cfg["name"], "params": count_parameters(model),
            "fold": fold, "folds": folds, "epochs_run": epoch + 1, "start_epoch": start_epoch,
            "stop_reason": stop_reason, "best_epoch": st["best_epoch"],
            "best_val_mean_dsc": st["best"] if st["best"] >= 0 else None, "best_val_dsc": st["best_dsc"],
            "best_valset_epoch": st["best_valset_epoch"],
            "best_valset_mean_dsc": st["best_valset"] if st["best_valset"] >= 0 else None,
            "best_valset_dsc": st["best_valset_dsc"], "keep": keep, "kept_epoch": st["kept_epoch"],
            "patch": list(patch_sz), "batch": batch, "world_size": world, "rank": rank,
            "device": str(dev), "amp": use_amp, "n_train_cases": len(train_cases), "n_val_cases": len(val_cases),
            "n_valset_cases": len(valset_cases), "steps": n_steps, "steps_total": st["steps_total"],
            "train_time_s": round(t_train, 2), "data_wait_s": round(t_wait, 2), "read_time_s": round(read_s, 2),
            "first_step_s": None if first_step_s is None else round(first_step_s, 3),
            "s_per_step": round(t_train / n_steps, 4) if n_steps else None,
            "steps_per_min": round(60.0 * n_steps / t_train, 2) if n_steps and t_train > 0 else None,
            "total_time_s": round(time.perf_counter() - t_start, 2), "param_checksum": checksum,
            "sources": source_info, "val_sets": valset_info, "skipped": skipped, "split": split_info,
            "cache": ({"dir": str(cache_obj.root), "hits": loaded.hits, "built": loaded.built,
                       "rebuilt": cache_obj.rebuilt} if cache_obj else None),
            "paths": {k: str(v) for k, v in paths.items() if k in ("weights", "checkpoint", "metrics", "curve",
                                                                    "summary", "log", "last")
                      or (k == "best_fold" and has_fold_val) or (k in ("best_val", "valset_cases") and val_sets)},
        }
        if is_main:
            if rows:
                _write_curve(rows, paths["curve"])
            # final provenance (totals of the whole run) beside every weights file this run wrote
            for kind, meta in saved_meta.items():
                P.write_provenance(candidate[kind], provenance(kind, meta, epoch + 1))
                if kind == keep:
                    P.write_provenance(paths["weights"], provenance(kind, meta, epoch + 1))
            paths["summary"].write_text(json.dumps(summary, indent=2))
            log.info("%s: stopped (%s) after epoch %d; this run: %d steps, %.1f s training (%.1f s of it waiting for "
                     "batches), %.1f s reading data; weights %s = %s (epoch %s)", stem, stop_reason, epoch + 1,
                     n_steps, t_train, t_wait, read_s, paths["weights"], keep, st["kept_epoch"])
        if distributed:
            import torch.distributed as dist

            dist.barrier()
        return summary
    finally:
        set_track_meta(prev_meta)
        tlog = logging.getLogger("legcomp.training")
        for h in handlers:
            tlog.removeHandler(h)
            h.close()
        tlog.setLevel(old_level)
        if own_pg:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _append_case_rows(path: Path, epoch: int, cases: Sequence[dict], dsc_rows: np.ndarray, names,
                      sets: Sequence[dict]) -> None:
    """Append the per-case DSC of one validation of the ``val_dirs`` studies to ``path`` (CSV)."""
    cols = ["epoch", "set", "study", "case", "mean_dsc"] + [f"dsc_{lab.name}" for lab in names]
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        if new:
            w.writeheader()
        for c, r in zip(cases, dsc_rows):
            fin = r[np.isfinite(r)]
            w.writerow({"epoch": epoch, "set": sets[c["set"]]["path"], "study": c["study"], "case": c["name"],
                        "mean_dsc": round(float(fin.mean()), 4) if fin.size else "",
                        **{f"dsc_{lab.name}": ("" if not np.isfinite(v) else round(float(v), 4))
                           for lab, v in zip(names, r)}})


def _track_meta_state() -> bool:
    from monai.data import get_track_meta

    return bool(get_track_meta())
