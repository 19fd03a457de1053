"""Provenance of trained weights: ``<stem>.provenance.json`` beside every weights file ``legcomp train`` writes.

A JSON object (``"format": "legcomp-training-provenance"``, version :data:`FORMAT_VERSION`) with, among
others: ``trained_on`` (one line naming the data sources, as in the bundled weights' hand-written
provenance files), ``command`` (the command line), ``sources`` (per ``--data`` source: path, weight,
studies found / used / skipped, train and validation studies and cases, draws, ``hash``: SHA-256 over
its studies' input files, ``lacks``: per stage the structures its label records list as unlabelled,
with the number of studies), ``val_sets`` (the ``--val`` folders, likewise), ``skipped`` (unreadable
studies and why), ``split``, ``epochs``, ``steps``, ``seconds``, ``device``, ``network``, ``training``
(hyperparameters), ``init_weights`` (file and SHA-256 or null), ``weights`` (this file: name,
selection ``last`` / ``best-fold`` / ``best-val``, epoch, scores, SHA-256), ``keep`` (which selection
``<stem>.pt`` is), ``legcomp_version``, ``git_commit`` and ``git_dirty`` (null outside a git checkout).

:func:`legcomp.pipeline.process_study` copies each stage's provenance into ``run.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

import legcomp

FORMAT = "legcomp-training-provenance"
FORMAT_VERSION = 1


def provenance_path(weights: str | Path) -> Path:
    """``<stem>.provenance.json`` beside a weights file ``<stem>.pt`` (also ``x.best_val.pt`` ->
    ``x.best_val.provenance.json``)."""
    return Path(weights).with_suffix(".provenance.json")


def sha256_16(path: str | Path) -> str:
    """First 16 hex digits of a file's SHA-256 (as ``run.json`` reports weights)."""
    from legcomp.training.cache import sha256_file

    return sha256_file(path)[:16]


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout legcomp's package is tracked in, else (None, None).

    The package folder must be tracked by that repository (an installed copy inside some other
    repository, e.g. a virtual environment in a checkout, gives None)."""
    root = Path(legcomp.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None, None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
        return head.stdout.strip() or None, (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def studies_hash(items: Iterable[tuple[str, str]]) -> str:
    """SHA-256 (16 hex digits) over (study name, content hash) pairs, order-independent."""
    h = hashlib.sha256()
    for name, content in sorted(items):
        h.update(f"{name}\0{content}\n".encode())
    return h.hexdigest()[:16]


def lacks(records: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per stage, the structures the label records list as unlabelled, with how many studies lack each."""
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        for stage in ("stage1", "stage2"):
            for name in ((rec or {}).get(stage) or {}).get("unlabelled", []) or []:
                out.setdefault(stage, {})
                out[stage][name] = out[stage].get(name, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def write_provenance(weights: str | Path, prov: dict[str, Any]) -> Path:
    """Write ``prov`` (plus the weights file's name and SHA-256) beside ``weights``, atomically."""
    weights = Path(weights)
    doc = dict(prov)
    doc["weights"] = {**dict(prov.get("weights") or {}), "file": weights.name, "sha256_16": sha256_16(weights)}
    path = provenance_path(weights)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)
    return path


def read_provenance(weights: str | Path) -> dict[str, Any]:
    """The provenance beside a weights file (any JSON object: legcomp train's, or a hand-written one);
    ``{"trained_on": "unknown"}`` when there is none, and a note when it cannot be read."""
    path = provenance_path(weights)
    if not path.is_file():
        return {"trained_on": "unknown"}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"trained_on": "unknown", "error": f"{path.name}: unreadable ({type(exc).__name__})"}
    if not isinstance(doc, dict):
        return {"trained_on": "unknown", "error": f"{path.name}: not a JSON object"}
    return doc
