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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np
import torch

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.models import build_network, count_parameters, network_divisor, resolve_config, save_weights
from legcomp.preprocessing import inputs as prep
from legcomp.training import data as D

if TYPE_CHECKING:
    from legcomp.training.cache import CaseCache
    from legcomp.training.losses import PartialLabelLoss

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
    case does not label it (its ``classes``); :data:`legcomp.anatomy.IGNORE` and
    :data:`legcomp.anatomy.UNNAMED_MUSCLE` voxels are left out.
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
            keep = (ref != anatomy.IGNORE) & (ref != anatomy.UNNAMED_MUSCLE)
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
    opts = _check_options(_Options(
        data_dir=data_dir, stage=stage, region=region, folds=folds, fold=fold, epochs=epochs,
        iters_per_epoch=iters_per_epoch, patch=patch, batch=batch, lr=lr, weight_decay=weight_decay, loss=loss,
        seed=seed, amp=amp, resume=resume, patience=patience, val_interval=val_interval, max_cases=max_cases,
        workers=workers, with_stage1=with_stage1, augment=augment, time_limit_min=time_limit_min,
        progress=progress, cases=cases, init_weights=init_weights, normalisation=normalisation, cache=cache,
        keep=keep, command=command), config, val_dirs)
    env = _start_process(opts, device, out)
    opts.ws = tuple(working_spacing) if working_spacing is not None else (None, None, None)
    handlers, old_level = _attach_logging(env.paths["log"] if env.is_main else None)
    prev_meta = _track_meta_state()
    try:
        return _train_and_save(opts, env)
    finally:
        _clean_up(env, prev_meta, handlers, old_level)


# --------------------------------------------------------------------------- train: options and process

@dataclass
class _Options:
    """:func:`train`'s arguments, checked (:func:`_check_options`), and what follows from them.

    ``keep`` is final after :func:`_fall_back_keep`; ``ws`` (working voxel size, mm, x, y, z; None = native)
    is set once the process is set up.
    """

    data_dir: Any
    stage: int
    region: str
    folds: int
    fold: int
    epochs: int
    iters_per_epoch: int
    patch: Sequence[int] | None
    batch: int
    lr: float
    weight_decay: float
    loss: str
    seed: int
    amp: bool
    resume: bool
    patience: int
    val_interval: int
    max_cases: int | None
    workers: int
    with_stage1: bool
    augment: bool
    time_limit_min: float | None
    progress: bool
    cases: tuple[list[dict], list[dict]] | None
    init_weights: str | Path | None
    normalisation: str
    cache: str | Path | None
    keep: str
    command: str | None
    # derived
    cfg: dict[str, Any] = field(default_factory=dict)
    divisor: tuple[int, int, int] = (1, 1, 1)
    n_classes: int = 0
    names: tuple[anatomy.Label, ...] = ()
    sources: list[D.Source] = field(default_factory=list)
    val_sets: list[Path] = field(default_factory=list)
    has_fold_val: bool = False
    ws: tuple[float | None, ...] = (None, None, None)


def _check_options(o: _Options, config: str | dict, val_dirs: Sequence[str | Path] | None) -> _Options:
    """Check and normalise ``o`` in place (LegcompInputError on a bad value), fill its derived fields."""
    o.region = anatomy.check_region(o.region)
    o.stage = int(o.stage)
    if o.stage not in (1, 2):
        raise LegcompInputError(f"unknown stage {o.stage!r}; expected 1 or 2")
    if o.loss not in ("dicece", "dicefocal"):
        raise LegcompInputError(f"unknown loss {o.loss!r}; expected dicece or dicefocal")
    if o.keep not in KEEPS:
        raise LegcompInputError(f"unknown keep {o.keep!r}; expected one of {', '.join(KEEPS)}")
    o.with_stage1 = bool(o.with_stage1 and o.stage == 2)
    o.normalisation = prep.check_normalisation(o.normalisation)
    o.cfg = resolve_config(config)
    o.divisor = network_divisor(o.cfg)
    o.n_classes = anatomy.n_classes(o.stage, o.region)
    o.names = anatomy.stage_labels(o.stage, o.region)
    o.sources = D.parse_sources(o.data_dir) if o.cases is None else []
    o.val_sets = [Path(v) for v in (val_dirs or [])]
    o.has_fold_val = (o.folds > 1) if o.cases is None else bool(o.cases[1])
    o.keep = _resolve_keep(o.keep, o.val_sets, o.has_fold_val)
    if o.command is None:
        import shlex
        import sys

        o.command = shlex.join(sys.argv)
    return o


def _resolve_keep(keep: str, val_sets: Sequence[Path], has_fold_val: bool) -> str:
    """``keep`` with ``auto`` resolved (:data:`KEEPS`); LegcompInputError when its candidate cannot exist."""
    if keep == "auto":
        keep = "best-val" if val_sets else ("best-fold" if has_fold_val else "last")
    elif keep == "best-val" and not val_sets:
        raise LegcompInputError("keep best-val needs validation studies (--val)")
    elif keep == "best-fold" and not has_fold_val:
        raise LegcompInputError("keep best-fold needs a k-fold validation set (--folds > 1)")
    return keep


@dataclass
class _Env:
    """This process: rank among ``world`` processes, device, output files and start time."""

    rank: int
    world: int
    dev: torch.device
    distributed: bool
    own_pg: bool  # the process group was created here (destroyed at the end)
    is_main: bool
    use_amp: bool
    stem: str  # "<region>_stage<k>"
    paths: dict[str, Path]
    candidate: dict[str, Path]  # weights file per candidate kind ("last", "best-fold", "best-val")
    t_start: float  # time.perf_counter() at the start (s)


