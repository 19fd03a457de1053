"""Training one network of the cascade (stage 1 or 2, thigh or calf).

Single process or multi-process (``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK in the environment,
DistributedDataParallel, NCCL on CUDA / Gloo on CPU, training cases sharded across ranks, only rank 0
validates and writes files).

Files written to ``out`` (stem ``<region>_stage<k>``):

* ``<stem>.pt`` - best weights (:func:`legcomp.models.save_weights`, validation DSC per structure in the meta);
* ``<stem>.checkpoint.pt`` - last epoch's model, optimizer, progress, RNG states (for ``resume``);
* ``<stem>.metrics.csv`` - one row per epoch; ``<stem>.curve.png`` - learning curve;
* ``<stem>.summary.json`` - the returned summary.
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
    """Sliding-window DSC per case and foreground class: float array (cases, n_classes - 1), NaN where
    the structure is absent from the reference or the case does not label it (its ``classes``);
    :data:`legcomp.anatomy.IGNORE` voxels are left out."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=n_classes)
    rows = []
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for case in cases:
            img = prep.pad_to_multiple(case["image"], divisor, minimum=patch, mode="constant")
            x = torch.from_numpy(np.ascontiguousarray(img))[None].to(device)
            logits = sliding_window_inference(x, roi_size=list(patch), sw_batch_size=sw_batch, predictor=model,
                                              overlap=0.25, mode="gaussian")
            nx, ny, nz = case["label"].shape[1:]
            pred = logits.argmax(1, keepdim=True)[..., :nx, :ny, :nz]
            ref = torch.from_numpy(case["label"].astype(np.int64))[None].to(device)
            unlabelled = ref == anatomy.IGNORE
            pred = torch.where(unlabelled, torch.zeros_like(pred), pred)
            ref = torch.where(unlabelled, torch.zeros_like(ref), ref)
            row = metric(one_hot(pred, n_classes), one_hot(ref, n_classes))[0].float().cpu().numpy()
            if "classes" in case:
                row = np.where(np.asarray(case["classes"])[1:] > 0.5, row, np.nan)
            rows.append(row)
    model.train()
    return np.stack(rows) if rows else np.zeros((0, n_classes - 1))


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
    val = [(r["epoch"], r["val_mean_dsc"]) for r in rows if r.get("val_mean_dsc") not in (None, "")]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:red", ms=3, label="validation mean DSC")
        ax2.set_ylabel("validation mean DSC", color="tab:red")
        ax2.set_ylim(0, 1)
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

