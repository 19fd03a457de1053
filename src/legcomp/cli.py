"""``legcomp``: the one front door.

Every sub-command is a thin shell around a library function; bad input ends with one line on
stderr (``legcomp: error: <file>: <problem>``) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from legcomp import __version__
from legcomp.errors import Interrupted, LegcompInputError

EXAMPLES = """examples:
  legcomp run study_folder/ --out results/          segment and quantify one study (or a cohort folder)
  legcomp info study_folder/                        what legcomp finds in a folder (NIfTI or DICOM)
  legcomp phantom --region thigh --n 3 --out ph/    synthetic Dixon legs with exact ground truth
  legcomp synth --labels map.nii.gz --mapping labels.json --n 5 --out syn/
                                                    Dixon legs synthesised from a real muscle label map
  legcomp labels --region calf --json               the label table
  legcomp prepare labelled/ --labels experts.nii.gz --region thigh --out train/
                                                    your muscle labels -> studies for legcomp train
"""


def _floats(n: int) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        vals = tuple(float(v) for v in text.replace("x", ",").split(","))
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} numbers, e.g. {','.join(['1.5'] * n)}")
        return vals
    return parse


def _ints(n: int) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in _floats(n)(text))
    return parse


# --------------------------------------------------------------------------- commands
def cmd_labels(args: argparse.Namespace) -> int:
    from legcomp import anatomy
    if args.itksnap or args.slicer:
        regions = [args.region] if args.region else list(anatomy.REGIONS)
        for folder, writer, suffix in ((args.itksnap, anatomy.write_itksnap_labels, "itksnap.label"),
                                       (args.slicer, anatomy.write_slicer_colortable, "slicer.ctbl")):
            if not folder:
                continue
            Path(folder).mkdir(parents=True, exist_ok=True)
            for region in regions:
                for stage in (1, 2):
                    print(writer(Path(folder) / f"{region}_stage{stage}_{suffix}", stage, region))
        return 0
    if args.json:
        print(anatomy.labels_json(args.region))
        return 0
    for lab in anatomy.labels(args.region):
        print(f"stage {lab.stage}  {lab.region:5s}  {lab.id:2d}  {lab.abbrev:4s} {lab.name:36s} {lab.display}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from legcomp.io import read_study
    s = read_study(args.path, region=args.region, keep_ids=args.keep_ids)
    info = {
        "name": s.name, "source": s.source, "region": s.region,
        "contrasts_read": [c for c in ("water", "fat", "in_phase", "opposed_phase") if c not in s.derived],
        "contrasts_derived": list(s.derived),
        "shape": list(s.input_shape or s.shape), "spacing_mm": [round(v, 4) for v in s.spacing],
        "orientation": s.orientation, "voxel_volume_ml": s.voxel_volume_ml,
        "labels": sorted(s.labels),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:18s} {v}")
    return 0


def _list_studies(folders: list, preview: bool) -> int:
    """Print the written study folders (after a preview.png in each with ``preview``); exit code 0."""
    from legcomp import phantom
    for f in folders:
        if preview:
            phantom.save_preview(f, f / "preview.png")
        print(f)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from legcomp import phantom
    opts: dict = {"geometry": not args.no_geometry, "supersample": args.supersample}
    if args.spacing is not None:
        opts["spacing"] = args.spacing
    folders = phantom.synth_cohort(args.labels, args.mapping, args.n, args.seed, args.out, region=args.region,
                                   z_range=args.slices, progress=not args.quiet, **opts)
    return _list_studies(folders, args.preview)


def cmd_phantom(args: argparse.Namespace) -> int:
    from legcomp import phantom
    from legcomp.anatomy import REGIONS, check_region
    regions = [check_region(args.region)] if args.region else list(REGIONS)
    if not args.region:
        print(f"legcomp: no --region: making {args.n} of each region ({', '.join(regions)})", file=sys.stderr)
    opts = dict(spacing=args.spacing, legs=args.legs, infiltration=args.infiltration, adiposity=args.adiposity,
                snr=args.snr, bias=args.bias, swap=args.swap, randomize=args.randomize)
    if args.matrix is not None:
        opts["matrix"] = args.matrix
    folders = [f for region in regions
               for f in phantom.generate_cohort(region, args.n, args.seed, args.out, progress=not args.quiet, **opts)]
    return _list_studies(folders, args.preview)


def cmd_quantify(args: argparse.Namespace) -> int:
    from legcomp.quantification import quantify_files
    q = quantify_files(args.study, args.stage1, args.stage2, args.out, region=args.region,
                       fat_rule=args.fat_rule, mapping=args.mapping, keep_hip=args.keep_hip)
    if not args.quiet:
        _print_summary(q.table)
    print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from legcomp.evaluation import evaluate_paths
    from legcomp.evaluation.core import summary_markdown
    ev = evaluate_paths(args.pred, args.truth, args.out, fat_rule=args.fat_rule, mapping=args.mapping,
                        region=args.region)
    print(summary_markdown(ev.summary, ev.errors, ev.metrics["subject"].nunique() if len(ev.metrics) else 0,
                           ev.not_labelled))
    if args.out:
        print(f"wrote {args.out}")
    return 1 if ev.errors else 0


def cmd_train(args: argparse.Namespace) -> int:
    import logging

    from legcomp.training.cli import train_from_args
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    train_from_args(args, command=args.command_line)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from legcomp.prepare import prepare_cohort
    return prepare_cohort(args.input, args.out, labels=args.labels, region=args.region, mapping=args.mapping,
                          weights=args.weights, device=args.device, progress=not args.quiet,
                          unlabelled_slices=args.unlabelled_slices)


def cmd_predict(args: argparse.Namespace) -> int:
    from legcomp.pipeline import run_cohort
    return run_cohort(args.input, args.out, region=args.region, weights=args.weights, device=args.device,
                      quantify=False, overlay=False, progress=not args.quiet, keep_ids=args.keep_ids,
                      overwrite=args.overwrite, fix_swap=args.fix_swap, **_cluster_args(args))


def cmd_run(args: argparse.Namespace) -> int:
    from legcomp.pipeline import run_cohort
    return run_cohort(args.input, args.out, region=args.region, weights=args.weights, device=args.device,
                      quantify=True, overlay=not args.no_overlay, fat_rule=args.fat_rule, progress=not args.quiet,
                      keep_hip=args.keep_hip, keep_ids=args.keep_ids, overwrite=args.overwrite,
                      report=not args.no_report, dicom_seg=not args.no_dicom_seg, fix_swap=args.fix_swap,
                      **_cluster_args(args))


def _cluster_args(args: argparse.Namespace) -> dict:
    """``run_cohort``'s Dask options from the command line (all None: the serial run)."""
    return {"workers": args.workers, "scheduler": args.scheduler, "memory_per_worker": args.memory_per_worker}