def _start_process(o: _Options, device: str, out: str | Path) -> _Env:
    """Rank and device (joining the torchrun process group when distributed); output paths; ``out`` made."""
    rank, world, local_rank = dist_env()
    dev = resolve_device(device, local_rank)
    distributed = world > 1
    own_pg = _join_process_group(dev) if distributed else False
    is_main = rank == 0
    use_amp = bool(o.amp and dev.type == "cuda")
    out = Path(out)
    stem = f"{o.region}_stage{o.stage}"
    paths = {"weights": out / f"{stem}.pt", "last": out / f"{stem}.last.pt",
             "best_fold": out / f"{stem}.best_fold.pt", "best_val": out / f"{stem}.best_val.pt",
             "checkpoint": out / f"{stem}.checkpoint.pt", "metrics": out / f"{stem}.metrics.csv",
             "valset_cases": out / f"{stem}.valset_cases.csv", "curve": out / f"{stem}.curve.png",
             "summary": out / f"{stem}.summary.json", "log": out / "train.log"}
    candidate = {"last": paths["last"], "best-fold": paths["best_fold"], "best-val": paths["best_val"]}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    return _Env(rank=rank, world=world, dev=dev, distributed=distributed, own_pg=own_pg, is_main=is_main,
                use_amp=use_amp, stem=stem, paths=paths, candidate=candidate, t_start=time.perf_counter())


def _join_process_group(dev: torch.device) -> bool:
    """Initialise torch.distributed (NCCL on CUDA, else Gloo) unless done; True when it was done here."""
    import torch.distributed as dist

    own_pg = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        own_pg = True
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return own_pg


def _clean_up(env: _Env, prev_meta: bool, handlers: list[logging.Handler], old_level: int) -> None:
    """Undo :func:`train`'s global changes: MONAI meta tracking, log handlers and level, own process group."""
    from monai.data import set_track_meta

    set_track_meta(prev_meta)
    tlog = logging.getLogger("legcomp.training")
    for h in handlers:
        tlog.removeHandler(h)
        h.close()
    tlog.setLevel(old_level)
    if env.own_pg:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train_and_save(o: _Options, env: _Env) -> dict[str, Any]:
    """The body of :func:`train` once the process is set up: data, network, epochs, final files; the summary."""
    from legcomp import __version__

    if env.is_main:
        log.info("%s: legcomp %s train %s", env.stem, __version__, o.command)
    data = _load_data(o, env)
    run = _build_run(o, env, data)
    _restore(run)
    _run_epochs(run)
    return _finish(run)


# --------------------------------------------------------------------------- train: data

@dataclass
class _Data:
    """The studies of one run: training / k-fold validation / ``val_dirs`` cases and what is known of them."""

    cache_obj: CaseCache | None = None
    loaded: D.LoadedStudies = field(default_factory=D.LoadedStudies)
    split_info: dict[str, Any] = field(default_factory=dict)
    train_cases: list[dict] = field(default_factory=list)  # this rank's share
    val_cases: list[dict] = field(default_factory=list)  # rank 0 only
    case_src: list[int] = field(default_factory=list)  # source index of each training case
    reports: list[dict] = field(default_factory=list)  # per source: this rank's studies used and skipped
    gathered: list[list[dict]] = field(default_factory=list)  # every rank's reports
    valset_cases: list[dict] = field(default_factory=list)  # rank 0 only; "set" (index), "study" added
    valset_info: list[dict] = field(default_factory=list)
    source_info: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _load_data(o: _Options, env: _Env) -> _Data:
    """Load (or take) the training and validation cases, merge every rank's view, log it; settle ``o.keep``."""
    from legcomp.training.cache import CaseCache

    cache_obj = CaseCache(o.cache) if (o.cache and o.cases is None) else None
    load_kw = dict(spacing=o.ws, with_stage1=o.with_stage1, normalisation=o.normalisation, cache=cache_obj,
                   progress=o.progress and env.is_main)
    data = _Data(cache_obj=cache_obj)
    if o.cases is None:
        _load_sources(o, env, data, load_kw)
    else:
        _take_cases(o, env, data)
    valset_content = _load_val_sets(o, data, load_kw) if env.is_main else set()
    _merge_reports(o, env, data)
    if not data.train_cases:
        n_skip = len(data.skipped)
        raise LegcompInputError(f"no usable training study: {n_skip} skipped as unreadable" if n_skip
                                else "no training cases (labelled studies) found",
                                ", ".join(str(s.path) for s in o.sources) or o.data_dir)
    if env.is_main and data.valset_cases:  # a --val study that is also a training study scores too well
        _warn_val_in_training(env, data, valset_content)
    if env.is_main and o.cases is None:
        _log_data(env, data)
    _fall_back_keep(o, env, data)
    return data


def _load_sources(o: _Options, env: _Env, data: _Data, load_kw: dict[str, Any]) -> None:
    """Split each source's studies (k-fold per source) and load this rank's training share (validation:
    rank 0) into ``data``; one report per source in ``data.reports``."""
    several = len(o.sources) > 1
    data.split_info = {"method": "k-fold per source" if several else "k-fold", "train": [], "val": [],
                       "per_source": []}
    for si, src in enumerate(o.sources):
        study_paths = D.discover(src.path, o.region, o.max_cases)
        snames = [p.name for p in study_paths]
        tr_idx, va_idx = D.kfold_split(snames, o.folds, o.fold, o.seed, allow_fewer=several)
        _record_split(data.split_info, src, snames, tr_idx, va_idx, len(o.sources) == 1)
        my_idx = tr_idx[env.rank::env.world] if env.distributed and len(tr_idx) >= env.world else tr_idx
        tr = D.load_studies([study_paths[i] for i in my_idx], o.stage, o.region, **load_kw)
        va = (D.load_studies([study_paths[i] for i in va_idx], o.stage, o.region, **load_kw) if env.is_main
              else D.LoadedStudies())
        data.loaded.extend(tr)
        data.loaded.extend(va)
        for c in tr.cases:
            data.train_cases.append(c)
            data.case_src.append(si)
        data.val_cases += va.cases
        data.reports.append({"studies": len(study_paths), "train_studies": len(tr_idx),
                             "val_studies": len(va_idx),
                             "used": {str(sc.path): [sc.path.name, sc.content, sc.label_record,
                                                     "train" if k < len(tr.studies) else "val", len(sc.cases)]
                                      for k, sc in enumerate(tr.studies + va.studies)},
                             "skipped": tr.skipped + va.skipped})


