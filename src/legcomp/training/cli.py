"""Command-line arguments of ``legcomp train`` / ``python -m legcomp.training`` (torchrun-compatible)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from legcomp.errors import LegcompInputError
from legcomp.preprocessing import inputs as prep


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (shared by legcomp's CLI and ``python -m legcomp.training``)."""
    p = parser
    p.add_argument("--data", required=True,
                   help="folder of labelled studies (e.g. a phantom cohort); label value 255 = no label (left out "
                   "of the loss), and a study's label_record.json lists structures it leaves unlabelled "
                   '(e.g. {"stage2": {"unlabelled": ["adductor_longus"]}}), which are then not learnt as background')
    p.add_argument("--stage", type=int, choices=(1, 2), required=True,
                   help="1: background/SAT/whole muscle; 2: individual muscles")
    p.add_argument("--region", choices=("thigh", "calf"), required=True)
    p.add_argument("--out", required=True, help="output folder (weights <region>_stage<k>.pt, checkpoint, log)")
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold split; 1 = train on all (default 5)")
    p.add_argument("--fold", type=int, default=0, help="validation fold (default 0)")
    p.add_argument("--config", default="fast", help="network config: fast (default), seed, tiny, or a JSON dict")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--iters", type=int, default=50, help="optimizer steps per epoch (default 50)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="patch size in voxels (default 128 128 32 for stage 1, 128 128 48 for stage 2)")
    p.add_argument("--batch", type=int, default=2, help="patches per step per process (default 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=("dicece", "dicefocal"), default="dicece",
                   help="Dice + cross-entropy (default) or Dice + softmax focal, both partial-label (marginal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable bfloat16 autocast on CUDA")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="resume from the checkpoint in --out (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start afresh")
    p.add_argument("--patience", type=int, default=30, help="early stopping patience in epochs (0 = off)")
    p.add_argument("--val-interval", type=int, default=1, help="validate every N epochs")
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N studies")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (CPU data only)")
    p.add_argument("--with-stage1", action="store_true", help="stage 2 also gets the stage-1 muscle mask")
    p.add_argument("--working-spacing", type=float, nargs=2, metavar=("DX", "DY"), default=(1.5, 1.5),
                   help="in-plane working voxel size in mm (default 1.5 1.5; 0 0 = native)")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--normalisation", choices=prep.NORMALISATIONS, default=prep.NORMALISATIONS[0],
                   help="input intensity normalisation (default fat_reference; recorded in the weights)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these weights (same region/stage/config); 'bundled' = the bundled ones of "
                   "this region and stage, to fine-tune them on your labels")
    return p


def train_from_args(args: argparse.Namespace) -> dict:
    """Run :func:`legcomp.training.train` with parsed arguments."""
    from legcomp.training.loop import train

    config = args.config
    if isinstance(config, str) and config.strip().startswith("{"):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise LegcompInputError(f"--config is not valid JSON: {exc}") from None
    ws = None if not any(args.working_spacing) else (args.working_spacing[0], args.working_spacing[1], None)
    return train(args.data, stage=args.stage, region=args.region, out=args.out, folds=args.folds, fold=args.fold,
                 config=config, epochs=args.epochs, iters_per_epoch=args.iters, patch=args.patch,
                 batch=args.batch, lr=args.lr, loss=args.loss, seed=args.seed, device=args.device, amp=args.amp,
                 resume=args.resume, patience=args.patience, val_interval=args.val_interval,
                 max_cases=args.max_cases, workers=args.workers, with_stage1=args.with_stage1,
                 working_spacing=ws, augment=args.augment, time_limit_min=args.time_limit, progress=args.progress,
                 init_weights=args.init, normalisation=args.normalisation)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m legcomp.training``; returns the exit code (2 on bad input)."""
    parser = add_train_arguments(argparse.ArgumentParser(
        prog="python -m legcomp.training", description="Train one legcomp network (torchrun-compatible)."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = train_from_args(args)
    except LegcompInputError as exc:
        print(f"legcomp: error: {exc}", file=sys.stderr)
        return 2
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "paths"}, indent=1))
        print(f"weights: {summary['paths']['weights']}")
    return 0