def train(data_dir: str | Path, *, stage: int, region: str, out: str | Path, folds: int = 5, fold: int = 0,
          config: str | dict = "fast", epochs: int = 100, iters_per_epoch: int = 50,
          patch: Sequence[int] | None = None, batch: int = 2, lr: float = 1e-3, weight_decay: float = 1e-4,
          loss: str = "dicece", seed: int = 0, device: str = "auto", amp: bool = True, resume: bool = True,
          patience: int = 30, val_interval: int = 1, max_cases: int | None = None, workers: int = 0,
          with_stage1: bool = False, working_spacing: Sequence[float | None] | None = prep.WORKING_SPACING,
          augment: bool = True, time_limit_min: float | None = None, progress: bool = True,
          cases: tuple[list[dict], list[dict]] | None = None,
          init_weights: str | Path | None = None,
          normalisation: str = prep.NORMALISATIONS[0]) -> dict[str, Any]:
    """Train one network of the cascade and save its best weights.

    Args:
        data_dir: folder of labelled studies (any layout :func:`legcomp.io.find_studies` finds; the
            region comes from the path, e.g. ``thigh_00012``).
        stage: 1 (background/SAT/whole muscle from water+fat) or 2 (muscles from opposed phase+water).
        region: ``thigh`` or ``calf``.
        out: output folder (see module doc for the files).
        folds, fold: deterministic k-fold split by sorted study name and ``seed``; ``folds=1``
            trains on all studies without validation (the last epoch's weights are kept).
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
        patience: stop when validation mean DSC has not improved for this many epochs (0 = never).
        val_interval: validate every this many epochs (and at the last one).
        max_cases: use only the first N studies (sorted by name).
        workers: DataLoader worker processes (CPU data only; data cached on the GPU uses 0).
        with_stage1: stage 2 gets the stage-1 whole-muscle mask as a third input channel.
        working_spacing: working voxel size (mm, None = native) for the network's inputs.
        augment: use data augmentation.
        time_limit_min: wall-clock budget (minutes, data loading included, summed over resumed runs): the
            learning-rate decay follows whichever of epochs or time runs out first, and training
            stops after the epoch that crosses the budget.
        progress: tqdm progress bars (rank 0).
        cases: optional pre-built (train cases, validation cases), bypassing ``data_dir``.
        init_weights: start from this weights file (``"bundled"``: the bundled one of this region and
            stage; same region, stage and config) instead of a
            random initialisation, e.g. to continue training bundled weights (fine-tuning).
        normalisation: input intensity normalisation (:data:`legcomp.preprocessing.inputs.NORMALISATIONS`),
            recorded in the weights so inference uses the same.
    Returns:
        Summary dict: paths written, best epoch, best validation DSC per structure, timings.
    """
    from monai.data import CacheDataset, DataLoader, ThreadDataLoader, set_track_meta
    from tqdm.auto import tqdm

    from legcomp.training.losses import PartialLabelLoss, all_classes

    region = anatomy.check_region(region)
    stage = int(stage)
    if stage not in (1, 2):
        raise LegcompInputError(f"unknown stage {stage!r}; expected 1 or 2")
    if loss not in ("dicece", "dicefocal"):
        raise LegcompInputError(f"unknown loss {loss!r}; expected dicece or dicefocal")
    with_stage1 = bool(with_stage1 and stage == 2)
    normalisation = prep.check_normalisation(normalisation)
    cfg = resolve_config(config)
    divisor = network_divisor(cfg)
    n_classes = anatomy.n_classes(stage, region)
    names = anatomy.stage_labels(stage, region)
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
    paths = {"weights": out / f"{stem}.pt", "checkpoint": out / f"{stem}.checkpoint.pt",
             "metrics": out / f"{stem}.metrics.csv", "curve": out / f"{stem}.curve.png",
             "summary": out / f"{stem}.summary.json"}
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ws = tuple(working_spacing) if working_spacing is not None else (None, None, None)

    # ---- data
    split_info: dict[str, Any] = {}
    if cases is None:
        study_paths = D.discover(data_dir, region, max_cases)
        tr_idx, va_idx = D.kfold_split([p.name for p in study_paths], folds, fold, seed)
        split_info = {"train": [study_paths[i].name for i in tr_idx], "val": [study_paths[i].name for i in va_idx]}
        my_idx = tr_idx[rank::world] if distributed and len(tr_idx) >= world else tr_idx
        train_cases = D.load_cases([study_paths[i] for i in my_idx], stage, region, spacing=ws,
                                   with_stage1=with_stage1, progress=progress and is_main, normalisation=normalisation)
        val_cases = (D.load_cases([study_paths[i] for i in va_idx], stage, region, spacing=ws,
                                  with_stage1=with_stage1, progress=progress and is_main,
                                  normalisation=normalisation) if is_main else [])
    else:
        train_cases, val_cases = list(cases[0]), list(cases[1]) if is_main else []
        if distributed and len(train_cases) >= world:
            train_cases = train_cases[rank::world]
    if not train_cases:
        raise LegcompInputError("no training cases (labelled studies) found", data_dir)
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
    prev_meta = _track_meta_state()
    set_track_meta(False)
    try:
        det, rnd = D.build_transforms(stage, n_classes, patch_sz, device=data_device, augment=augment)
        from monai.transforms import Compose

        ds = CacheDataset([{"image": c["image"], "label": c["label"],
                            "classes": np.asarray(c.get("classes", np.ones(n_classes)), np.float32)}
                           for c in train_cases],
                          transform=Compose(list(det.transforms) + list(rnd.transforms)), cache_rate=1.0,
                          num_workers=None if data_device is None else 0, progress=False,
                          copy_cache=False)
        gen = torch.Generator().manual_seed(seed + 7919 * rank)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=iters_per_epoch * batch,
                                                 generator=gen)
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
        start_epoch, best, best_epoch, best_dsc, since_best, rows = 0, -1.0, -1, {}, 0, []
        elapsed_prev = 0.0

        def elapsed() -> float:
            return elapsed_prev + time.perf_counter() - t_start

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
            if is_main:
                log.info("initialised from %s", init_weights)
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
            st = json.loads(ck["state_json"])
            start_epoch, best, best_epoch = st["epoch"] + 1, st["best"], st["best_epoch"]
            best_dsc, since_best, rows = st["best_dsc"], st["since_best"], st["rows"]
            elapsed_prev = float(st.get("elapsed_s", 0.0))
            _set_rng_state(ck["rng"])
            if is_main:
                log.info("resumed from %s at epoch %d", paths["checkpoint"], start_epoch)
        net = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

        meta_common = dict(patch_size=list(patch_sz), working_spacing=list(ws), with_stage1=with_stage1,
                           normalisation=prep.normalisation_spec(normalisation), training={
                               "epochs": epochs, "iters_per_epoch": iters_per_epoch, "batch": batch, "lr": lr,
                               "loss": loss, "seed": seed, "folds": folds, "fold": fold, "world_size": world,
                               "n_train_cases": len(train_cases) * (world if distributed else 1),
                               "split": split_info})

        def save_best(epoch: int, dsc: dict, mean: float | None) -> None:
            save_weights(paths["weights"], model, config=cfg, region=region, stage=stage, n_classes=n_classes,
                         in_channels=in_channels, epoch=epoch, val_dsc=dsc,
                         val_mean_dsc=None if mean is None else round(float(mean), 4),
                         **meta_common)

        # ---- epochs
        epoch = start_epoch - 1
        stop_reason = "epochs"
        t_train = 0.0
        n_steps = 0
        for epoch in range(start_epoch, epochs):
            t_ep = time.perf_counter()
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
            for item in bar:
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
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            t_train += time.perf_counter() - t_ep
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                                   "train_loss": float(np.mean(losses)), "val_mean_dsc": ""}
            last = epoch == epochs - 1
            over_time = bool(time_limit_min) and elapsed() >= 60.0 * time_limit_min
            stop = torch.zeros(1)
            if is_main:
                if val_cases and ((epoch + 1) % max(1, val_interval) == 0 or last or over_time):
                    dsc_rows = validate(model, val_cases, n_classes, patch_sz, divisor, dev, use_amp)
                    per = np.nanmean(np.where(np.isnan(dsc_rows), np.nan, dsc_rows), axis=0) \
                        if len(dsc_rows) else np.full(n_classes - 1, np.nan)
                    dsc = {lab.name: (None if np.isnan(v) else round(float(v), 4)) for lab, v in zip(names, per)}
                    mean = float(np.nanmean(per)) if np.isfinite(per).any() else 0.0
                    row["val_mean_dsc"] = round(mean, 4)
                    row.update({f"dsc_{k}": ("" if v is None else v) for k, v in dsc.items()})
                    if mean > best:
                        best, best_epoch, best_dsc, since_best = mean, epoch + 1, dsc, 0
                        save_best(epoch + 1, dsc, mean)
                    else:
                        since_best += 1 * max(1, val_interval)
                    if patience and since_best >= patience:
                        stop[0] = 1
                        stop_reason = "early stopping"
                elif not val_cases:
                    best_epoch = epoch + 1
                    save_best(epoch + 1, {}, None)
                row["time_s"] = round(time.perf_counter() - t_ep, 2)
                rows.append(row)
                _write_csv(rows, paths["metrics"])
                if over_time:
                    stop[0] = 1
                    stop_reason = "time limit"
                state = {"epoch": epoch, "best": best, "best_epoch": best_epoch, "best_dsc": best_dsc,
                         "since_best": since_best, "rows": rows, "elapsed_s": elapsed()}
                tmp = paths["checkpoint"].with_name(paths["checkpoint"].name + ".tmp")
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "rng": _rng_state(), "state_json": json.dumps(state),
                            "run_json": json.dumps(run_id)}, tmp)
                tmp.replace(paths["checkpoint"])
                if progress:
                    msg = f"{stem} epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f}"
                    if row["val_mean_dsc"] != "":
                        msg += f" val DSC {row['val_mean_dsc']:.4f} (best {best:.4f} @ {best_epoch})"
                    tqdm.write(msg)
            if distributed:
                import torch.distributed as dist

                s = stop.to(dev) if dev.type == "cuda" else stop
                dist.broadcast(s, src=0)
                stop = s.cpu()
            if bool(stop[0]):
                break
        if start_epoch >= epochs:
            stop_reason = "already complete"
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        summary: dict[str, Any] = {
            "stage": stage, "region": region, "config": cfg["name"], "params": count_parameters(model),
            "fold": fold, "folds": folds, "epochs_run": epoch + 1, "start_epoch": start_epoch,
            "stop_reason": stop_reason, "best_epoch": best_epoch, "best_val_mean_dsc": best if best >= 0 else None,
            "best_val_dsc": best_dsc, "patch": list(patch_sz), "batch": batch, "world_size": world, "rank": rank,
            "device": str(dev), "amp": use_amp, "n_train_cases": len(train_cases), "n_val_cases": len(val_cases),
            "steps": n_steps, "train_time_s": round(t_train, 2),
            "s_per_step": round(t_train / n_steps, 4) if n_steps else None,
            "total_time_s": round(time.perf_counter() - t_start, 2), "param_checksum": checksum,
            "paths": {k: str(v) for k, v in paths.items()},
        }
        if is_main:
            if rows:
                _write_curve(rows, paths["curve"])
            paths["summary"].write_text(json.dumps(summary, indent=2))
        if distributed:
            import torch.distributed as dist

            dist.barrier()
        return summary
    finally:
        set_track_meta(prev_meta)
        if own_pg:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _track_meta_state() -> bool:
    from monai.data import get_track_meta

    return bool(get_track_meta())