def _record_split(split_info: dict[str, Any], src: D.Source, snames: list[str], tr_idx: Sequence[int],
                  va_idx: Sequence[int], single: bool) -> None:
    """Add one source's k-fold split (study names; prefixed by the source folder unless ``single``)."""
    label = (lambda n: n) if single else (lambda n, _s=src: f"{_s.path.name}/{n}")
    split_info["train"] += [label(snames[i]) for i in tr_idx]
    split_info["val"] += [label(snames[i]) for i in va_idx]
    split_info["per_source"].append({"source": str(src.path.resolve()),
                                     "train": [snames[i] for i in tr_idx],
                                     "val": [snames[i] for i in va_idx]})


def _take_cases(o: _Options, env: _Env, data: _Data) -> None:
    """Use the pre-built ``o.cases`` (training cases sharded across ranks; validation cases on rank 0)."""
    data.train_cases, data.val_cases = list(o.cases[0]), list(o.cases[1]) if env.is_main else []
    if env.distributed and len(data.train_cases) >= env.world:
        data.train_cases = data.train_cases[env.rank::env.world]
    data.case_src = [0] * len(data.train_cases)


def _load_val_sets(o: _Options, data: _Data, load_kw: dict[str, Any]) -> set[str]:
    """Load every ``val_dirs`` folder's studies (rank 0) into ``data``; their content hashes."""
    from legcomp.training import provenance as P

    valset_content: set[str] = set()
    for k, vdir in enumerate(o.val_sets):
        got = D.load_studies(D.discover(vdir, o.region), o.stage, o.region, **load_kw)
        for d in got.skipped:
            d["val_set"] = str(vdir.resolve())
        data.loaded.extend(got)
        for sc in got.studies:
            data.valset_cases += [{**c, "set": k, "study": sc.path.name} for c in sc.cases]
            valset_content.add(sc.content)
        data.valset_info.append({"path": str(vdir.resolve()), "studies": len(got.studies) + len(got.skipped),
                                 "used": len(got.studies), "skipped": len(got.skipped),
                                 "cases": sum(len(sc.cases) for sc in got.studies),
                                 "hash": P.studies_hash((sc.path.name, sc.content) for sc in got.studies),
                                 "lacks": P.lacks(sc.label_record for sc in got.studies)})
    return valset_content


def _merge_reports(o: _Options, env: _Env, data: _Data) -> None:
    """Gather every rank's source reports (on all ranks) into ``data.source_info`` and ``data.skipped``."""
    if env.distributed and o.cases is None:
        import torch.distributed as dist

        gathered: list = [None] * env.world
        dist.all_gather_object(gathered, data.reports)
    else:
        gathered = [data.reports]
    data.gathered = gathered
    for si, src in enumerate(o.sources):
        info, skip = _source_info(si, src, o.sources, gathered)
        data.source_info.append(info)
        data.skipped += skip
    data.skipped += [d for d in data.loaded.skipped if not any(d["study"] == s["study"] for s in data.skipped)]


def _source_info(si: int, src: D.Source, sources: Sequence[D.Source],
                 gathered: list[list[dict]]) -> tuple[dict[str, Any], list[dict]]:
    """Source ``si``'s counts, hash and label gaps over all ranks' reports; its skipped studies."""
    from legcomp.training import provenance as P

    used: dict[str, list] = {}
    skip: dict[str, dict] = {}
    for rep in gathered:
        used.update(rep[si]["used"])
        skip.update({d["study"]: {**d, "source": str(src.path.resolve())} for d in rep[si]["skipped"]})
    rep0 = gathered[0][si]
    info = {
        "path": str(src.path.resolve()), "weight": src.weight,
        "share": round(src.weight / sum(s.weight for s in sources), 4),
        "studies": rep0["studies"], "used": len(used), "skipped": len(skip),
        "train_studies": sum(1 for u in used.values() if u[3] == "train"),
        "val_studies": sum(1 for u in used.values() if u[3] == "val"),
        "train_cases": sum(u[4] for u in used.values() if u[3] == "train"),
        "val_cases": sum(u[4] for u in used.values() if u[3] == "val"),
        "hash": P.studies_hash((u[0], u[1]) for u in used.values()),
        "lacks": P.lacks(u[2] for u in used.values()), "draws": 0}
    return info, list(skip.values())


def _warn_val_in_training(env: _Env, data: _Data, valset_content: set[str]) -> None:
    """Warn about ``val_dirs`` studies whose files are those of a training study."""
    train_content = {u[1]: u[0] for rep in data.gathered for r in rep for u in r["used"].values() if u[3] == "train"}
    both = sorted({train_content[c] for c in valset_content if c in train_content})
    if both:
        log.warning("%s: %d --val studies are also training studies (same files): %s", env.stem, len(both),
                    ", ".join(both[:5]) + (" ..." if len(both) > 5 else ""))


def _log_data(env: _Env, data: _Data) -> None:
    """Log the studies loaded: totals, then one line per source and per ``val_dirs`` folder."""
    log.info("%s: %d studies ready in %.1f s (%d from the cache, %d read, %d skipped)%s", env.stem,
             len(data.loaded.studies), data.loaded.seconds, data.loaded.hits, data.loaded.built, len(data.skipped),
             f"; cache {data.cache_obj.root}" if data.cache_obj else "")
    for info in data.source_info:
        log.info("%s: source %s weight %g (%.0f %%): %d studies, %d train / %d val studies, %d train cases%s",
                 env.stem, info["path"], info["weight"], 100 * info["share"], info["studies"],
                 info["train_studies"], info["val_studies"], info["train_cases"],
                 f", {info['skipped']} skipped" if info["skipped"] else "")
    for info in data.valset_info:
        log.info("%s: --val %s: %d studies, %d cases%s", env.stem, info["path"], info["used"], info["cases"],
                 f", {info['skipped']} skipped" if info["skipped"] else "")


def _fall_back_keep(o: _Options, env: _Env, data: _Data) -> None:
    """On rank 0, keep another candidate (``o.keep``) when the asked one's validation studies are unusable."""
    if env.is_main and o.val_sets and not data.valset_cases:
        keep_was, o.keep = o.keep, ("best-fold" if data.val_cases else "last")
        log.warning("%s: no usable --val study: keeping %s instead of %s", env.stem, o.keep, keep_was)
    if env.is_main and o.keep == "best-fold" and not data.val_cases:
        o.keep = "last"
        log.warning("%s: no usable k-fold validation study: keeping the last epoch's weights", env.stem)


