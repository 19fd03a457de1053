"""Preprocessing cache for training: each study's network-ready cases stored once as ``.npy`` files.

Building a study's cases (reading the NIfTI/DICOM files, resampling to the working grid,
normalising, cropping each leg for stage 2) costs far more than training needs per study; the
cache does it once and every later run, resumed run and DDP rank reads the arrays back
memory-mapped (``np.load(mmap_mode="r")``).

Key
    An entry is keyed by the SHA-256 (first 32 hex digits) of a JSON object of everything its
    arrays depend on: the SHA-256 of each input file's bytes (the files the reader reads: a NIfTI
    study's contrasts, label maps and label record; every file of a DICOM folder) with their names,
    the study's name, the stage, region, working grid (resolved spacing in mm), normalisation,
    ``with_stage1``, the stage-2 leg margin (mm), legcomp's version, the cache format and a hash of
    the source code that builds cases (:data:`CODE_FILES`), so an edited preprocessing never
    reuses old arrays. File sizes and modification times are not trusted: the bytes are hashed.

Layout
    ``<root>/v<FORMAT>/<key[:2]>/<key>/``: ``manifest.json`` (the key's fields, the study's label
    record, and per case its name and per array its file, shape, dtype, size and SHA-256) and one
    ``c<i>_<image|label|classes>.npy`` per array.

Safety
    An entry is written into a temporary sibling folder and renamed into place once complete
    (atomic: readers see a whole entry or none; two processes building the same entry keep
    one). On read every array file's size, SHA-256, shape and dtype are checked against the
    manifest; an entry that fails (truncated, corrupt, half-deleted, another format) is removed and
    rebuilt, never used. Deleting the cache folder at any time is safe.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import legcomp
from legcomp import anatomy

log = logging.getLogger(__name__)

FORMAT = 1
"""Cache layout version (part of the key and of the folder name)."""

ARRAYS = ("image", "label", "classes")
"""The arrays of a case that are stored."""

CODE_FILES = ("training/data.py", "training/cache.py", "preprocessing/inputs.py", "preprocessing/legs.py",
              "io/nifti.py", "io/study.py", "io/dicom.py", "anatomy.py")
"""legcomp source files (relative to the package) whose content is part of every key."""

_CHUNK = 4 << 20


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/legcomp/training`` (``~/.cache/legcomp/training`` without XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "legcomp" / "training"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def study_files(path: str | Path) -> list[Path]:
    """The files a study's reader reads: a NIfTI folder's contrast images, label maps and label record;
    otherwise (a DICOM folder) every non-hidden file below the folder. Sorted."""
    from legcomp.errors import LegcompInputError
    from legcomp.io.nifti import classify_files

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        images, labels, _ = classify_files(folder)
    except LegcompInputError:
        images, labels = {}, {}
    if images:
        files = list(images.values()) + list(labels.values())
        rec = folder / anatomy.LABEL_RECORD
        if rec.is_file():
            files.append(rec)
        return sorted(files)
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def content_hash(path: str | Path) -> str:
    """SHA-256 over a study's files (:func:`study_files`): each file's name relative to the study folder
    and the SHA-256 of its bytes. Raises OSError when a file cannot be read."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    h = hashlib.sha256()
    for f in study_files(path):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the legcomp source files that build cases (:data:`CODE_FILES`)."""
    root = Path(legcomp.__file__).parent
    h = hashlib.sha256()
    for rel in CODE_FILES:
        p = root / rel
        h.update(rel.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"") + b"\n")
    return h.hexdigest()[:16]


def key_fields(content: str, *, name: str, stage: int, region: str, spacing: Sequence[float | None],
               normalisation: str, with_stage1: bool, margin_mm: float) -> dict[str, Any]:
    """Everything a study's cases depend on (see module doc), as a JSON-able dict."""
    return {"format": FORMAT, "legcomp_version": legcomp.__version__, "code": code_fingerprint(),
            "content_sha256": content, "name": str(name), "stage": int(stage), "region": str(region),
            "working_spacing": [None if s is None else float(s) for s in spacing],
            "normalisation": str(normalisation), "with_stage1": bool(with_stage1), "margin_mm": float(margin_mm)}


