"""Re-running a cohort: which studies are already done from the same inputs, weights and options.

``run.json`` records a fingerprint of what made a study's outputs::

    "fingerprint": {"inputs": "<sha256 of the study's input files>",
                    "options": {"region": null, "fat_rule": "seed", ..., "legcomp_version": "0.1.0"},
                    "weights": {"stage1": "<sha256_16>", "stage2": "<sha256_16>"}}

and ``outputs``, the files written. A study is up to date when its run.json has the same fingerprint
and every output it lists is there; ``legcomp run`` then skips it (``--overwrite`` redoes it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from legcomp import __version__
from legcomp.errors import LegcompInputError

NOT_OPTIONS = frozenset({"input", "out", "weights", "device", "progress", "overwrite"})
"""``run_cohort`` parameters that are not result options (weights are fingerprinted by their hashes)."""


def run_options(params: dict) -> dict:
    """The result-changing options among ``run_cohort``'s parameters (every keyword but
    :data:`NOT_OPTIONS`, so that a new option is fingerprinted without further ado), JSON-plain,
    with the legcomp version."""
    opts = {k: v for k, v in params.items() if k not in NOT_OPTIONS and not k.startswith("_")}
    return {**json.loads(json.dumps(opts, sort_keys=True, default=str)), "legcomp_version": __version__}


def input_files(study: Path) -> list[Path]:
    """The files a study is read from: its recognised NIfTI images, else (DICOM) every file below it."""
    from legcomp.io.nifti import classify_files

    study = Path(study)
    folder = study.parent if study.is_file() else study
    images = classify_files(folder)[0]
    if images:
        return sorted(images.values())
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                         for part in p.relative_to(folder).parts))


def input_fingerprint(study: Path) -> str:
    """SHA-256 over the study's input files (relative name, size and content of each)."""
    study = Path(study)
    folder = study.parent if study.is_file() else study
    h = hashlib.sha256()
    for p in input_files(study):
        h.update(f"{p.relative_to(folder).as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_fingerprint(sources: dict) -> dict[str, str]:
    """``{"stage<k>": sha256_16}`` of a cascade's weights files (``Cascade.sources``)."""
    from legcomp.pipeline import _sha256

    return {f"stage{s}": _sha256(str(p)) for s, p in sorted(sources.items())}


def is_up_to_date(target: Path, inputs: str, options: dict, weights: str | None) -> bool:
    """True when ``target/run.json`` records this fingerprint (inputs, options, and the hashes of the
    weights its region would load from ``weights`` now) and every output it lists exists."""
    from legcomp.inference.cascade import cascade_paths

    try:
        rec = json.loads((Path(target) / "run.json").read_text())
        fp = rec["fingerprint"]
        if fp["inputs"] != inputs or fp["options"] != options:
            return False
        if fp["weights"] != weights_fingerprint(cascade_paths(rec["region"], weights)):
            return False
        return all((Path(target) / name).is_file() for name in rec["outputs"])
    except (OSError, ValueError, KeyError, TypeError, LegcompInputError):
        return False