# --------------------------------------------------------------------------- train: network and run state

@dataclass
class _Feed:
    """Training batches: loader, its sampler and generator, the random transforms (seeded per epoch)."""

    loader: Any
    sampler: Any
    gen: torch.Generator
    rnd: Any
    read_s: float  # seconds from the start until the data set was ready


class _Scores(NamedTuple):
    """One validation: DSC per structure and mean, k-fold (``fold_``) and ``val_dirs`` (``vs_``); None: not run."""

    fold_dsc: dict[str, float | None]
    fold_mean: float | None
    vs_dsc: dict[str, float | None]
    vs_mean: float | None


@dataclass
class _Run:
    """One training run: options, process, data, network, progress ``st`` (checkpointed) and this run's tallies."""

    o: _Options
    env: _Env
    data: _Data
    in_channels: int
    patch_sz: tuple[int, ...]  # patch size (x, y, z voxels)
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: PartialLabelLoss
    feed: _Feed
    st: dict[str, Any]
    run_id: dict[str, Any]  # what a checkpoint must match to be resumed
    net: torch.nn.Module | None = None  # ``model``, wrapped in DDP when distributed
    start_epoch: int = 0
    meta_common: dict[str, Any] = field(default_factory=dict)  # weights meta of every candidate
    commit: str | None = None
    dirty: bool | None = None
    trained_on: str = ""
    saved_meta: dict[str, dict] = field(default_factory=dict)  # per candidate kind written in this run
    # this run (not across resumes)
    epoch: int = -1  # last epoch run (0-based)
    stop_reason: str = "epochs"
    t_train: float = 0.0  # s
    t_wait: float = 0.0  # s waiting for batches
    n_steps: int = 0
    first_step_s: float | None = None
    epoch_s: list[float] = field(default_factory=list)  # rank 0: seconds per epoch
    draws_run: list[int] = field(default_factory=list)  # this run's patch draws per source, summed over ranks

    @property
    def rows(self) -> list[dict]:
        """metrics.csv rows (one per epoch, resumed runs' included)."""
        return self.st["rows"]

    def elapsed(self) -> float:
        """Seconds of training so far, summed over resumed runs."""
        return self.st["elapsed_s"] + time.perf_counter() - self.env.t_start

    def lr_factor(self, ep: int) -> float:
        """Learning-rate factor (1 - progress)^0.9 at epoch ``ep`` (progress by epochs or time used)."""
        prog = ep / max(1, self.o.epochs)
        if self.o.time_limit_min:
            prog = max(prog, self.elapsed() / (60.0 * self.o.time_limit_min))
        return max(0.0, 1.0 - min(prog, 1.0)) ** 0.9

    def provenance(self, kind: str, meta: dict, epochs_run: int) -> dict[str, Any]:
        """The provenance record of candidate ``kind`` (its ``meta``) after ``epochs_run`` epochs."""
        from legcomp import __version__
        from legcomp.training import provenance as P

        o, env, data, st = self.o, self.env, self.data, self.st
        return {
            "format": P.FORMAT, "format_version": P.FORMAT_VERSION, "trained_on": self.trained_on,
            "command": o.command, "legcomp_version": __version__, "git_commit": self.commit,
            "git_dirty": self.dirty,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "region": o.region, "stage": o.stage,
            "weights": {"selection": kind, "epoch": meta["epoch"], "val_mean_dsc": meta["val_mean_dsc"],
                        "valset_mean_dsc": meta["valset_mean_dsc"]},
            "keep": o.keep, "kept_as": env.paths["weights"].name,
            "sources": data.source_info, "val_sets": data.valset_info, "skipped": data.skipped,
            "split": data.split_info,
            "epochs": {"planned": o.epochs, "run": epochs_run}, "steps": st["steps_total"],
            "seconds": {"total": round(self.elapsed(), 1), "training": round(st["train_s"], 1),
                        "reading_data": round(st["read_s"], 1)},
            "device": str(env.dev), "world_size": env.world, "amp": env.use_amp,
            "network": {"config": o.cfg, "in_channels": self.in_channels, "n_classes": o.n_classes,
                        "params": count_parameters(self.model), "patch_size": list(self.patch_sz)},
            "training": {"iters_per_epoch": o.iters_per_epoch, "batch": o.batch, "lr": o.lr,
                         "weight_decay": o.weight_decay, "loss": o.loss, "seed": o.seed, "folds": o.folds,
                         "fold": o.fold, "augment": o.augment, "normalisation": o.normalisation,
                         "working_spacing": list(o.ws), "with_stage1": o.with_stage1, "patience": o.patience,
                         "val_interval": o.val_interval, "time_limit_min": o.time_limit_min,
                         "max_cases": o.max_cases},
            "init_weights": st["init"], "cache": str(data.cache_obj.root) if data.cache_obj else None,
        }

    def save_candidate(self, kind: str, epoch: int, sc: _Scores) -> None:
        """Write candidate ``kind`` (weights at 1-based ``epoch``, scores ``sc``) and its provenance; copy it
        to ``<stem>.pt`` when it is the kept one."""
        from legcomp.training import provenance as P

        o, env = self.o, self.env
        meta = {"epoch": epoch, "val_dsc": sc.fold_dsc,
                "val_mean_dsc": None if sc.fold_mean is None else round(float(sc.fold_mean), 4),
                "valset_dsc": sc.vs_dsc,
                "valset_mean_dsc": None if sc.vs_mean is None else round(float(sc.vs_mean), 4)}
        save_weights(env.candidate[kind], self.model, config=o.cfg, region=o.region, stage=o.stage,
                     n_classes=o.n_classes, in_channels=self.in_channels, selection=kind, **meta, **self.meta_common)
        self.saved_meta[kind] = meta
        P.write_provenance(env.candidate[kind], self.provenance(kind, meta, epoch))
        if kind == o.keep:
            _copy_atomic(env.candidate[kind], env.paths["weights"])
            self.st["kept_epoch"] = epoch
            P.write_provenance(env.paths["weights"], self.provenance(kind, meta, epoch))


