"""The two-stage cascade at inference time.

Stage 1 segments the whole field of view (background / SAT / whole muscle) from water and fat.
Stage 2 then runs once per leg: a box around that leg's stage-1 whole muscle (plus a margin;
its in-plane size set by the slices below the hip, as in training, where no pelvis is cropped)
is cut out, a left leg is mirrored along x to look like a right leg, the region's muscle
network labels it (opposed phase and water), the result is mirrored back and pasted into the
full image, inside the stage-1 whole-muscle mask. Both networks run with MONAI's
sliding-window inference, so memory stays bounded whatever the image size. Each stage also gives a
confidence map: per voxel, the probability its network gave the label it chose
(``Cascade.predict(study, return_confidence=True)``), which volumes.csv averages per structure.

All arrays are canonical (x, y, z) RAS+ as in :class:`legcomp.io.DixonStudy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from legcomp import anatomy
from legcomp.errors import LegcompInputError
from legcomp.io.study import DixonStudy
from legcomp.models import bundled_weights_dir, load_weights, weights_file_name
from legcomp.preprocessing import inputs as prep
from legcomp.preprocessing.legs import hip_slices, midline_islands, side_from_muscles, split_legs

INFERENCE_ROI_MAX = (320, 320, 48)
"""Largest sliding window (voxels x, y, z) at inference; bounds memory whatever the image size."""

LEG_MARGIN_MM = prep.LEG_MARGIN_MM
"""Margin (mm, in-plane) around a leg's stage-1 whole muscle for the stage-2 crop."""


def default_weights_dir() -> Path:
    """Folder of the bundled weights (``<region>_stage<k>.pt``)."""
    return bundled_weights_dir()


def weights_path(region: str, stage: int, weights_dir: str | Path | None = None) -> Path:
    """Path of one network's weights file in a weights folder."""
    folder = Path(weights_dir) if weights_dir else default_weights_dir()
    path = folder / weights_file_name(region, stage)
    if not path.is_file():
        raise LegcompInputError(f"no weights for {region} stage {stage} (expected {path.name})", folder)
    return path


