"""Translate foreign label maps (other tools' ids) into legcomp's label ids.

A mapping file is JSON::

    {"region": "thigh", "stage": 2, "source": "where the ids come from",
     "map": {"1": "sartorius", "8": "biceps_femoris", "11": "biceps_femoris", "12": null}}

Keys are foreign integer ids, values legcomp structure names of
:mod:`legcomp.anatomy` (several foreign ids may share one name); ``null`` means
"ignore this id" (it becomes background). Foreign id 0 is background unless mapped.
Shipped mappings (``legcomp/data/mappings/*.json``) can be named without a path,
e.g. ``"huashan_thigh"``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from legcomp import anatomy
from legcomp.errors import LegcompInputError


class LabelMapping(dict):
    """Foreign id -> legcomp structure name (or None = ignore), with the file's metadata.

    Attributes:
        region: ``thigh`` / ``calf`` (or None when the file does not say).
        stage: 1 or 2: which legcomp label map the mapped ids belong to.
        source: free text naming the origin of the foreign ids.
        path: the file it was read from.
    """

    def __init__(self, items: dict[int, str | None], *, region: str | None = None, stage: int | None = None,
                 source: str = "", path: str = ""):
        super().__init__(items)
        self.region = region
        self.stage = stage
        self.source = source
        self.path = path


def shipped_mappings() -> list[str]:
    """Names of the mappings shipped with legcomp (usable instead of a path)."""
    root = resources.files("legcomp") / "data" / "mappings"
    try:
        return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".json") else p.name
    if str(p) in (name, name + ".json") and name in shipped_mappings():
        return Path(str(resources.files("legcomp") / "data" / "mappings" / f"{name}.json"))
    raise LegcompInputError(f"mapping file not found (shipped mappings: {', '.join(shipped_mappings()) or 'none'})", path)


def load_label_mapping(path: str | Path) -> LabelMapping:
    """Read a label-mapping JSON file (or a shipped mapping's name).

    Returns:
        :class:`LabelMapping` (a dict foreign id -> legcomp name or None).
    Raises:
        LegcompInputError: unreadable file, bad JSON, non-integer ids, unknown names.
    """
    p = _resolve(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LegcompInputError(f"cannot read mapping JSON ({str(exc).splitlines()[0]})", p) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("map"), dict):
        raise LegcompInputError('mapping JSON needs an object "map": {foreign id: legcomp name}', p)
    region = doc.get("region")
    if region is not None:
        region = anatomy.check_region(region)
    stage = doc.get("stage")
    if stage is not None and stage not in (1, 2):
        raise LegcompInputError(f"mapping stage must be 1 or 2, got {stage!r}", p)
    items: dict[int, str | None] = {}
    for k, v in doc["map"].items():
        try:
            fid = int(k)
        except ValueError:
            raise LegcompInputError(f"mapping key {k!r} is not an integer label id", p) from None
        if fid < 0:
            raise LegcompInputError(f"mapping key {k!r} is negative", p)
        if v is not None and not isinstance(v, str):
            raise LegcompInputError(f"mapping value for {k} must be a structure name or null", p)
        items[fid] = v
    mapping = LabelMapping(items, region=region, stage=stage, source=str(doc.get("source", "")), path=str(p))
    if region is not None:
        mapping_stage(mapping, region, path=p)  # validates names
    return mapping


def mapping_stage(mapping: dict[int, str | None], region: str, path: object | None = None) -> int:
    """The legcomp stage (1 or 2) the mapping's names belong to; all must share one stage."""
    region = anatomy.check_region(region)
    stages = set()
    for name in mapping.values():
        if name is None:
            continue
        try:
            stages.add(anatomy.label_by_name(name, region).stage)
        except LegcompInputError:
            raise LegcompInputError(f"mapping names unknown {region} structure {name!r}", path) from None
    declared = getattr(mapping, "stage", None)
    if declared is not None:
        stages.add(declared)
    if len(stages) > 1:
        raise LegcompInputError("mapping mixes stage-1 and stage-2 structures", path)
    return stages.pop() if stages else (declared or 2)


def apply_label_mapping(labels: np.ndarray, mapping: dict[int, str | None], region: str | None = None,
                        path: object | None = None) -> np.ndarray:
    """Relabel a foreign label map to legcomp ids (uint8, same shape).

    Args:
        labels: integer label array (any axis order; the values are translated voxelwise).
        mapping: foreign id -> legcomp name or None (see :func:`load_label_mapping`).
        region: region whose structures the names refer to (default: the mapping's own).
        path: file name used in error messages.
    Raises:
        LegcompInputError: an id present in ``labels`` is not in the mapping, or a name is unknown.
    """
    region = region or getattr(mapping, "region", None)
    if region is None:
        raise LegcompInputError("the label mapping needs a region (thigh or calf)", path)
    mapping_stage(mapping, region, path)
    arr = np.asarray(labels)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer)):
        if not np.all(arr == np.round(arr)) or (arr < 0).any():
            raise LegcompInputError("label map must hold non-negative integers", path)
    arr = arr.astype(np.int64, copy=False)
    if (arr < 0).any():
        raise LegcompInputError("label map must hold non-negative integers", path)
    present = np.unique(arr)
    missing = [int(v) for v in present if v != 0 and int(v) not in mapping]
    if missing:
        raise LegcompInputError(f"label ids {missing} are not in the mapping (map them to null to ignore them)", path)
    lut = np.zeros(int(present.max(initial=0)) + 1, np.uint8)
    for fid, name in mapping.items():
        if fid < lut.size:
            lut[fid] = 0 if name is None else anatomy.label_by_name(name, region).id
    return lut[arr]