def _build_run(o: _Options, env: _Env, data: _Data) -> _Run:
    """Patch size, data loader, network, optimiser and loss, in this order (the RNG order matters)."""
    in_channels = int(data.train_cases[0]["image"].shape[0])
    patch_sz = _fit_patch_size(o, env, data.train_cases)
    feed = _build_feed(o, env, data, patch_sz)
    model, opt, loss_fn = _build_model(o, env, in_channels)
    st: dict[str, Any] = {"best": -1.0, "best_epoch": -1, "best_dsc": {}, "since_best": 0, "rows": [],
                          "elapsed_s": 0.0, "best_valset": -1.0, "best_valset_epoch": -1, "best_valset_dsc": {},
                          "steps_total": 0, "train_s": 0.0, "read_s": 0.0, "draws": [0] * max(1, len(o.sources)),
                          "kept_epoch": -1, "init": None}
    run_id = {"stage": o.stage, "region": o.region, "folds": o.folds, "fold": o.fold, "seed": o.seed,
              "config": o.cfg, "in_channels": in_channels, "normalisation": o.normalisation}
    return _Run(o=o, env=env, data=data, in_channels=in_channels, patch_sz=patch_sz, model=model, opt=opt,
                loss_fn=loss_fn, feed=feed, st=st, run_id=run_id)


def _fit_patch_size(o: _Options, env: _Env, train_cases: Sequence[dict]) -> tuple[int, ...]:
    """The patch size (x, y, z voxels): asked or default, fitted to the data and divisor; ranks' maximum."""
    patch_req = tuple(o.patch) if o.patch else DEFAULT_PATCH[o.stage]
    shapes = [c["image"].shape[1:] for c in train_cases]
    patch_sz = D.fit_patch(patch_req, shapes, o.divisor)
    if env.distributed:  # all ranks must agree on the patch size
        import torch.distributed as dist

        t = torch.tensor(patch_sz, dtype=torch.int64, device=env.dev if env.dev.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        patch_sz = tuple(int(v) for v in t.tolist())
    return patch_sz


def _build_feed(o: _Options, env: _Env, data: _Data, patch_sz: tuple[int, ...]) -> _Feed:
    """Cached data set of the training cases (image (channels, x, y, z)), source-weighted sampler, loader."""
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader, set_track_meta

    data_device = env.dev if env.dev.type == "cuda" else None
    set_track_meta(False)
    det, rnd = D.build_transforms(o.stage, o.n_classes, patch_sz, device=data_device, augment=o.augment)
    from monai.transforms import Compose

    # cached arrays are read-only memory maps: the data set's tensors get their own copy (as without a cache)
    ds = CacheDataset([{"image": _writable(c["image"]), "label": _writable(c["label"]),
                        "classes": np.asarray(c.get("classes", np.ones(o.n_classes)), np.float32)}
                       for c in data.train_cases],
                      transform=Compose(list(det.transforms) + list(rnd.transforms)), cache_rate=1.0,
                      num_workers=None if data_device is None else 0, progress=False,
                      copy_cache=False)
    read_s = time.perf_counter() - env.t_start
    gen = torch.Generator().manual_seed(o.seed + 7919 * env.rank)
    sampler = D.source_sampler(data.case_src, [s.weight for s in o.sources] or [1.0], o.iters_per_epoch * o.batch,
                               gen)
    if data_device is not None:  # GPU-resident data: a background thread prepares the next batch
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest 3D kernels
        loader = ThreadDataLoader(ds, batch_size=o.batch, sampler=sampler, num_workers=0, buffer_size=2)
    else:
        loader = DataLoader(ds, batch_size=o.batch, sampler=sampler, num_workers=int(o.workers),
                            persistent_workers=int(o.workers) > 0)
    return _Feed(loader=loader, sampler=sampler, gen=gen, rnd=rnd, read_s=read_s)


def _build_model(o: _Options, env: _Env,
                 in_channels: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, PartialLabelLoss]:
    """Seed every RNG, then the network (on the device), its AdamW optimiser and the loss."""
    from legcomp.training.losses import PartialLabelLoss

    _seed_all(o.seed)
    model = build_network(o.cfg, in_channels, o.n_classes).to(env.dev)
    if env.distributed and env.dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    loss_fn = PartialLabelLoss(o.loss)
    return model, opt, loss_fn


# --------------------------------------------------------------------------- train: start / resume

def _restore(run: _Run) -> None:
    """Initial weights or the checkpoint (resume), the kept candidate and case rows brought in line with it;
    the DDP wrapper; what every candidate's meta and provenance share."""
    from legcomp.training import provenance as P

    o, env = run.o, run.env
    if o.init_weights and not (o.resume and env.paths["checkpoint"].is_file()):
        _load_init_weights(run)
    if o.resume and env.paths["checkpoint"].is_file():
        _resume_checkpoint(run)
    run.st["read_s"] = float(run.st["read_s"]) + run.feed.read_s
    if env.is_main and run.start_epoch > 0 and env.candidate[o.keep].is_file():  # resumed, maybe with another --keep
        _recopy_kept(run)
    if env.is_main and env.paths["valset_cases"].is_file():  # drop per-case rows of epochs not in the checkpoint
        _trim_case_rows(env.paths["valset_cases"], run.start_epoch)
    run.net = run.model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.net = DDP(run.model, device_ids=[env.dev.index] if env.dev.type == "cuda" else None)
    run.meta_common = _common_meta(run)
    run.commit, run.dirty = P.git_state() if env.is_main else (None, None)
    run.trained_on = ("pre-built cases" if o.cases is not None else "; ".join(
        f"{i['path']} ({i['used']} studies" + (f", weight {i['weight']:g}" if len(o.sources) > 1 else "") + ")"
        for i in run.data.source_info))


def _load_init_weights(run: _Run) -> None:
    """Load ``init_weights`` (``bundled``: the bundled file) into the model; same config and channels only."""
    from legcomp.models import bundled_weights, load_weights
    from legcomp.training import provenance as P

    o = run.o
    init_weights = o.init_weights
    if str(init_weights) == "bundled":
        init_weights = bundled_weights(o.region, o.stage)
    init_model, init_meta = load_weights(init_weights, region=o.region, stage=o.stage)
    if resolve_config(init_meta["config"]) != o.cfg or int(init_meta["in_channels"]) != run.in_channels:
        raise LegcompInputError("initial weights have another network config or input channels", init_weights)
    run.model.load_state_dict(init_model.state_dict())
    run.st["init"] = {"file": str(Path(init_weights).resolve()), "sha256_16": P.sha256_16(init_weights)}
    if run.env.is_main:
        log.info("%s: initialised from %s", run.env.stem, init_weights)
        init_norm = prep.normalisation_of(init_meta)["method"]
        if init_norm != o.normalisation:
            log.info("the initial weights were trained with the %s normalisation; fine-tuning with %s",
                     init_norm, o.normalisation)


def _resume_checkpoint(run: _Run) -> None:
    """Restore model, optimizer, progress and RNG states from the checkpoint (LegcompInputError: another run)."""
    o, env, st = run.o, run.env, run.st
    ck = torch.load(env.paths["checkpoint"], map_location="cpu", weights_only=True)
    saved_run = {"normalisation": "in_phase_percentile", **json.loads(ck["run_json"])}  # older checkpoints
    if saved_run != json.loads(json.dumps(run.run_id)):
        raise LegcompInputError("checkpoint belongs to another run (stage/region/fold/seed/config/"
                                "normalisation); use another --out or --no-resume", env.paths["checkpoint"])
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    saved = json.loads(ck["state_json"])
    st.update({k: v for k, v in saved.items() if k != "epoch"})
    if len(st["draws"]) != max(1, len(o.sources)):
        st["draws"] = [0] * max(1, len(o.sources))
    run.start_epoch = saved["epoch"] + 1
    _set_rng_state(ck["rng"])
    if env.is_main:
        log.info("%s: resumed from %s at epoch %d", env.stem, env.paths["checkpoint"], run.start_epoch + 1)


def _recopy_kept(run: _Run) -> None:
    """Copy the kept candidate (``o.keep``) to ``<stem>.pt`` with its provenance (``keep`` updated)."""
    from legcomp.training import provenance as P

    keep, env = run.o.keep, run.env
    _copy_atomic(env.candidate[keep], env.paths["weights"])
    prov_keep = P.read_provenance(env.candidate[keep])
    if prov_keep.get("format") == P.FORMAT:
        P.write_provenance(env.paths["weights"], {**prov_keep, "keep": keep})
        run.st["kept_epoch"] = prov_keep["weights"].get("epoch", run.st["kept_epoch"])


def _trim_case_rows(path: Path, start_epoch: int) -> None:
    """Keep the rows of CSV ``path`` with ``epoch`` <= ``start_epoch`` (1-based); remove it when none are left."""
    with open(path, newline="") as fh:
        old = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= start_epoch]
    if old:
        _write_csv(old, path)
    else:
        path.unlink()


