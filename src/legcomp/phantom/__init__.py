"""Synthetic two-point Dixon thigh and calf phantom with exact ground truth.

``generate(region, seed, ...)`` returns a :class:`Phantom`: water, fat, in-phase, opposed-phase
(float32, axes (x, y, z), RAS+, mm affine) and uint8 label maps ``stage1`` (0 background,
1 SAT incl. skin, 2 whole muscle = everything inside the deep fascia except bone), ``stage2`` (the
region's muscle ids from :mod:`legcomp.anatomy`) and ``legs`` (1 left, 2 right), plus ``truth``
(exact volumes in mL and fat in mL / fraction per leg and structure).

What is modelled
    Both legs (or one), each with its own rotation, position and asymmetry; the left leg mirrors
    the right (medial toward the midline). Femur, or tibia (triangular, subcutaneous anteromedially)
    and fibula, with cortex and fatty marrow. The 13 thigh / 9 calf muscles as cells of a weighted,
    anisotropic, domain-warped Voronoi partition inside the deep fascia, seeded in their
    compartments and interpolated along z, so bellies taper, appear and vanish (gluteus maximus and
    adductor brevis/pectineus proximal, vastus medialis distal, gastrocnemius heads proximal,
    soleus mid-calf, FDL/FHL distal). Intermuscular fat septa (thicker between compartments), fat
    pads, deep and saphenous vessels, fascia, SAT of subject-dependent, angle-dependent thickness
    with fibrous septa, skin. Fat infiltration per muscle: healthy 2-8 % + infiltration x
    susceptibility, as diffuse, patchy (favouring muscle borders) and streaky fat. Signal
    W = PD(1-FF), F = PD*FF on a sub-voxel grid (>= 3x per axis, z also <= 2.5 mm) block-averaged
    to the output (true partial volume); labels by plurality of sub-voxels. Smooth multiplicative
    bias, Rician noise, optional fat-water swap, slice gaps. ``randomize=True``: random tissue
    PD/FF contrast (sometimes implausible), scale, bias, SNR 8-80, blur, k-space truncation
    (Gibbs), phase-encoding ghosts, background masking, and random grid (in-plane 0.7-2 mm, slices
    3-25 mm, FOV/coverage), leg separation, offset, infiltration and adiposity.

What is not modelled
    Pelvis, hip and knee joints (anatomy is clamped beyond the thigh/calf), patella, tendons as
    separate structures, nerves, muscle fibre direction beyond z-elongated texture, T2*/multi-peak
    fat spectrum, phase errors other than the swap blob, chemical-shift displacement, motion other
    than ghosts, coil-array noise correlation, oedema, intramuscular vessels.

Real anatomy
    :mod:`legcomp.phantom.synth` (``legcomp synth``) renders the same signal model on anatomy taken
    from a real muscle label map (SynthSeg-style), with the tissues the map lacks built from it.
"""

from legcomp.phantom.generator import DEFAULT_FOV_MM, Phantom, generate, generate_cohort, write_phantom
from legcomp.phantom.preview import save_preview
from legcomp.phantom.synth import load_source, synth_cohort, synthesize

__all__ = ["Phantom", "generate", "write_phantom", "generate_cohort", "save_preview", "DEFAULT_FOV_MM",
           "load_source", "synthesize", "synth_cohort"]
