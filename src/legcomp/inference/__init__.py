"""Inference: the two-stage cascade with sliding-window networks, and region detection."""

from legcomp.inference.cascade import Cascade, default_weights_dir, weights_path
from legcomp.inference.region import detect_region

__all__ = ["Cascade", "default_weights_dir", "detect_region", "weights_path"]
