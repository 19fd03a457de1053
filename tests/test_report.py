"""Overlay figures: the crop to the legs and the PNG itself."""

import matplotlib.image as mpimg
import numpy as np

from legcomp.report.overlay import crop_box, save_overlay


def test_crop_box_around_mask_with_margin():
    mask = np.zeros((100, 80, 5), bool)
    mask[20:60, 30:50, 2] = True  # 40 x 20 voxels
    bx, by = crop_box(mask, margin=0.1)
    assert (bx.start, bx.stop) == (16, 64) and (by.start, by.stop) == (28, 52)
    assert crop_box(mask, margin=5.0) == (slice(0, 100), slice(0, 80))  # clipped to the image
    assert crop_box(np.zeros((4, 4, 2), bool)) == (slice(None), slice(None))


def test_overlay_png_is_written_for_a_small_field(tmp_path):
    rng = np.random.default_rng(0)
    water = rng.random((200, 120, 6)).astype(np.float32)
    s1 = np.zeros((200, 120, 6), np.uint8)
    s1[40:90, 30:80], s1[110:160, 30:80] = 1, 1
    s1[50:80, 40:70], s1[120:150, 40:70] = 2, 2
    s2 = np.where(s1 == 2, 3, 0).astype(np.uint8)
    path = save_overlay(water, water * 0.2, s1, s2, "thigh", (1.0, 1.0, 5.0), tmp_path / "o.png", title="t")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