def _common_meta(run: _Run) -> dict[str, Any]:
    """Weights meta shared by every candidate: patch, spacing, inputs, normalisation, training settings."""
    o, env = run.o, run.env
    return dict(patch_size=list(run.patch_sz), working_spacing=list(o.ws), with_stage1=o.with_stage1,
                normalisation=prep.normalisation_spec(o.normalisation), training={
                    "epochs": o.epochs, "iters_per_epoch": o.iters_per_epoch, "batch": o.batch, "lr": o.lr,
                    "loss": o.loss, "seed": o.seed, "folds": o.folds, "fold": o.fold, "world_size": env.world,
                    "n_train_cases": len(run.data.train_cases) * (env.world if env.distributed else 1),
                    "split": run.data.split_info, "keep": o.keep})


# --------------------------------------------------------------------------- train: epochs

def _run_epochs(run: _Run) -> None:
    """Train from ``run.start_epoch`` until ``epochs``, early stopping or the time limit (rank 0 decides)."""
    o, env = run.o, run.env
    run.epoch = run.start_epoch - 1
    monitor = "valset" if o.keep == "best-val" else ("fold" if o.has_fold_val else None)
    for epoch in range(run.start_epoch, o.epochs):
        run.epoch = epoch
        t_ep = time.perf_counter()
        _start_epoch(run, epoch)
        losses, wait = _train_steps(run, epoch)
        run.t_train += time.perf_counter() - t_ep
        run.st["train_s"] = float(run.st["train_s"]) + time.perf_counter() - t_ep
        run.t_wait += wait
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": run.opt.param_groups[0]["lr"],
                               "train_loss": float(np.mean(losses)), "val_mean_dsc": ""}
        last = epoch == o.epochs - 1
        over_time = bool(o.time_limit_min) and run.elapsed() >= 60.0 * o.time_limit_min
        stop = torch.zeros(1)
        run.draws_run = _run_draws(run)  # every rank (a collective when distributed), for the checkpoint
        if env.is_main and _end_epoch(run, epoch, row, t_ep, wait, last, over_time, monitor):
            stop[0] = 1
        if env.distributed:
            stop = _broadcast(stop, env)
        if bool(stop[0]):
            break
    if run.start_epoch >= o.epochs:
        run.stop_reason = "already complete"


def _broadcast(t: torch.Tensor, env: _Env) -> torch.Tensor:
    """Rank 0's value of CPU tensor ``t`` (through the device with NCCL), on the CPU."""
    import torch.distributed as dist

    d = t.to(env.dev) if env.dev.type == "cuda" else t
    dist.broadcast(d, src=0)
    return d.cpu()


def _start_epoch(run: _Run, epoch: int) -> None:
    """Seed the random transforms and the sampler for ``epoch`` (0-based); set rank 0's learning rate."""
    o, env = run.o, run.env
    run.feed.rnd.set_random_state(seed=(o.seed * 1000003 + epoch * 9973 + env.rank) % 2**31)
    run.feed.gen.manual_seed(o.seed + 7919 * env.rank + 104729 * epoch)
    factor = torch.tensor([run.lr_factor(epoch)])
    if env.distributed:  # every rank must use rank 0's learning rate
        factor = _broadcast(factor, env)
    for group in run.opt.param_groups:
        group["lr"] = o.lr * float(factor[0])