def cascade_paths(region: str, weights_dir: str | Path | None = None) -> dict[int, Path]:
    """Weights file per stage: from ``weights_dir``; a folder that holds only one of the region's two
    networks (e.g. a fine-tuned stage 2) takes the other from the bundled weights."""
    region = anatomy.check_region(region)
    if not weights_dir:
        return {s: weights_path(region, s) for s in (1, 2)}
    have = {s: Path(weights_dir) / weights_file_name(region, s) for s in (1, 2)}
    if not any(p.is_file() for p in have.values()):
        weights_path(region, 1, weights_dir)  # raises: neither network in the folder
    return {s: p if p.is_file() else weights_path(region, s) for s, p in have.items()}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LegcompInputError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise LegcompInputError(f"unsupported device {device!r}; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LegcompInputError("CUDA was asked for but is not available")
    return dev


@dataclass
class Network:
    """A loaded network with its metadata (config, patch size, working spacing...)."""

    model: torch.nn.Module
    meta: dict
    device: torch.device

    def probabilities(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """Class probabilities, float32 (n_classes, x, y, z), for a (C, x, y, z) float32 array.

        Windows (at least the training patch, at most :data:`INFERENCE_ROI_MAX`) slide with 25 %
        overlap and Gaussian blending; logits are accumulated on the CPU, so device memory is
        bounded by the window size whatever the image size.
        """
        div = [int(d) for d in self.meta.get("divisor", (16, 16, 4))]
        patch = [int(r) for r in self.meta.get("patch_size", (128, 128, 32))]
        spatial = image.shape[1:]
        padded = [n + (-n) % d for n, d in zip(spatial, div)]
        # the network is fully convolutional: windows as large as the image up to INFERENCE_ROI_MAX
        # (fewer, less redundant windows), never smaller than the training patch
        cap = [m - m % d for m, d in zip(INFERENCE_ROI_MAX, div)]
        roi = [min(p, max(t, c)) for p, t, c in zip(padded, patch, cap)]
        x = torch.from_numpy(prep.pad_to_multiple(np.asarray(image, np.float32), div, minimum=roi))[None]
        use_amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=use_amp):
            logits = sliding_window_inference(
                x, roi_size=roi, sw_batch_size=1 if self.device.type == "cpu" else 8, predictor=self.model,
                overlap=0.25, mode="gaussian", sw_device=self.device, device=torch.device("cpu"),
                progress=progress)
        prob = torch.softmax(logits[0, :, : spatial[0], : spatial[1], : spatial[2]].float(), dim=0)
        return np.ascontiguousarray(prob.numpy())

    def segment(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        """Label map (uint8, spatial shape of ``image``): the most probable class of :meth:`probabilities`."""
        return self.probabilities(image, progress).argmax(0).astype(np.uint8)


@dataclass
class Cascade:
    """The stage-1 and stage-2 networks of one region."""

    region: str
    stage1: Network
    stage2: Network
    sources: dict = field(default_factory=dict)

    @classmethod
    def load(cls, region: str, weights_dir: str | Path | None = None, device: str = "auto") -> "Cascade":
        """Load a region's two networks from a weights folder (default: the bundled weights; see
        :func:`cascade_paths` for a folder with only one of them)."""
        region = anatomy.check_region(region)
        dev = resolve_device(device)
        nets = {}
        paths = cascade_paths(region, weights_dir)
        for stage, path in paths.items():
            model, meta = load_weights(path, region=region, stage=stage)
            model.to(dev).eval()
            nets[stage] = Network(model, meta, dev)
        return cls(region, nets[1], nets[2], {s: str(p) for s, p in paths.items()})

    def predict(self, study: DixonStudy, *, return_confidence: bool = False
                ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """Stage-1 and stage-2 label maps (uint8, canonical (x, y, z), the study's grid).

        ``return_confidence``: also return ``{1: conf1, 2: conf2}``, per voxel the probability (float32,
        0-1, canonical (x, y, z)) each stage's network gave the label it chose
        (:func:`legcomp.preprocessing.inputs.labels_and_confidence`); ``conf2`` is 1 outside the
        whole muscle. The label maps are the same either way.
        """
        work = prep.to_working(study, self.stage1.meta)
        same_grid = prep.working_spacing(self.stage1.meta) == prep.working_spacing(self.stage2.meta)
        s1, c1 = self.stage1_with_confidence(study, work)
        s2, c2 = self.stage2_with_confidence(study, s1, work if same_grid else None)
        return (s1, s2, {1: c1, 2: c2}) if return_confidence else (s1, s2)

    def predict_stage1(self, study: DixonStudy, work: DixonStudy | None = None) -> np.ndarray:
        """Background (0) / SAT (1) / whole muscle (2) on the study's grid; muscle islands between the
        legs below the hip (the genitals, :func:`legcomp.preprocessing.legs.midline_islands`) are background.

        ``work``: the study already resampled to this network's working grid (saves redoing it).
        """
        return self.stage1_with_confidence(study, work)[0]

    def stage1_with_confidence(self, study: DixonStudy, work: DixonStudy | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_stage1` and its confidence map (float32 (x, y, z), the chosen class's probability)."""
        work = work if work is not None else prep.to_working(study, self.stage1.meta)
        prob = self.stage1.probabilities(prep.stage1_input(work, method=prep.normalisation_of(self.stage1.meta)))
        labels, conf = prep.labels_and_confidence(prob, work, study)
        # muscle-looking islands between the legs below the hip (the genitals) are no leg's muscle
        muscle = labels == anatomy.WHOLE_MUSCLE.id
        if muscle.any():
            islands = midline_islands(muscle, split_legs(labels > 0, study.affine), study.spacing[0], self.region)
            labels[islands] = 0
        return labels, conf

    def _leg_probabilities(self, crop: np.ndarray, mirror: bool) -> np.ndarray:
        """Stage-2 class probabilities (C, x, y, z) of one leg crop; ``mirror`` flips a left leg to look right."""
        if not mirror:
            return self.stage2.probabilities(crop)
        return prep.mirror_x(self.stage2.probabilities(prep.mirror_x(crop)))

    def predict_stage2(self, study: DixonStudy, stage1: np.ndarray, work: DixonStudy | None = None) -> np.ndarray:
        """Individual muscles (anatomy ids), per leg, inside the stage-1 whole muscle.

        Each leg's class probabilities are pasted into one working-grid map (background outside
        the leg's whole muscle), which goes back to the study's grid by linear interpolation.
        ``work``: the study already resampled to this network's working grid (saves redoing it).
        """
        return self.stage2_with_confidence(study, stage1, work)[0]

    def stage2_with_confidence(self, study: DixonStudy, stage1: np.ndarray, work: DixonStudy | None = None
                               ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_stage2` and its confidence map (float32 (x, y, z), the chosen class's probability;
        1 outside the stage-1 whole muscle, where no muscle is labelled)."""
        muscle = stage1 == anatomy.WHOLE_MUSCLE.id
        if not muscle.any():
            return np.zeros(study.shape, np.uint8), np.ones(study.shape, np.float32)
        split = split_legs(stage1 > 0, study.affine)
        legs = split.legs
        work = work if work is not None else prep.to_working(study, self.stage2.meta)
        s1_work = prep.labels_to_working(stage1, study, work)
        legs_work = prep.labels_to_working(legs, study, work)
        # hip/pelvis slices (legs joined above the thighs) do not set the crop boxes' width: the
        # network was trained on crops of legs, not of half a pelvis
        hip = hip_slices(split.coverage, self.region).astype(np.uint8)
        hip_work = prep.resample(hip[None, None, :], (1, 1, work.shape[2]), 0)[0, 0] > 0  # z only
        image = prep.stage2_input(work, s1_work if self.stage2.meta.get("with_stage1") else None,
                                  method=prep.normalisation_of(self.stage2.meta))
        # float16 halves the largest array of a run (n_classes x the working grid); the resampling
        # back to the study's grid works class by class in float32
        full = np.zeros((int(self.stage2.meta["n_classes"]), *work.shape), np.float16)
        full[0] = 1.0  # background wherever no leg's muscle is pasted
        leg_ids = [int(v) for v in np.unique(legs_work[legs_work > 0])]
        for leg_id in leg_ids:
            box = prep.leg_crop_box(s1_work, legs_work, leg_id, work.spacing, LEG_MARGIN_MM, skip_slices=hip_work)
            if box is None:
                continue
            inside = (prep.crop(legs_work, box) == leg_id) & (prep.crop(s1_work, box) == anatomy.WHOLE_MUSCLE.id)
            crop = prep.crop(image, box)
            prob = self._leg_probabilities(crop, mirror=prep.is_left(leg_id))
            if len(leg_ids) == 1:
                # a lone leg's side was only guessed from its position: let the muscles' anatomy
                # decide (lateral muscles lie towards +x in a right leg) and redo it mirrored if needed
                lab = prob.argmax(0)
                probe = np.zeros(work.shape, np.uint8)
                prep.paste(probe, lab, box, where=inside & (lab > 0))
                side = side_from_muscles(probe, self.region, work.affine)
                if side is not None and side != leg_id:
                    prob = self._leg_probabilities(crop, mirror=prep.is_left(side))
            prep.paste(full, prob, box, where=inside)
        s2, conf = prep.labels_and_confidence(full, work, study)
        s2[~muscle] = 0
        conf[~muscle] = 1.0
        return s2, conf
