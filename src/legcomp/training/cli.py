"""Command-line arguments of ``legcomp train`` / ``python -m legcomp.training`` (torchrun-compatible)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from legcomp.errors import LegcompInputError
from legcomp.preprocessing import inputs as prep


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (shared by legcomp's CLI and ``python -m legcomp.training``)."""
    p = parser
    p.add_argument("--data", required=True, action="append", metavar="DIR[:WEIGHT]",
                   help="folder of labelled studies (e.g. a phantom cohort); repeat for several sources, each with "
                   "an optional sampling weight (--data synth/ --data real/:0.3): every step draws from the sources "
                   "in proportion to their weights (default 1) whatever their sizes. The k-fold split is made per "
                   "source. Label value 255 = no label (left out of the loss), and a study's label_record.json lists "
                   'structures it leaves unlabelled (e.g. {"stage2": {"unlabelled": ["adductor_longus"]}}), which '
                   "are then not learnt as background. A study that cannot be read is skipped (logged)")
    p.add_argument("--val", action="append", default=None, metavar="DIR",
                   help="labelled studies (e.g. real scans; repeatable) never trained on, scored every --val-interval "
                   "epochs: DSC (as legcomp evaluate's) per case and structure (structures a study's label record "
                   "lists as unlabelled, and label 255, left out) in "
                   "<stem>.metrics.csv (valset_* columns), <stem>.valset_cases.csv and the curve; the best mean "
                   "is kept as <stem>.best_val.pt")
    p.add_argument("--keep", choices=("auto", "best-val", "last", "best-fold"), default="auto",
                   help="which weights <stem>.pt (what legcomp run loads from --out) is: best-val (best --val mean "
                   "DSC, <stem>.best_val.pt), last (last epoch, <stem>.last.pt) or best-fold (best k-fold "
                   "validation mean DSC, <stem>.best_fold.pt); auto (default): best-val with --val, else best-fold "
                   "with --folds > 1, else last. Recorded in the summary and provenance")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="preprocessing cache: each study's network-ready arrays are stored once (keyed by a hash of "
                   "its files' bytes and the preprocessing options) and reused by later, resumed and DDP runs "
                   "(default: $XDG_CACHE_HOME/legcomp/training or ~/.cache/legcomp/training); safe to delete")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="do not use the preprocessing cache")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
                   help="1: background/SAT/whole muscle; 2: individual muscles")
    p.add_argument("--region", choices=("thigh", "calf"), required=True,
                   help="thigh or calf: the region whose network is trained")
    p.add_argument("--out", required=True,
                   help="output folder: <stem>.pt (<stem> = <region>_stage<k>; the weights legcomp run --weights OUT "
                   "loads: a copy of the --keep choice), <stem>.last.pt / .best_fold.pt / .best_val.pt, "
                   "<stem>.provenance.json beside each weights file (command, data sources with study counts, "
                   "hashes and missing labels, skipped studies, epochs, steps, seconds, device, network, init "
                   "weights, legcomp version and git commit), <stem>.checkpoint.pt, <stem>.metrics.csv, "
                   "<stem>.curve.png, <stem>.summary.json, train.log")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold split; 1 = train on all (default 5)")
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    p.add_argument("--config", default="fast", help="network config: fast (default), seed, tiny, or a JSON dict")
    p.add_argument("--epochs", type=int, default=100,
                   help="number of epochs (default 100; each of --iters optimizer steps)")
    p.add_argument("--iters", type=int, default=50, help="optimizer steps per epoch (default 50)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="patch size in voxels (default 128 128 32 for stage 1, 128 128 48 for stage 2)")
    p.add_argument("--batch", type=int, default=2, help="patches per step per process (default 2)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="initial learning rate of the optimizer (default 1e-3; decays over the run)")
    p.add_argument("--loss", choices=("dicece", "dicefocal"), default="dicece",
                   help="Dice + cross-entropy (default) or Dice + softmax focal, both partial-label (marginal)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the k-fold split, sampling, augmentation and initial weights (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable bfloat16 autocast on CUDA")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="resume from the checkpoint in --out (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh")
    p.add_argument("--patience", type=int, default=30,
                   help="early stopping patience in epochs (0 = off), on the --val mean DSC with --keep best-val, "
                   "else on the k-fold validation's")
    p.add_argument("--val-interval", type=int, default=1,
                   help="validate (k-fold validation fold and --val studies) every N epochs (default 1)")
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N studies of each source")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (CPU data only)")
    p.add_argument("--with-stage1", action="store_true", help="stage 2 also gets the stage-1 muscle mask")
    p.add_argument("--working-spacing", type=float, nargs=2, metavar=("DX", "DY"), default=(1.5, 1.5),
                   help="in-plane working voxel size in mm (default 1.5 1.5; 0 0 = native)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no data augmentation (affine, elastic, bias field, intensity, noise, blur)")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars; one log line per epoch (loss, learning rate, validation DSC, seconds, "
                   "seconds waiting for data, time left) goes to stderr and to OUT/train.log either way")
    p.add_argument("--normalisation", choices=prep.NORMALISATIONS, default=prep.NORMALISATIONS[0],
                   help="input intensity normalisation (default fat_reference; recorded in the weights)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these weights (same region/stage/config); 'bundled' = the bundled ones of "
                   "this region and stage, to fine-tune them on your labels")
    return p


def train_from_args(args: argparse.Namespace, command: str | None = None) -> dict:
    """Run :func:`legcomp.training.train` with parsed arguments (``command``: the command line to record)."""
    from legcomp.training.cache import default_cache_dir
    from legcomp.training.loop import train

    config = args.config
    if isinstance(config, str) and config.strip().startswith("{"):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise LegcompInputError(f"--config is not valid JSON: {exc}") from None
    ws = None if not any(args.working_spacing) else (args.working_spacing[0], args.working_spacing[1], None)
    cache = None
    if getattr(args, "use_cache", True):
        cache = args.cache if getattr(args, "cache", None) else default_cache_dir()
    data = args.data if isinstance(args.data, (list, tuple)) else [args.data]
    return train(data if len(data) > 1 else data[0], stage=args.stage, region=args.region, out=args.out,
                 folds=args.folds, fold=args.fold,
                 config=config, epochs=args.epochs, iters_per_epoch=args.iters, patch=args.patch,
                 batch=args.batch, lr=args.lr, loss=args.loss, seed=args.seed, device=args.device, amp=args.amp,
                 resume=args.resume, patience=args.patience, val_interval=args.val_interval,
                 max_cases=args.max_cases, workers=args.workers, with_stage1=args.with_stage1,
                 working_spacing=ws, augment=args.augment, time_limit_min=args.time_limit, progress=args.progress,
                 init_weights=args.init, normalisation=args.normalisation, val_dirs=getattr(args, "val", None),
                 cache=cache, keep=getattr(args, "keep", "auto"),
                 command=command or getattr(args, "command_line", None))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m legcomp.training``; returns the exit code (2 on bad input)."""
    parser = add_train_arguments(argparse.ArgumentParser(
        prog="python -m legcomp.training", description="Train one legcomp network (torchrun-compatible)."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = shlex.join(["python", "-m", "legcomp.training", *(sys.argv[1:] if argv is None else argv)])
    try:
        summary = train_from_args(args, command=command)
    except LegcompInputError as exc:
        print(f"legcomp: error: {exc}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "paths"}, indent=1))
        print(f"weights: {summary['paths']['weights']}")
    return 0
