"""Staged writing of output folders: nothing half-written is ever left behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_output(out_dir: str | Path, managed: Sequence[str] = ()) -> Iterator[Path]:
    """Write into a temporary folder beside ``out_dir``; move its files into ``out_dir`` on success.

    Files named in ``managed`` that exist in ``out_dir`` but were not written this time are
    removed (stale results of an earlier run); other files in ``out_dir`` are left alone. On an
    exception the temporary folder is deleted and ``out_dir`` is untouched (not even created).

    Example::

        with staged_output("results/s01", managed=["volumes.csv"]) as tmp:
            table.to_csv(tmp / "volumes.csv")
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in managed:
            if not (tmp / name).exists():
                (out_dir / name).unlink(missing_ok=True)
        for f in tmp.iterdir():
            target = out_dir / f.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            f.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