def _print_summary(table) -> None:
    t = table[(table["leg"] == "total") & (table["measure"].isin(["volume_ml", "fat_volume_ml"]))]
    if len(t):
        print(t.pivot_table(index="structure", columns="measure", values="value", sort=False).round(2).to_string())


# --------------------------------------------------------------------------- parser
KEEP_IDS_HELP = ("name DICOM studies by their PatientID; by default no patient name, ID or birth date from DICOM "
                 "headers reaches the outputs (studies are named by their folders)")
HIP_HELP = ("keep the hip/pelvis slices (legs joined in one cross-section, above the slices with the legs apart) "
            "in the volumes, split at the body midline; by default they are left out, with a note in run.json")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit code 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"legcomp: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="legcomp", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Thigh and calf muscle and fat composition from two-point Dixon MRI.")
    p.add_argument("--version", action="version", version=f"legcomp {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("labels", cmd_labels, "print the label table (regions, stages, ids, names, colours)")
    sp.add_argument("--region", choices=["thigh", "calf"], help="only this region's stage-2 muscles")
    sp.add_argument("--json", action="store_true", help="print JSON (list of objects: id, name, stage, region, ...)")
    sp.add_argument("--itksnap", metavar="DIR", help="write ITK-SNAP label description files into DIR")
    sp.add_argument("--slicer", metavar="DIR", help="write 3D Slicer colour tables (.ctbl) into DIR")

    sp = add("info", cmd_info, "show what legcomp finds in a study folder (NIfTI or DICOM)")
    sp.add_argument("path", help="study folder or one of its NIfTI files")
    sp.add_argument("--region", help="thigh or calf (overrides the folder name)")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--keep-ids", action="store_true", help=KEEP_IDS_HELP)

    sp = add("phantom", cmd_phantom, "generate synthetic two-point Dixon thighs or calves with exact ground truth")
    sp.add_argument("--region", help="thigh or calf (default: --n of each)")
    sp.add_argument("--n", type=int, default=1, help="number of subjects (of each region without --region; default 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the first subject; subject i uses seed+i")
    sp.add_argument("--out", required=True, help="output folder (one sub-folder per subject)")
    sp.add_argument("--spacing", type=_floats(3), default=(1.5, 1.5, 5.0), help="voxel size x,y,z in mm (1.5,1.5,5)")
    sp.add_argument("--matrix", type=_ints(3), default=None, help="matrix nx,ny,nz (default: region's)")
    sp.add_argument("--legs", choices=["both", "left", "right"], default="both", help="which legs (default both)")
    sp.add_argument("--infiltration", type=float, default=0.3, help="fat infiltration severity 0..1")
    sp.add_argument("--adiposity", type=float, default=0.5, help="subcutaneous adiposity 0..1")
    sp.add_argument("--snr", type=float, default=30.0, help="signal-to-noise ratio in muscle")
    sp.add_argument("--bias", type=float, default=0.3, help="coil bias-field strength 0..1")
    sp.add_argument("--swap", action="store_true", help="simulate a fat-water swap artefact")
    sp.add_argument("--randomize", action="store_true", help="domain-randomised appearance and geometry")
    sp.add_argument("--preview", action="store_true", help="also write preview.png in each subject folder")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("synth", cmd_synth, "synthesise two-point Dixon legs from a real muscle label map (exact labels)")
    sp.add_argument("--labels", required=True, help="muscle label map (NIfTI)")
    sp.add_argument("--mapping", required=True,
                    help="JSON mapping the map's ids to legcomp names ({'region':..., 'map': {id: name or null}}); "
                    "null ids are bone when their foreign name says so, other muscle otherwise")
    sp.add_argument("--region", default=None, help="thigh or calf (default: the mapping's region)")
    sp.add_argument("--n", type=int, default=1, help="number of studies (default 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the first study; study i uses seed+i")
    sp.add_argument("--out", required=True, help="output folder (one sub-folder per study)")
    sp.add_argument("--slices", type=_ints(2), default=None, metavar="FIRST,LAST",
                    help="use only these slices of the map (inclusive, file order), e.g. where its labels are reliable")
    sp.add_argument("--spacing", type=_floats(3), default=None,
                    help="voxel size x,y,z in mm (default: drawn, in-plane 0.7-2, slices 3-25)")
    sp.add_argument("--supersample", type=int, default=2, help="sub-voxels per in-plane axis (default 2)")
    sp.add_argument("--no-geometry", action="store_true",
                    help="keep the map's pose and muscle sizes (no rotation, scaling, warp, coverage crop)")
    sp.add_argument("--preview", action="store_true", help="also write preview.png in each study folder")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    fat_help = "fat-voxel rule: seed (default: min-max normalised fat >= 0.1), ff:T, sat:T or abs:V"
    sp = add("quantify", cmd_quantify, "volumes (mL), MAT / InterMAT / IntraMAT and fat fractions from given masks")
    sp.add_argument("study", help="study folder (water and fat images)")
    sp.add_argument("--stage1", help="stage-1 label map (0 bg, 1 SAT, 2 whole muscle)")
    sp.add_argument("--stage2", help="stage-2 label map (individual muscles)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--region", help="thigh or calf (overrides the folder name)")
    sp.add_argument("--fat-rule", default="seed", help=fat_help)
    sp.add_argument("--mapping", help="JSON file (or shipped name, e.g. huashan_thigh) mapping foreign label "
                    "ids to legcomp names")
    sp.add_argument("--keep-hip", action="store_true", help=HIP_HELP)
    sp.add_argument("--quiet", action="store_true", help="print only the output folder (no volume summary)")

    sp = add("evaluate", cmd_evaluate, "DSC, HD95 and volume errors of predicted masks against ground truth")
    sp.add_argument("--pred", required=True, help="prediction folder (one subject, or one sub-folder per subject)")
    sp.add_argument("--truth", required=True, help="ground-truth folder (same layout)")
    sp.add_argument("--out", help="write metrics.csv, summary.csv and summary.md here")
    sp.add_argument("--fat-rule", default="seed", help=fat_help)
    sp.add_argument("--mapping", help="JSON file (or shipped name, e.g. huashan_thigh) mapping the truth's "
                    "foreign label ids to legcomp names")
    sp.add_argument("--region", help="thigh or calf (overrides the folder names)")

    sp = add("prepare", cmd_prepare, "make training studies of expert muscle labels with partial labels (ids "
             "mapped, stage-1 labels filled in by the stage-1 network, unlabelled legs left out, unlabelled "
             "slices of a labelled leg set to 255 = no label, muscles the labels lack listed in label_record.json)")
    sp.add_argument("input", help="study folder, or a folder of study folders, each holding its label file")
    sp.add_argument("--labels", required=True, help="file name of the muscle label map inside each study folder "
                    "(a path relative to it; an absolute path names one file for every study)")
    sp.add_argument("--region", required=True, help="thigh or calf")
    sp.add_argument("--out", required=True, help="output folder (one training study per input study)")
    sp.add_argument("--mapping", help="JSON file (or shipped name, e.g. huashan_thigh) mapping the labels' ids "
                    "to legcomp names; muscles it never maps to go into the study's label_record.json "
                    "(not learnt as background)")
    sp.add_argument("--unlabelled-slices", choices=["ignore", "background"], default="ignore",
                    help="axial slices where a labelled leg has no muscle label (e.g. hip slices the experts "
                         "left out): 'ignore' (default) sets that leg's side of the slice to 255 in stage2 "
                         "(no label, left out of training); 'background' keeps 0 (learnt as no muscle)")
    sp.add_argument("--weights", help="folder of weights for the stage-1 network (default: bundled)")
    sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("train", cmd_train, "train one network of the cascade on labelled studies (k-fold)")
    from legcomp.training.cli import add_train_arguments
    add_train_arguments(sp)

    for name, func, help in (("predict", cmd_predict, "segment studies: write stage1/stage2 masks only"),
                             ("run", cmd_run, "the main job: segment, quantify, report, for one study or a cohort")):
        sp = add(name, func, help)
        sp.add_argument("input", help="study folder, or a folder of study folders (NIfTI or DICOM)")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--region", choices=["thigh", "calf"],
                        help="thigh or calf (default: from folder names, else detected)")
        sp.add_argument("--weights", help="folder of weights (default: the bundled weights, see their provenance JSONs)")
        sp.add_argument("--device", default="auto", help="auto, cpu or cuda")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.add_argument("--overwrite", action="store_true",
                        help="redo studies whose outputs are complete and were made from the same inputs, weights "
                        "and options (run.json's fingerprint); by default they are skipped")
        sp.add_argument("--keep-ids", action="store_true", help=KEEP_IDS_HELP)
        sp.add_argument("--fix-swap", action="store_true",
                        help="exchange water and fat back where they look swapped (whole series, slices, a leg or a "
                        "region), before segmenting; without it a swap is only reported (stderr, run.json)")
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--workers", type=int, metavar="N",
                           help="run a cohort's studies on a local Dask cluster of N worker processes (one study at "
                           "a time each, CPUs / N torch threads); needs pip install \"legcomp[cluster]\"")
        where.add_argument("--scheduler", metavar="ADDRESS",
                           help="run a cohort's studies on an existing Dask cluster (e.g. tcp://host:8786; dask-"
                           "jobqueue on SLURM/PBS/SGE); its workers must see the input and output folders")
        sp.add_argument("--memory-per-worker", metavar="SIZE",
                        help="with --workers: each worker's memory limit (e.g. 4GB; default: memory / N); a study "
                        "that goes over it fails alone (KilledWorker), after retries on other workers")
        if name == "run":
            sp.add_argument("--fat-rule", default="seed", help=fat_help)
            sp.add_argument("--no-overlay", action="store_true", help="skip the overlay PNG")
            sp.add_argument("--keep-hip", action="store_true", help=HIP_HELP)
            sp.add_argument("--no-report", action="store_true",
                            help="skip report.html (per study) and index.html (per cohort)")
            sp.add_argument("--no-dicom-seg", action="store_true",
                            help="skip segmentation.dcm (DICOM Segmentation object, DICOM input only)")
    return p


