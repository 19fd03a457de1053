"""Weights files: one torch file holding a network's ``state_dict`` and its metadata.

The file is a dict ``{"format": "legcomp-weights", "format_version": 1, "meta_json": str,
"state_dict": {...}}`` written with :func:`torch.save` and read back with
``torch.load(weights_only=True)`` (no pickled code is ever executed). ``meta_json`` is a JSON
object with at least: ``legcomp_version``, ``config`` (the resolved network config),
``region``, ``stage``, ``n_classes``, ``in_channels``, ``channels`` (input contrasts, in order),
``label_names`` (index = label id, 0 = background), ``normalisation``, ``working_spacing``
(mm, ``null`` = native), ``patch_size`` and ``divisor`` (x, y, z voxels), ``with_stage1``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

import legcomp
from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.models.network import build_network, network_divisor, resolve_config

FORMAT = "legcomp-weights"
FORMAT_VERSION = 1

DEFAULT_CHANNELS = {1: ["water", "fat"], 2: ["opposed_phase", "water"]}
"""Input contrasts of each stage's network, in channel order."""


def bundled_weights_dir() -> Path:
    """Folder of the bundled weights (``<region>_stage<k>.pt`` and provenance JSONs)."""
    return Path(str(resources.files("legcomp") / "data" / "weights"))


def weights_file_name(region: str, stage: int) -> str:
    """File name of one network's weights in a weights folder: ``<region>_stage<k>.pt``."""
    return f"{anatomy.check_region(region)}_stage{int(stage)}.pt"


def bundled_weights(region: str, stage: int) -> Path:
    """The bundled weights file of one network (``legcomp train --init bundled`` starts from it)."""
    return bundled_weights_dir() / weights_file_name(region, stage)


def label_names(stage: int, region: str) -> list[str]:
    """Names of a network's output classes, index = label id (0 = ``background``)."""
    return ["background"] + [lab.name for lab in anatomy.stage_labels(stage, region)]


def _plain_state_dict(model: nn.Module, half: bool = False) -> dict[str, torch.Tensor]:
    """State dict without DDP (``module.``) or torch.compile (``_orig_mod.``) prefixes, on CPU.

    ``half`` stores floating-point tensors as float16 (half the file size; loading casts them
    back to the model's float32).
    """
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu().clone())
            for k, v in inner.state_dict().items()}


def save_weights(path: str | Path, model: nn.Module, *, config: str | dict, region: str, stage: int,
                 n_classes: int | None = None, in_channels: int | None = None,
                 channels_desc: list[str] | None = None, normalisation: dict | None = None,
                 half: bool = True, **extra_meta: Any) -> Path:
    """Write a network and its metadata to one torch file.

    Args:
        path: output file (``.pt``); parent folders are created.
        model: the network (a DDP- or compile-wrapped model is unwrapped).
        config: network config name or dict (stored resolved).
        region: ``thigh`` or ``calf``.
        stage: 1 or 2.
        n_classes: output classes incl. background (default: from :mod:`legcomp.anatomy`).
        in_channels: input channels (default: ``len(channels_desc)``).
        channels_desc: input contrasts in channel order (default per stage, plus ``stage1_muscle``
            when ``with_stage1`` is set in ``extra_meta``).
        normalisation: how inputs were normalised (JSON-able dict).
        half: store floating-point tensors as float16 (default; halves the file size).
        extra_meta: any further JSON-able metadata (patch_size, working_spacing, val_dsc, ...).
    Returns:
        The path written.
    """
    region = anatomy.check_region(region)
    stage = int(stage)
    cfg = resolve_config(config)
    n_classes = int(n_classes if n_classes is not None else anatomy.n_classes(stage, region))
    if channels_desc is None:
        channels_desc = list(DEFAULT_CHANNELS[stage]) + (["stage1_muscle"] if extra_meta.get("with_stage1") else [])
    in_channels = int(in_channels if in_channels is not None else len(channels_desc))
    meta: dict[str, Any] = {
        "legcomp_version": legcomp.__version__,
        "config": cfg,
        "region": region,
        "stage": stage,
        "n_classes": n_classes,
        "in_channels": in_channels,
        "channels": list(channels_desc),
        "label_names": label_names(stage, region),
        "normalisation": normalisation or {},
        "divisor": list(network_divisor(cfg)),
        "with_stage1": False,
        "working_spacing": None,
    }
    meta.update(extra_meta)
    try:
        meta_json = json.dumps(meta)
    except TypeError as exc:
        raise LegcompInputError(f"weights metadata is not JSON-serialisable: {exc}", path) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "meta_json": meta_json,
                "state_dict": _plain_state_dict(model, half)}, tmp)
    tmp.replace(path)
    return path


def read_weights_meta(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a weights file safely: (meta, state_dict). Raises LegcompInputError on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise LegcompInputError("weights file not found", path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, unsafe pickle
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise LegcompInputError(f"not a readable weights file (corrupt or truncated?): {reason}", path) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "state_dict" not in blob:
        raise LegcompInputError("not a legcomp weights file", path)
    if int(blob.get("format_version", 0)) > FORMAT_VERSION:
        raise LegcompInputError(f"weights file format {blob.get('format_version')} is newer than this legcomp "
                                f"supports ({FORMAT_VERSION})", path)
    try:
        meta = json.loads(blob["meta_json"])
    except Exception:
        raise LegcompInputError("weights file metadata is unreadable", path) from None
    for key in ("config", "region", "stage", "n_classes", "in_channels"):
        if key not in meta:
            raise LegcompInputError(f"weights file metadata lacks {key!r}", path)
    return meta, blob["state_dict"]


def load_weights(path: str | Path, *, region: str | None = None, stage: int | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a network from a weights file written by :func:`save_weights`.

    Args:
        path: the ``.pt`` file.
        region, stage: when given, the file must hold weights for this region / stage.
        map_location: device to put the network on.
    Returns:
        ``(model, meta)``: the network in eval mode and its metadata dict.
    Raises:
        LegcompInputError: missing, corrupt or truncated file, not a legcomp file, weights for
            another region or stage, label count or names differing from :mod:`legcomp.anatomy`,
            or a state dict that does not fit the stored config.
    """
    meta, state = read_weights_meta(path)
    w_region, w_stage = str(meta["region"]), int(meta["stage"])
    if region is not None and anatomy.check_region(region) != w_region:
        raise LegcompInputError(f"weights are for region {w_region}, not {region}", path)
    if stage is not None and int(stage) != w_stage:
        raise LegcompInputError(f"weights are for stage {w_stage}, not stage {stage}", path)
    if w_region not in anatomy.REGIONS or w_stage not in (1, 2):
        raise LegcompInputError(f"weights name an unknown region/stage ({w_region}, {w_stage})", path)
    expected = anatomy.n_classes(w_stage, w_region)
    if int(meta["n_classes"]) != expected:
        raise LegcompInputError(f"weights have {meta['n_classes']} classes but {w_region} stage {w_stage} has "
                                f"{expected} (background included)", path)
    names = meta.get("label_names")
    if names is not None and list(names) != label_names(w_stage, w_region):
        raise LegcompInputError(f"weights' label names differ from legcomp's {w_region} stage {w_stage} labels", path)
    try:
        model = build_network(meta["config"], int(meta["in_channels"]), int(meta["n_classes"]))
        model.load_state_dict(state, strict=True)
    except LegcompInputError as exc:
        raise LegcompInputError(f"bad network config in weights: {exc}", path) from None
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise LegcompInputError(f"weights do not fit their network config: {first}", path) from None
    model.to(map_location).eval()
    return model, meta