def _train_steps(run: _Run, epoch: int) -> tuple[list[float], float]:
    """One epoch's optimizer steps: (loss per step, seconds waiting for batches)."""
    from tqdm.auto import tqdm

    o, env = run.o, run.env
    wait = 0.0
    run.net.train()
    losses: list[float] = []
    bar = tqdm(run.feed.loader, total=len(run.feed.loader), desc=f"{env.stem} epoch {epoch + 1}/{o.epochs}",
               disable=not (o.progress and env.is_main), leave=False)
    t_fetch = time.perf_counter()
    for item in bar:
        wait += time.perf_counter() - t_fetch
        losses.append(_step(run, item))
        run.n_steps += 1
        run.st["steps_total"] += 1
        if run.first_step_s is None:
            run.first_step_s = time.perf_counter() - env.t_start
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        t_fetch = time.perf_counter()
    bar.close()
    return losses, wait


def _step(run: _Run, item: dict[str, Any]) -> float:
    """One optimizer step on a batch (image (batch, channels, x, y, z), label, classes); its loss."""
    from legcomp.training.losses import all_classes

    dev = run.env.dev
    x = item["image"].to(dev, non_blocking=True)
    y = item["label"].to(dev, non_blocking=True)
    cls = (torch.as_tensor(item["classes"]).to(dev, non_blocking=True) if "classes" in item
           else all_classes(x.shape[0], run.o.n_classes, dev))
    run.opt.zero_grad(set_to_none=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.env.use_amp):
        logits = run.net(x)
    lval = run.loss_fn(logits.float(), y.long(), cls)
    lval.backward()
    run.opt.step()
    return float(lval.detach())


def _end_epoch(run: _Run, epoch: int, row: dict[str, Any], t_ep: float, wait: float, last: bool,
               over_time: bool, monitor: str | None) -> bool:
    """Rank 0 after an epoch: validate, save candidates, metrics, checkpoint, log line; True to stop."""
    do_val = (epoch + 1) % max(1, run.o.val_interval) == 0 or last or over_time
    sc = _validate_epoch(run, epoch, row) if do_val else _Scores({}, None, {}, None)
    row["time_s"] = round(time.perf_counter() - t_ep, 2)
    row["data_s"] = round(wait, 2)
    stop = _keep_candidates(run, epoch, sc, monitor)
    run.rows.append(row)
    _write_csv(run.rows, run.env.paths["metrics"])
    if over_time:
        stop = True
        run.stop_reason = "time limit"
    _write_checkpoint(run, epoch)
    _log_epoch(run, epoch, row, sc, t_ep, wait, stop)
    return stop


def _validate_epoch(run: _Run, epoch: int, row: dict[str, Any]) -> _Scores:
    """Score the k-fold validation and ``val_dirs`` cases into ``row``; per-case rows appended to their CSV."""
    o, env, data = run.o, run.env, run.data
    fold_dsc, fold_mean, vs_dsc, vs_mean = {}, None, {}, None
    if data.val_cases:
        fold_dsc, fold_mean = _mean_dsc(validate(run.model, data.val_cases, o.n_classes, run.patch_sz, o.divisor,
                                                 env.dev, env.use_amp), o.names)
        row["val_mean_dsc"] = round(fold_mean, 4)
        row.update({f"dsc_{k}": ("" if v is None else v) for k, v in fold_dsc.items()})
    if data.valset_cases:
        vrows = validate(run.model, data.valset_cases, o.n_classes, run.patch_sz, o.divisor, env.dev, env.use_amp)
        vs_dsc, vs_mean = _mean_dsc(vrows, o.names)
        row["valset_mean_dsc"] = round(vs_mean, 4)
        row.update({f"valset_dsc_{k}": ("" if v is None else v) for k, v in vs_dsc.items()})
        if len(o.val_sets) > 1:
            for k in range(len(o.val_sets)):
                sel = [i for i, c in enumerate(data.valset_cases) if c["set"] == k]
                row[f"valset{k + 1}_mean_dsc"] = round(_mean_dsc(vrows[sel], o.names)[1], 4) if sel else ""
        _append_case_rows(env.paths["valset_cases"], epoch + 1, data.valset_cases, vrows, o.names, data.valset_info)
    return _Scores(fold_dsc, fold_mean, vs_dsc, vs_mean)


def _keep_candidates(run: _Run, epoch: int, sc: _Scores, monitor: str | None) -> bool:
    """Save the last epoch and any new best (k-fold, ``val_dirs``); True when patience has run out."""
    st = run.st
    # candidates: the last epoch, the best k-fold validation, the best --val score
    run.save_candidate("last", epoch + 1, sc)
    improved = {"fold": False, "valset": False}
    if sc.fold_mean is not None and sc.fold_mean > st["best"]:
        st.update(best=sc.fold_mean, best_epoch=epoch + 1, best_dsc=sc.fold_dsc)
        improved["fold"] = True
        run.save_candidate("best-fold", epoch + 1, sc)
    if sc.vs_mean is not None and sc.vs_mean > st["best_valset"]:
        st.update(best_valset=sc.vs_mean, best_valset_epoch=epoch + 1, best_valset_dsc=sc.vs_dsc)
        improved["valset"] = True
        run.save_candidate("best-val", epoch + 1, sc)
    scored = {"fold": sc.fold_mean is not None, "valset": sc.vs_mean is not None}
    stop = False
    if monitor and scored[monitor]:
        if improved[monitor]:
            st["since_best"] = 0
        else:
            st["since_best"] += 1 * max(1, run.o.val_interval)
        if run.o.patience and st["since_best"] >= run.o.patience:
            stop = True
            run.stop_reason = "early stopping"
    return stop


def _write_checkpoint(run: _Run, epoch: int) -> None:
    """Write ``<stem>.checkpoint.pt`` (atomically): model, optimizer, RNG states, progress after ``epoch``."""
    # the draws so far: earlier runs' (restored on resume) and this run's
    draws = [int(a) + int(b) for a, b in zip(run.st["draws"], run.draws_run)]
    state = {**run.st, "epoch": epoch, "elapsed_s": run.elapsed(), "rows": run.rows, "draws": draws}
    path = run.env.paths["checkpoint"]
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                "rng": _rng_state(), "state_json": json.dumps(state),
                "run_json": json.dumps(run.run_id)}, tmp)
    tmp.replace(path)


