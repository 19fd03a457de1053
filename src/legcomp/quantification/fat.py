"""Fat fraction and fat-voxel rules.

Arrays are (x, y, z), canonical RAS+, as held by :class:`legcomp.io.study.DixonStudy`.

Fat rules (strings, as on the command line):

* ``"seed"``: the seed study's rule, exactly: the fat image min-max normalised over the
  whole image, ``(F - F.min()) / (F.max() - F.min())``, is ``>= 0.1``;
* ``"ff:T"``: signal fat fraction ``F / (W + F) >= T`` (T a fraction 0-1; voxels with
  ``W + F <= 0`` have fraction 0);
* ``"sat:T"``: ``F >= T x`` the median fat signal inside subcutaneous fat (needs stage 1);
* ``"abs:V"``: ``F >= V`` (raw signal units).
"""

from __future__ import annotations

import numpy as np

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io.study import DixonStudy

SEED_THRESHOLD = 0.1
"""Threshold of the seed's rule on the min-max normalised fat image."""


def fat_fraction(water: np.ndarray, fat: np.ndarray) -> np.ndarray:
    """Signal fat fraction ``F / (W + F)`` (float32, fraction 0-1, clipped; 0 where ``W + F <= 0``)."""
    w = np.asarray(water, np.float32)
    f = np.asarray(fat, np.float32)
    s = w + f
    out = np.zeros(s.shape, np.float32)
    np.divide(f, s, out=out, where=s > 0)
    return np.clip(out, 0.0, 1.0, out=out)


def parse_fat_rule(rule: str) -> tuple[str, float | None]:
    """Split a rule string into (kind, value); raises LegcompInputError if malformed."""
    r = str(rule).strip().lower()
    if r == "seed":
        return "seed", None
    kind, sep, val = r.partition(":")
    if kind not in ("ff", "sat", "abs") or not sep:
        raise LegcompInputError(f"unknown fat rule {rule!r}; expected seed, ff:T, sat:T or abs:V")
    try:
        v = float(val)
    except ValueError:
        raise LegcompInputError(f"fat rule {rule!r}: {val!r} is not a number") from None
    if not np.isfinite(v):
        raise LegcompInputError(f"fat rule {rule!r}: threshold must be finite")
    if kind == "ff" and not 0.0 <= v <= 1.0:
        raise LegcompInputError(f"fat rule {rule!r}: fat-fraction threshold must lie in 0-1")
    if kind == "sat" and v <= 0:
        raise LegcompInputError(f"fat rule {rule!r}: SAT multiple must be positive")
    return kind, v


def describe_fat_rule(rule: str) -> str:
    """One-line human-readable definition of a fat rule (for provenance)."""
    kind, v = parse_fat_rule(rule)
    return {"seed": f"(F - min F) / (max F - min F) >= {SEED_THRESHOLD} over the whole image (seed study)",
            "ff": f"F / (W + F) >= {v}",
            "sat": f"F >= {v} x median F in subcutaneous fat",
            "abs": f"F >= {v} (signal units)"}[kind]


def fat_mask(study: DixonStudy, rule: str = "seed", *, stage1: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask (x, y, z) of fat voxels by ``rule`` (see the module docstring).

    Args:
        study: the Dixon study (its ``water`` and ``fat`` images are used).
        rule: ``seed``, ``ff:T``, ``sat:T`` or ``abs:V``.
        stage1: stage-1 label map (x, y, z), needed by ``sat:T`` only.
    Raises:
        LegcompInputError: unknown rule, constant fat image (seed), missing/empty SAT (sat:T).
    """
    kind, v = parse_fat_rule(rule)
    f = study.fat
    if kind == "seed":
        lo, hi = float(f.min()), float(f.max())
        if hi <= lo:
            raise LegcompInputError(f"{study.name}: fat image is constant; the seed fat rule cannot normalise it")
        # float64 like the seed (nibabel get_fdata), so ties at the threshold agree
        return (f.astype(np.float64) - lo) / (hi - lo) >= SEED_THRESHOLD
    if kind == "ff":
        return fat_fraction(study.water, f) >= v
    if kind == "abs":
        return f >= v
    if stage1 is None:
        raise LegcompInputError(f"fat rule {rule!r} needs a stage-1 map (subcutaneous fat)")
    sat = np.asarray(stage1) == anatomy.SAT.id
    if sat.shape != f.shape:
        raise LegcompInputError(f"stage-1 map shape {sat.shape} differs from the study's {f.shape}")
    if not sat.any():
        raise LegcompInputError(f"fat rule {rule!r}: the stage-1 map has no subcutaneous fat")
    return f >= v * float(np.median(f[sat]))
