"""Staged writing of output folders: nothing half-written is ever left behind.

Outputs are written into a hidden temporary folder *inside* the output folder and moved into place
only when complete, so the final rename never crosses a file-system boundary (an output folder that
is a mount point, as with ``docker -v host:/out``, works).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from legcomp.errors import LegcompInputError

TMP_PREFIX = ".legcomp-tmp-"
"""Name prefix of the temporary folders :func:`staged_output` makes (and always removes)."""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\<>:"|?*]+')


def safe_name(text: str, default: str = "study", max_len: int = 120) -> str:
    """``text`` made safe as one file or folder name: path separators, control characters and
    ``<>:"|?*`` become ``_``, leading dots and spaces are dropped (no hidden name, no ``..``), at
    most ``max_len`` characters; ``default`` when nothing is left."""
    name = _UNSAFE.sub("_", str(text)).lstrip(". ").rstrip(". ")[:max_len].rstrip(". ")
    return name or default


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_folder(out_dir: str | Path) -> Path:
    """Raise :class:`LegcompInputError` (one line naming the path) unless ``out_dir`` is, or can be made
    as, a writable folder: not an existing file, no file on its way, writable. Returns it as a Path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LegcompInputError("the output path is an existing file, not a folder", out_dir)
    base = _first_existing(out_dir)
    if not base.is_dir():
        raise LegcompInputError(f"cannot make the output folder: {base} is a file", out_dir)
    if not os.access(base, os.W_OK | os.X_OK):
        raise LegcompInputError("the output folder is not writable", base)
    return out_dir


def _make_folders(out_dir: Path) -> list[Path]:
    """``mkdir -p out_dir``; the folders it created, deepest first."""
    created = []
    p = Path(os.path.abspath(out_dir))
    while not p.exists():
        created.append(p)
        p = p.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return created


@contextmanager
def staged_output(out_dir: str | Path, managed: Sequence[str] = ()) -> Iterator[Path]:
    """Write into a temporary folder inside ``out_dir``; move its files into ``out_dir`` on success.

    Files named in ``managed`` that exist in ``out_dir`` but were not written this time are
    removed (stale results of an earlier run); other files in ``out_dir`` are left alone. On an
    exception (an interrupt included) the temporary folder is deleted and ``out_dir`` is left as it
    was: folders this call made are removed again.

    Example::

        with staged_output("results/s01", managed=["volumes.csv"]) as tmp:
            table.to_csv(tmp / "volumes.csv")
    """
    out_dir = check_output_folder(out_dir)
    created = _make_folders(out_dir)
    done = False
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    try:
        yield tmp
        for name in managed:
            if not (tmp / name).exists():
                (out_dir / name).unlink(missing_ok=True)
        for f in tmp.iterdir():
            target = out_dir / f.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            f.replace(target)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