def _raise_interrupted(signum: int, frame: object) -> None:
    """Signal handler: SIGTERM becomes an exception, so that temporary folders are removed on the way out."""
    raise Interrupted(signum)


def _stdout_closed() -> int:
    """Exit code 0 after the reader of stdout went away (``legcomp labels | head -2``): not an error.
    Further output is sent to /dev/null so that the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``legcomp`` console script; returns the exit code: 0 done, 1 some studies of a cohort
    failed, 2 bad input (one stderr line), 130 interrupted (SIGINT), 143 terminated (SIGTERM)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, one line on stderr)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    args.command_line = shlex.join(["legcomp", *(sys.argv[1:] if argv is None else argv)])
    previous = _on_sigterm(_raise_interrupted)
    try:
        if getattr(args, "out", None):
            from legcomp.io.atomic import check_output_folder
            check_output_folder(args.out)  # an existing file, or a file on the way: before any work
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except LegcompInputError as exc:
        print(f"legcomp: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output folder, disk full, a file where a folder should be...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"legcomp: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # SIGTERM
        print(f"legcomp: interrupted ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("legcomp: interrupted", file=sys.stderr)
        return 130
    finally:
        _on_sigterm(previous)


def _on_sigterm(handler: object) -> object:
    """Install a SIGTERM handler (only the main thread may); returns the one it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