def _log_epoch(run: _Run, epoch: int, row: dict[str, Any], sc: _Scores, t_ep: float, wait: float,
               stop: bool) -> None:
    """The one plain log line per epoch: loss, learning rate, scores, seconds and time left."""
    o, st = run.o, run.st
    run.epoch_s.append(time.perf_counter() - t_ep)
    left = (o.epochs - epoch - 1) * float(np.mean(run.epoch_s))
    if o.time_limit_min:
        left = min(left, max(0.0, 60.0 * o.time_limit_min - run.elapsed()))
    if stop:
        left = 0.0
    msg = (f"{run.env.stem} epoch {epoch + 1}/{o.epochs} loss {row['train_loss']:.4f} lr {row['lr']:.3g}")
    if sc.fold_mean is not None:
        msg += f" val DSC {sc.fold_mean:.4f} (best {st['best']:.4f} @ {st['best_epoch']})"
    if sc.vs_mean is not None:
        msg += (f" --val DSC {sc.vs_mean:.4f} (best {st['best_valset']:.4f} @ "
                f"{st['best_valset_epoch']})")
    msg += f" {row['time_s']:.1f} s (data {wait:.1f} s) left {_hms(left)}"
    log.info(msg)


# --------------------------------------------------------------------------- train: end

def _run_draws(run: _Run) -> list[int]:
    """This run's patch draws per source so far, summed over ranks (all ranks must call it)."""
    env = run.env
    draws = torch.tensor(run.feed.sampler.counts, dtype=torch.int64)
    if env.distributed:
        import torch.distributed as dist

        d = draws.to(env.dev) if env.dev.type == "cuda" else draws
        dist.all_reduce(d)
        draws = d.cpu()
    return [int(v) for v in draws.tolist()]


def _finish(run: _Run) -> dict[str, Any]:
    """Sum the draws over ranks; rank 0 writes curve, final provenance and summary; the summary."""
    env = run.env
    run.st["draws"] = [int(a) + int(b) for a, b in zip(run.st["draws"], _run_draws(run))]
    for info, n in zip(run.data.source_info, run.st["draws"]):
        info["draws"] = n
    summary = _summary(run)
    if env.is_main:
        _write_final(run, summary)
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()
    return summary


def _summary(run: _Run) -> dict[str, Any]:
    """The returned summary: settings, best epochs and DSC, counts, timings (s), paths."""
    o, env, data, st, t_train, n_steps = run.o, run.env, run.data, run.st, run.t_train, run.n_steps
    checksum = float(sum(p.detach().double().sum() for p in run.model.parameters()))
    return {
        "stage": o.stage, "region": o.region, "config": o.cfg["name"], "params": count_parameters(run.model),
        "fold": o.fold, "folds": o.folds, "epochs_run": run.epoch + 1, "start_epoch": run.start_epoch,
        "stop_reason": run.stop_reason, "best_epoch": st["best_epoch"],
        "best_val_mean_dsc": st["best"] if st["best"] >= 0 else None, "best_val_dsc": st["best_dsc"],
        "best_valset_epoch": st["best_valset_epoch"],
        "best_valset_mean_dsc": st["best_valset"] if st["best_valset"] >= 0 else None,
        "best_valset_dsc": st["best_valset_dsc"], "keep": o.keep, "kept_epoch": st["kept_epoch"],
        "patch": list(run.patch_sz), "batch": o.batch, "world_size": env.world, "rank": env.rank,
        "device": str(env.dev), "amp": env.use_amp, "n_train_cases": len(data.train_cases),
        "n_val_cases": len(data.val_cases), "n_valset_cases": len(data.valset_cases), "steps": n_steps,
        "steps_total": st["steps_total"], "train_time_s": round(t_train, 2), "data_wait_s": round(run.t_wait, 2),
        "read_time_s": round(run.feed.read_s, 2),
        "first_step_s": None if run.first_step_s is None else round(run.first_step_s, 3),
        "s_per_step": round(t_train / n_steps, 4) if n_steps else None,
        "steps_per_min": round(60.0 * n_steps / t_train, 2) if n_steps and t_train > 0 else None,
        "total_time_s": round(time.perf_counter() - env.t_start, 2), "param_checksum": checksum,
        "sources": data.source_info, "val_sets": data.valset_info, "skipped": data.skipped,
        "split": data.split_info,
        "cache": ({"dir": str(data.cache_obj.root), "hits": data.loaded.hits, "built": data.loaded.built,
                   "rebuilt": data.cache_obj.rebuilt} if data.cache_obj else None),
        "paths": {k: str(v) for k, v in env.paths.items() if k in ("weights", "checkpoint", "metrics", "curve",
                                                                    "summary", "log", "last")
                  or (k == "best_fold" and o.has_fold_val) or (k in ("best_val", "valset_cases") and o.val_sets)},
    }


def _write_final(run: _Run, summary: dict[str, Any]) -> None:
    """Rank 0's last files: learning curve, provenance with the run's totals, summary; the closing log line."""
    from legcomp.training import provenance as P

    o, env, st = run.o, run.env, run.st
    if run.rows:
        _write_curve(run.rows, env.paths["curve"])
    # final provenance (totals of the whole run) beside every weights file this run wrote
    for kind, meta in run.saved_meta.items():
        P.write_provenance(env.candidate[kind], run.provenance(kind, meta, run.epoch + 1))
        if kind == o.keep:
            P.write_provenance(env.paths["weights"], run.provenance(kind, meta, run.epoch + 1))
    env.paths["summary"].write_text(json.dumps(summary, indent=2))
    log.info("%s: stopped (%s) after epoch %d; this run: %d steps, %.1f s training (%.1f s of it waiting for "
             "batches), %.1f s reading data; weights %s = %s (epoch %s)", env.stem, run.stop_reason, run.epoch + 1,
             run.n_steps, run.t_train, run.t_wait, run.feed.read_s, env.paths["weights"], o.keep, st["kept_epoch"])


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