def make_key(fields: dict[str, Any]) -> str:
    """The cache key of :func:`key_fields`: first 32 hex digits of the SHA-256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


class CaseCache:
    """A preprocessing cache folder (see module doc).

    Attributes:
        root: the cache folder.
        hits, misses, rebuilt: entries read back, entries missing (built), and entries found
            corrupt or incomplete (removed, then built) by this object.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0

    def entry_dir(self, key: str) -> Path:
        return self.root / f"v{FORMAT}" / key[:2] / key

    # ------------------------------------------------------------------ read
    def load(self, key: str) -> dict | None:
        """The entry ``key``: ``{"cases": [...], "label_record": {...}}`` with memory-mapped read-only arrays,
        or None when there is none. A corrupt or incomplete entry is removed (logged) and None returned."""
        d = self.entry_dir(key)
        if not d.is_dir():
            self.misses += 1
            return None
        try:
            out = self._open(d, key, verify=True)
        except Exception as exc:  # anything wrong with an entry means: rebuild it
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            log.warning("cache entry %s is corrupt or incomplete (%s); rebuilding it", d, reason)
            self._discard(d)
            self.rebuilt += 1
            return None
        self.hits += 1
        return out

    @staticmethod
    def _open(d: Path, key: str, verify: bool) -> dict:
        man = json.loads((d / "manifest.json").read_text())
        if not isinstance(man, dict) or man.get("format") != FORMAT or man.get("key") != key:
            raise ValueError("manifest of another format or key")
        cases = []
        for spec in man["cases"]:
            case: dict[str, Any] = {"name": str(spec["name"])}
            for field in ARRAYS:
                a = spec["arrays"][field]
                f = d / a["file"]
                if f.stat().st_size != int(a["bytes"]):
                    raise ValueError(f"{f.name}: {f.stat().st_size} bytes, manifest says {a['bytes']}")
                if verify and sha256_file(f) != a["sha256"]:
                    raise ValueError(f"{f.name}: checksum mismatch")
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
                if list(arr.shape) != list(a["shape"]) or str(arr.dtype) != a["dtype"]:
                    raise ValueError(f"{f.name}: shape/dtype {arr.shape} {arr.dtype} differ from the manifest")
                case[field] = arr
            cases.append(case)
        return {"cases": cases, "label_record": man.get("label_record") or {}}

    # ------------------------------------------------------------------ write
    def store(self, key: str, fields: dict, cases: Sequence[dict], label_record: dict | None = None) -> dict:
        """Write an entry atomically and return it as :meth:`load` would (memory-mapped arrays).

        When another process has just written the same key, its (verified) entry is used.
        """
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
        try:
            specs = []
            for i, case in enumerate(cases):
                arrays = {}
                for field in ARRAYS:
                    arr = np.ascontiguousarray(case[field])
                    fname = f"c{i}_{field}.npy"
                    # no fsync: a file cut short by a crash fails the size or checksum test and is rebuilt
                    np.save(tmp / fname, arr, allow_pickle=False)
                    arrays[field] = {"file": fname, "shape": list(arr.shape), "dtype": str(arr.dtype),
                                     "bytes": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
                specs.append({"name": str(case["name"]), "arrays": arrays})
            manifest = {"format": FORMAT, "key": key, "fields": fields, "label_record": label_record or {},
                        "cases": specs}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:  # an entry is there already: another process's, or a corrupt one
                other = None
                try:
                    other = self._open(final, key, verify=True)
                except Exception:
                    pass
                if other is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                    return other
                self._discard(final)
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._open(final, key, verify=False)

    @staticmethod
    def _discard(d: Path) -> None:
        """Remove an entry: renamed aside first (atomic), then deleted."""
        trash = d.with_name(f".{d.name}.trash-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(d, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)
