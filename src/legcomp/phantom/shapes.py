"""Cross-sectional anatomy of the phantom: tissue codes, muscle layouts, subject models, rasterisation.

Every leg is described in a *local* frame: ``l`` points lateral, ``a`` anterior (mm, origin at the
leg's centre). The left leg is the mirror image of the right one (``l = -x`` there), so medial is
always toward the body midline. Along the leg a normalised coordinate ``t`` runs from 0 (distal:
knee for the thigh, ankle for the calf) to 1 (proximal: groin/gluteal fold, knee).

Muscles are cells of a multiplicatively weighted, anisotropic Voronoi partition of the region inside
the deep fascia (seeds and weights interpolated along ``t``, coordinates warped by smooth random
displacement), which gives irregular, curved, touching muscle bellies that taper, appear and vanish
along z. Thin fat septa lie where two cells meet. Bones, vessels and fat pads are drawn on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from legcomp import anatomy

# --- tissue codes of one leg (the fine label of a sub-voxel is code + LEG_STRIDE * (leg_id - 1)) ----------
BG, SKIN, SAT, SAT_VESSEL, FASCIA, IMAT, VESSEL, CORTEX, MARROW = range(9)
MUSCLE0 = 9
"""A muscle with anatomy id ``k`` has tissue code ``MUSCLE0 + k``."""
ORGAN = MUSCLE0
"""Soft tissue outside the legs (genitals between the upper thighs): water signal, neither SAT nor muscle
nor leg (the code ``MUSCLE0`` itself is no muscle's)."""
LEG_STRIDE = 32
UNNAMED = LEG_STRIDE - 2
"""Muscle that is one of the muscles a synthesised study's source map does not label (label-driven
synthesis only): muscle signal, whole muscle in stage 1, :data:`legcomp.anatomy.UNNAMED_MUSCLE` in stage 2."""
N_CODES = 2 * LEG_STRIDE
TISSUE_NAMES = {BG: "background", SKIN: "skin", SAT: "sat", SAT_VESSEL: "sat_vessel", FASCIA: "fascia",
                IMAT: "intermuscular_fat", VESSEL: "vessel", CORTEX: "cortex", MARROW: "marrow", ORGAN: "organ"}

T_KEYS = np.linspace(0.0, 1.0, 6)
"""Keyframe positions along the leg (0 distal .. 1 proximal) of every z-varying table below."""

_NTH = 360
WEIGHT_ZERO = 0.4
"""Seed weight at which a cell has its plain Voronoi size; smaller weights shrink it."""
WEIGHT_MM = 0.35
"""Additive weight (fraction of the fascia radius) per unit of seed weight."""
MUSCLE_SIZE_SD = 0.12
"""Default log-normal spread of each muscle's size weight between subjects (``randomize`` draws up to 0.35)."""
_TH = np.linspace(-np.pi, np.pi, _NTH + 1)


# --- layout tables ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedSpec:
    """One Voronoi seed of a muscle (or of an intermuscular fat pad, label ``"imat"``).

    ``pos``: (l, a) as fractions of the mean fascia radius, one pair or one per ``T_KEYS``;
    ``weight``: relative cell size per ``T_KEYS`` (0 = absent); ``aspect``/``angle``: elongation of the
    cell along a local direction (deg; 0 lateral, 90 anterior); ``comp``: fascial compartment.
    """

    label: str
    comp: int
    pos: tuple
    weight: tuple
    aspect: float = 1.0
    angle: float = 0.0


@dataclass(frozen=True)
class BoneSpec:
    """A long bone: centre (fractions of fascia radius) and outer radius / cortex (mm) per ``T_KEYS``."""

    name: str
    pos: tuple
    radius: tuple
    cortex: tuple
    lobes: tuple = ()  # (k, amplitude, phase_deg): shape harmonics, e.g. the triangular tibia
    hug: tuple = ()  # (from_deg, to_deg): sector where the bone is subcutaneous (fascia wraps it)


@dataclass(frozen=True)
class VesselSpec:
    """A vessel: deep (``pos`` as fractions) or subcutaneous (``sat_angle`` deg, mid-depth of SAT)."""

    name: str
    radius: float
    pos: tuple = ()
    sat_angle: float | None = None
    t_range: tuple = (0.0, 1.0)
    pad: float = 2.0  # fat around the vessel, mm
    kind: str = "vein"


@dataclass(frozen=True)
class RegionSpec:
    """Everything region-specific: fascia radius (mm) per ``T_KEYS``, SAT profile, leg length, layout."""

    name: str
    fascia_radius: tuple
    leg_length: float
    t_centre: float
    sat_base: float  # SAT thickness (mm) at adiposity 0
    sat_gain: float  # extra SAT thickness (mm) at adiposity 1
    sat_profile: tuple  # (angle_deg, relative thickness) around the leg, interpolated periodically
    shape: tuple  # (k, amplitude, phase_deg) harmonics of the fascia outline per T_KEYS (amplitudes)
    seeds: tuple
    bones: tuple
    vessels: tuple
    susceptibility: dict  # muscle name -> prior susceptibility to fatty infiltration 0..1
    gap: float  # default skin-to-skin gap between the legs (mm)


def _k(*v: float) -> tuple:
    return tuple(float(x) for x in v)


THIGH = RegionSpec(
    name="thigh",
    fascia_radius=_k(34, 45, 53, 58, 63, 68),
    leg_length=420.0,
    t_centre=0.62,
    sat_base=4.0, sat_gain=22.0,
    sat_profile=((0, 0.8), (90, 0.85), (150, 1.1), (200, 1.25), (270, 1.2), (330, 0.9), (360, 0.8)),
    shape=((2, (0.05, 0.06, 0.07, 0.07, 0.08, 0.09), 20.0), (3, (0.03,) * 6, 80.0)),
    seeds=(
        SeedSpec("rectus_femoris", 0, ((0.0, 0.62), (0.0, 0.66), (0.0, 0.70), (0.02, 0.72), (0.06, 0.72), (0.12, 0.70)),
                 _k(0.0, 0.16, 0.30, 0.38, 0.42, 0.40), 1.25, 0),
        SeedSpec("vastus_lateralis", 0, ((0.55, 0.22), (0.60, 0.20), (0.62, 0.18), (0.62, 0.16), (0.60, 0.14), (0.58, 0.12)),
                 _k(0.50, 0.62, 0.64, 0.62, 0.58, 0.48), 1.5, 100),
        SeedSpec("vastus_intermedius", 0, ((0.05, 0.32), (0.08, 0.34), (0.12, 0.36), (0.15, 0.36), (0.22, 0.36), (0.28, 0.33)),
                 _k(0.46, 0.64, 0.68, 0.66, 0.60, 0.46), 1.6, 10),
        SeedSpec("vastus_intermedius", 0, ((0.35, 0.12), (0.38, 0.08), (0.40, 0.06), (0.42, 0.06), (0.45, 0.06), (0.50, 0.04)),
                 _k(0.20, 0.30, 0.34, 0.34, 0.30, 0.22), 1.6, 100),
        SeedSpec("vastus_medialis", 0, ((-0.38, 0.40), (-0.42, 0.42), (-0.42, 0.45), (-0.36, 0.52), (-0.30, 0.55), (-0.25, 0.55)),
                 _k(0.92, 0.92, 0.80, 0.60, 0.40, 0.20), 1.3, 40),
        SeedSpec("sartorius", 0, ((-0.78, -0.30), (-0.82, -0.05), (-0.78, 0.22), (-0.65, 0.50), (-0.50, 0.70), (-0.30, 0.82)),
                 _k(0.34, 0.40, 0.42, 0.42, 0.42, 0.40), 1.8, 120),
        SeedSpec("gracilis", 1, ((-0.98, -0.44), (-1.08, -0.34), (-1.12, -0.24), (-1.14, -0.16), (-1.14, -0.08), (-1.12, 0.0)),
                 _k(0.03, 0.03, 0.04, 0.04, 0.04, 0.04), 2.6, 80),
        SeedSpec("biceps_femoris", 2, ((0.38, -0.55), (0.42, -0.55), (0.44, -0.55), (0.42, -0.58), (0.38, -0.62), (0.32, -0.64)),
                 _k(0.50, 0.58, 0.62, 0.60, 0.52, 0.32), 1.3, 60),
        SeedSpec("biceps_femoris", 2, ((0.45, -0.28), (0.46, -0.25), (0.46, -0.22), (0.44, -0.2), (0.40, -0.18), (0.36, -0.16)),
                 _k(0.45, 0.48, 0.38, 0.12, 0.0, 0.0), 1.2, 30),
        SeedSpec("semitendinosus", 2, ((-0.25, -0.74), (-0.20, -0.78), (-0.15, -0.80), (-0.10, -0.82), (-0.05, -0.82), (0.0, -0.78)),
                 _k(0.34, 0.52, 0.64, 0.68, 0.64, 0.54), 1.3, 10),
        SeedSpec("semimembranosus", 2, ((-0.40, -0.45), (-0.42, -0.50), (-0.42, -0.52), (-0.40, -0.55), (-0.36, -0.58), (-0.30, -0.58)),
                 _k(0.55, 0.56, 0.48, 0.38, 0.28, 0.18), 1.3, 40),
        SeedSpec("adductor_brevis_pectineus", 1, ((-0.30, 0.15), (-0.30, 0.15), (-0.32, 0.18), (-0.34, 0.22), (-0.36, 0.26), (-0.36, 0.32)),
                 _k(0.0, 0.0, 0.0, 0.0, 0.40, 0.52), 1.3, 60),
        SeedSpec("adductor_longus", 1, ((-0.55, 0.20), (-0.55, 0.20), (-0.56, 0.22), (-0.58, 0.26), (-0.58, 0.32), (-0.55, 0.40)),
                 _k(0.0, 0.0, 0.22, 0.42, 0.52, 0.50), 1.4, 30),
        SeedSpec("adductor_magnus_quadratus_femoris", 1, ((-0.20, -0.15), (-0.22, -0.18), (-0.26, -0.18), (-0.28, -0.15), (-0.30, -0.12), (-0.28, -0.10)),
                 _k(0.15, 0.42, 0.52, 0.58, 0.58, 0.55), 1.4, 160),
        SeedSpec("gluteus_maximus", 3, ((0.45, -0.82), (0.45, -0.82), (0.45, -0.82), (0.45, -0.82), (0.42, -0.80), (0.35, -0.78)),
                 _k(0.0, 0.0, 0.0, 0.22, 0.66, 0.90), 2.0, 150),
        SeedSpec("imat", 2, ((0.0, -0.45), (0.02, -0.42), (0.04, -0.40), (0.05, -0.38), (0.06, -0.36), (0.08, -0.34)),
                 _k(0.40, 0.05, 0.03, 0.03, 0.03, 0.03), 1.0, 0),
    ),
    bones=(BoneSpec("femur", ((0.05, 0.08), (0.06, 0.08), (0.08, 0.08), (0.11, 0.07), (0.16, 0.06), (0.22, 0.04)),
                    _k(24.0, 14.0, 13.0, 13.0, 14.0, 16.0), _k(1.8, 4.0, 5.5, 5.5, 5.0, 4.0),
                    ((2, 0.05, 0.0), (3, 0.04, -90.0))),),
    vessels=(
        VesselSpec("femoral_artery", 3.2, ((0.0, -0.40), (-0.12, -0.30), (-0.40, 0.02), (-0.50, 0.32), (-0.45, 0.50), (-0.35, 0.60)),
                   kind="artery", pad=2.5),
        VesselSpec("femoral_vein", 4.2, ((0.08, -0.46), (-0.05, -0.37), (-0.36, -0.06), (-0.48, 0.24), (-0.44, 0.42), (-0.32, 0.52)),
                   kind="vein", pad=2.5),
        VesselSpec("deep_femoral_artery", 2.4, ((-0.12, -0.08),) * 6, t_range=(0.45, 1.0), kind="artery", pad=1.5),
        VesselSpec("great_saphenous_vein", 2.3, sat_angle=190.0, kind="vein", pad=0.0),
    ),
    susceptibility={"rectus_femoris": 0.55, "vastus_lateralis": 0.45, "vastus_intermedius": 0.5,
                    "vastus_medialis": 0.45, "sartorius": 0.15, "gracilis": 0.2, "biceps_femoris": 0.85,
                    "semitendinosus": 0.8, "semimembranosus": 0.85, "adductor_brevis_pectineus": 0.7,
                    "adductor_longus": 0.7, "adductor_magnus_quadratus_femoris": 0.95, "gluteus_maximus": 0.8},
    gap=40.0,
)

CALF = RegionSpec(
    name="calf",
    fascia_radius=_k(24, 31, 42, 50, 53, 49),
    leg_length=380.0,
    t_centre=0.60,
    sat_base=2.5, sat_gain=12.0,
    sat_profile=((0, 1.0), (60, 0.8), (110, 0.35), (150, 0.8), (220, 1.1), (270, 1.05), (330, 1.0), (360, 1.0)),
    shape=((2, (0.04, 0.05, 0.06, 0.07, 0.07, 0.06), 0.0), (1, (0.0, 0.02, 0.05, 0.07, 0.07, 0.05), -90.0)),
    seeds=(
        SeedSpec("gastrocnemius_medialis", 3, ((-0.35, -0.80), (-0.35, -0.80), (-0.35, -0.80), (-0.36, -0.74), (-0.36, -0.70), (-0.34, -0.66)),
                 _k(0.0, 0.0, 0.30, 0.70, 0.88, 0.88), 1.7, 20),
        SeedSpec("gastrocnemius_lateralis", 3, ((0.33, -0.80), (0.33, -0.80), (0.33, -0.80), (0.34, -0.74), (0.36, -0.70), (0.36, -0.66)),
                 _k(0.0, 0.0, 0.0, 0.42, 0.62, 0.66), 1.7, 160),
        SeedSpec("soleus", 3, ((0.0, -0.35), (0.0, -0.40), (0.0, -0.38), (0.0, -0.32), (0.0, -0.28), (0.0, -0.22)),
                 _k(0.25, 0.50, 0.62, 0.56, 0.42, 0.05), 2.2, 0),
        SeedSpec("soleus", 3, ((-0.42, -0.25), (-0.45, -0.28), (-0.48, -0.25), (-0.50, -0.20), (-0.50, -0.15), (-0.45, -0.10)),
                 _k(0.10, 0.30, 0.45, 0.42, 0.30, 0.0), 1.3, 50),
        SeedSpec("soleus", 3, ((0.42, -0.35), (0.45, -0.38), (0.48, -0.35), (0.50, -0.32), (0.50, -0.28), (0.45, -0.22)),
                 _k(0.10, 0.30, 0.45, 0.42, 0.30, 0.0), 1.3, 130),
        SeedSpec("flexor_digitorum_longus", 2, ((-0.30, 0.0), (-0.32, 0.02), (-0.34, 0.04), (-0.34, 0.06), (-0.32, 0.08), (-0.30, 0.10)),
                 _k(0.28, 0.34, 0.34, 0.28, 0.14, 0.0), 1.2, 90),
        SeedSpec("flexor_hallucis_longus", 2, ((0.30, -0.25), (0.32, -0.22), (0.34, -0.20), (0.35, -0.18), (0.36, -0.16), (0.36, -0.14)),
                 _k(0.60, 0.70, 0.70, 0.58, 0.24, 0.0), 1.2, 90),
        SeedSpec("tibialis_posterior", 2, ((0.10, 0.10), (0.10, 0.12), (0.10, 0.14), (0.10, 0.15), (0.10, 0.16), (0.10, 0.16)),
                 _k(0.15, 0.28, 0.38, 0.42, 0.40, 0.20), 1.3, 0),
        SeedSpec("peroneus_longus_brevis", 1, ((0.70, 0.10), (0.74, 0.08), (0.78, 0.06), (0.80, 0.06), (0.80, 0.08), (0.78, 0.10)),
                 _k(0.14, 0.28, 0.34, 0.34, 0.30, 0.20), 1.5, 95),
        SeedSpec("tibialis_anterior", 0, ((0.12, 0.66), (0.12, 0.64), (0.14, 0.62), (0.16, 0.60), (0.18, 0.58), (0.18, 0.56)),
                 _k(0.18, 0.33, 0.43, 0.47, 0.47, 0.40), 1.3, 70),
        SeedSpec("extensor_hallucis_digitorum_longus", 0, ((0.42, 0.55), (0.44, 0.50), (0.46, 0.46), (0.48, 0.42), (0.48, 0.40), (0.48, 0.38)),
                 _k(0.32, 0.36, 0.34, 0.30, 0.25, 0.16), 1.4, 70),
        SeedSpec("imat", 3, ((0.0, -0.6),) * 6, _k(0.06, 0.06, 0.04, 0.03, 0.03, 0.03), 1.0, 0),
    ),
    bones=(BoneSpec("tibia", ((-0.34, 0.50), (-0.36, 0.52), (-0.37, 0.52), (-0.36, 0.50), (-0.33, 0.47), (-0.26, 0.40)),
                    _k(11.5, 10.0, 10.5, 11.5, 13.5, 21.0), _k(3.0, 4.5, 5.0, 4.5, 3.5, 2.0),
                    ((3, 0.12, 90.0), (2, 0.05, 0.0)), hug=(95.0, 200.0)),
           BoneSpec("fibula", ((0.52, -0.02), (0.55, -0.02), (0.56, -0.04), (0.58, -0.05), (0.60, -0.06), (0.60, -0.08)),
                    _k(6.5, 5.5, 5.5, 6.0, 6.5, 7.5), _k(2.5, 2.6, 2.8, 2.8, 2.6, 2.4), ((3, 0.1, 30.0),))),
    vessels=(
        VesselSpec("anterior_tibial", 1.8, ((0.20, 0.24), (0.20, 0.26), (0.20, 0.28), (0.20, 0.28), (0.22, 0.28), (0.22, 0.26)),
                   kind="artery", pad=1.2),
        VesselSpec("posterior_tibial", 2.2, ((-0.20, -0.10), (-0.18, -0.10), (-0.16, -0.10), (-0.14, -0.08), (-0.12, -0.06), (-0.10, -0.05)),
                   kind="vein", pad=1.8),
        VesselSpec("peroneal", 1.8, ((0.36, -0.08), (0.36, -0.08), (0.36, -0.08), (0.36, -0.06), (0.34, -0.04), (0.32, -0.02)),
                   t_range=(0.0, 0.85), kind="vein", pad=1.5),
        VesselSpec("great_saphenous_vein", 1.8, sat_angle=165.0, kind="vein", pad=0.0),
        VesselSpec("small_saphenous_vein", 1.6, sat_angle=268.0, kind="vein", pad=0.0),
    ),
    susceptibility={"gastrocnemius_medialis": 0.95, "gastrocnemius_lateralis": 0.75, "soleus": 0.85,
                    "flexor_digitorum_longus": 0.45, "flexor_hallucis_longus": 0.5, "tibialis_posterior": 0.3,
                    "peroneus_longus_brevis": 0.6, "tibialis_anterior": 0.25,
                    "extensor_hallucis_digitorum_longus": 0.35},
    gap=45.0,
)

REGION_SPECS = {"thigh": THIGH, "calf": CALF}


# --- per-subject / per-leg models -----------------------------------------------------------------------
def _keys(v: tuple | np.ndarray, n: int = 2) -> np.ndarray:
    """Expand a single value / pair to one row per T_KEYS."""
    a = np.asarray(v, dtype=np.float64)
    if a.ndim == (0 if n == 1 else 1):
        a = np.broadcast_to(a, (len(T_KEYS),) + a.shape)
    return np.array(a, dtype=np.float64)


def _at(t: float, keys: np.ndarray) -> np.ndarray:
    """Linear interpolation of a (len(T_KEYS), ...) table at ``t`` (clamped to 0..1)."""
    t = min(max(t, 0.0), 1.0)
    f = t * (len(T_KEYS) - 1)
    i = min(int(f), len(T_KEYS) - 2)
    w = f - i
    return keys[i] * (1.0 - w) + keys[i + 1] * w


@dataclass
class LegModel:
    """All geometry of one leg of one subject (mm, local frame; see module docstring)."""

    leg_id: int  # anatomy.LEGS id: 1 left, 2 right
    mirror: float  # +1 right leg, -1 left leg
    centre: np.ndarray  # (len(T_KEYS), 2) world x, y of the leg centre (mm)
    rotation: float  # external rotation (rad)
    fascia_radius: np.ndarray  # (K,) mm
    shape: np.ndarray  # (K, n_harm, 2): cos/sin amplitudes of harmonics 1..n_harm
    sat_thickness: np.ndarray  # (_NTH+1,) mm around the leg
    sat_shape: np.ndarray  # (n_harm2, 2) relative modulation
    posterior_flat: float  # fraction of radius where the posterior side is flattened by the table
    skin: float
    fascia: float
    seed_label: np.ndarray  # (S,) tissue code per seed
    seed_comp: np.ndarray  # (S,)
    seed_pos: np.ndarray  # (S, K, 2)
    seed_weight: np.ndarray  # (S, K)
    seed_aspect: np.ndarray  # (S,)
    seed_angle: np.ndarray  # (S,) rad
    septum: float  # septum thickness inside a compartment, mm
    septum_comp: float  # septum thickness between compartments, mm
    warp: np.ndarray  # (n, 6): kx, ky, kz, phase, amp_l, amp_a
    bones: list = field(default_factory=list)  # dicts: pos (K,2), radius (K,), cortex (K,), lobes
    vessels: list = field(default_factory=list)  # dicts: pos (K,2) or sat_angle, radius, t_range, pad, code
    length: float = 400.0
    t_centre: float = 0.5

    def t_of_z(self, z: float) -> float:
        """Normalised position along the leg (0 distal, 1 proximal) of world z (mm)."""
        return self.t_centre + z / self.length

    def mean_skin_radius(self, t: float) -> float:
        """Approximate outer radius (mm) at ``t`` (for placing the legs)."""
        return float(_at(t, self.fascia_radius) + self.sat_thickness.mean() + self.skin)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)


def muscle_code(name: str, region: str) -> int:
    """Tissue code of a muscle (by anatomy name) or of intermuscular fat (``"imat"``)."""
    if name == "imat":
        return IMAT
    return MUSCLE0 + anatomy.label_by_name(name, region).id


def sample_subject(region: str, rng: np.random.Generator, *, legs: str = "both", adiposity: float = 0.5,
                   infiltration: float = 0.3, separation: float | None = None, offset: tuple = (0.0, 0.0),
                   variability: float = 1.0, size_sd: float = MUSCLE_SIZE_SD) -> list[LegModel]:
    """Draw one subject's legs (shared subject traits plus per-leg asymmetry).

    ``variability`` scales all random deviations from the template (0 = the mean subject);
    ``size_sd``: log-normal spread of each muscle's size weight (atrophy / hypertrophy of single muscles);
    ``separation``: skin-to-skin gap between the legs (mm); ``offset``: shift (x, y) of both legs (mm).
    """
    spec = REGION_SPECS[region]
    v = float(variability)
    K = len(T_KEYS)
    # subject traits
    bulk = 1.0 + v * rng.uniform(-0.15, 0.15)
    taper = 1.0 + v * rng.uniform(-0.08, 0.08)
    length = spec.leg_length * (1.0 + v * rng.uniform(-0.1, 0.1))
    sat_mean = spec.sat_base + spec.sat_gain * adiposity * (1.0 + v * rng.uniform(-0.25, 0.25))
    subj_shape = v * rng.normal(0, 1, (K, 5, 2))
    subj_seed_jit = v * rng.normal(0, 0.035, (len(spec.seeds), K, 2))
    subj_seed_w = np.exp(v * rng.normal(0, size_sd, len(spec.seeds)))
    subj_sat_shape = v * rng.normal(0, 1.0, (4, 2)) * np.array([0.10, 0.07, 0.035, 0.02])[:, None]
    flat = 0.82 + v * rng.uniform(-0.08, 0.1)
    septum = 0.3 + 0.4 * adiposity + 0.5 * infiltration + v * rng.uniform(0.0, 0.3)
    if separation is None:
        separation = spec.gap * (1.0 + v * rng.uniform(-0.7, 0.6))
    sides = {"both": (1, 2), "left": (1,), "right": (2,)}[legs]
    out: list[LegModel] = []
    for leg_id in sides:
        mirror = 1.0 if leg_id == 2 else -1.0
        asym = 1.0 + v * rng.uniform(-0.03, 0.03)
        fr = np.asarray(spec.fascia_radius) * bulk * asym * (1.0 + (taper - 1.0) * (T_KEYS - 0.5))
        shape = np.zeros((K, 5, 2))
        for k, amps, phase in spec.shape:
            ph = np.deg2rad(phase)
            shape[:, k - 1, 0] += np.asarray(amps) * np.cos(k * ph)
            shape[:, k - 1, 1] += np.asarray(amps) * np.sin(k * ph)
        shape += (subj_shape + v * rng.normal(0, 0.4, (K, 5, 2))) * (0.02 / np.arange(1, 6))[None, :, None]
        shape[:, 0, :] *= 0.5  # little shift-like first harmonic
        prof = np.asarray(spec.sat_profile)
        th_deg = np.rad2deg(_TH) % 360.0
        sat_rel = np.interp(th_deg, prof[:, 0], prof[:, 1])
        sat_sh = subj_sat_shape + v * rng.normal(0, 1.0, (4, 2)) * np.array([0.04, 0.03, 0.015, 0.01])[:, None]
        mod = 1.0 + sum(sat_sh[k, 0] * np.cos((k + 1) * _TH) + sat_sh[k, 1] * np.sin((k + 1) * _TH) for k in range(4))
        sat_th = np.maximum(sat_mean * sat_rel * np.clip(mod, 0.4, 1.8) * (1.0 + v * rng.uniform(-0.05, 0.05)), 1.0)
        labels = np.array([muscle_code(s.label, region) for s in spec.seeds], dtype=np.uint8)
        pos = np.stack([_keys(s.pos) for s in spec.seeds]) + subj_seed_jit + v * rng.normal(0, 0.015, (len(spec.seeds), K, 2))
        wts = np.stack([np.asarray(s.weight) for s in spec.seeds]) * subj_seed_w[:, None] * np.exp(v * rng.normal(0, 0.05, (len(spec.seeds), 1)))
        n_w = 3
        warp = np.column_stack([
            _unit(rng.normal(0, 1, (n_w, 2))) * (2 * np.pi / rng.uniform(40, 90, (n_w, 1))),
            rng.uniform(0, 2 * np.pi / 150.0, n_w), rng.uniform(0, 2 * np.pi, n_w),
            rng.normal(0, 1.0, (n_w, 2)) * v])
        bones = []
        for b in spec.bones:
            bp = _keys(b.pos) + v * rng.normal(0, 0.02, 2)
            lob = [(k, a * (1 + v * rng.uniform(-0.3, 0.3)), np.deg2rad(ph + v * rng.uniform(-15, 15))) for k, a, ph in b.lobes]
            bones.append(dict(name=b.name, pos=bp, radius=np.asarray(b.radius) * (0.7 + 0.3 * bulk) * asym, hug=b.hug,
                              cortex=np.asarray(b.cortex) * (1 + v * rng.uniform(-0.15, 0.15)), lobes=lob))
        vessels = []
        for ve in spec.vessels:
            d = dict(name=ve.name, radius=ve.radius * (1 + v * rng.uniform(-0.15, 0.15)), t_range=ve.t_range,
                     pad=ve.pad * (0.6 + 0.8 * adiposity), kind=ve.kind)
            if ve.sat_angle is not None:
                d["sat_angle"] = np.deg2rad(ve.sat_angle + v * rng.uniform(-10, 10))
                d["code"] = SAT_VESSEL
            else:
                d["pos"] = _keys(ve.pos) + v * rng.normal(0, 0.02, 2)
                d["code"] = VESSEL
            vessels.append(d)
        out.append(LegModel(
            leg_id=leg_id, mirror=mirror, centre=np.zeros((K, 2)), rotation=np.deg2rad(10.0 + v * rng.uniform(-10, 15)),
            fascia_radius=fr, shape=shape, sat_thickness=sat_th, sat_shape=sat_sh, posterior_flat=flat,
            skin=1.4 + v * rng.uniform(-0.3, 0.4), fascia=0.7 + v * rng.uniform(-0.1, 0.3),
            seed_label=labels, seed_comp=np.array([s.comp for s in spec.seeds]), seed_pos=pos, seed_weight=wts,
            seed_aspect=np.array([s.aspect for s in spec.seeds]) * np.exp(v * rng.normal(0, 0.08, len(spec.seeds))),
            seed_angle=np.deg2rad(np.array([s.angle for s in spec.seeds]) + v * rng.normal(0, 8, len(spec.seeds))),
            septum=septum, septum_comp=septum + 0.5 + 0.4 * adiposity, warp=warp, bones=bones, vessels=vessels,
            length=length, t_centre=spec.t_centre))
    # place the legs: right leg at +x, the gap between the skins ~ separation (may be ~0: touching legs)
    for leg in out:
        cy = rng.uniform(-6, 6) * v
        for ki, t in enumerate(T_KEYS):
            r = leg.mean_skin_radius(t)
            if len(out) == 2:
                other = out[1] if leg is out[0] else out[0]
                half = 0.5 * (r + other.mean_skin_radius(t) + separation * (0.6 + 0.8 * (1 - t) if region == "thigh" else 1.0))
                leg.centre[ki] = (leg.mirror * half, cy)
            else:
                leg.centre[ki] = (0.0, cy)
        leg.centre += v * rng.normal(0, 2.0, 2) + np.asarray(offset, dtype=np.float64)
    return out


# --- rasterisation -----------------------------------------------------------------------------------------
def _polar_table(base: float, shape: np.ndarray) -> np.ndarray:
    """Radius (mm) on the angle grid ``_TH`` from a base radius and relative harmonics (n, 2)."""
    r = np.ones_like(_TH)
    for k in range(shape.shape[0]):
        r += shape[k, 0] * np.cos((k + 1) * _TH) + shape[k, 1] * np.sin((k + 1) * _TH)
    return base * r


def _lookup(table: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Periodic lookup of a table over ``_TH`` at angles ``theta`` (rad), linear interpolation."""
    f = (theta + np.pi) * (_NTH / (2 * np.pi))
    i = np.clip(f.astype(np.int32), 0, _NTH - 1)
    w = (f - i).astype(np.float32)
    return table[i] * (1 - w) + table[i + 1] * w


def _bone_table(b: dict, tc: float) -> np.ndarray:
    rb0 = float(_at(tc, b["radius"]))
    sh = np.zeros((4, 2))
    for k, a, ph in b["lobes"]:
        sh[k - 1] += (a * np.cos(k * ph), a * np.sin(k * ph))
    return _polar_table(rb0, sh).astype(np.float32)


def _hug(rf_tab: np.ndarray, b: dict, tc: float, rf0: float, margin: float = 1.2) -> np.ndarray:
    """Pull the fascia outline onto a bone's outer surface within the bone's ``hug`` sector."""
    bl, ba = _at(tc, b["pos"]) * rf0
    rb = _bone_table(b, tc)
    px = bl + rb * np.cos(_TH)
    py = ba + rb * np.sin(_TH)
    th = np.arctan2(py, px)
    r = np.hypot(px, py) + margin
    idx = np.clip(((th + np.pi) * (_NTH / (2 * np.pi))).round().astype(int), 0, _NTH)
    reach = np.zeros_like(rf_tab)
    np.maximum.at(reach, idx, r)
    reach = np.maximum(reach, np.maximum(np.roll(reach, 1), np.roll(reach, -1)))  # close 1-bin holes
    lo, hi = np.deg2rad(b["hug"][0]), np.deg2rad(b["hug"][1])
    ang = np.mod(_TH, 2 * np.pi)
    w = np.clip(np.minimum(ang - lo, hi - ang) / np.deg2rad(20.0), 0, 1)  # soft sector edges
    w = np.where(reach > 0, w, 0.0)
    target = np.where(reach > 0, np.minimum(rf_tab, reach), rf_tab)
    out = rf_tab * (1 - w) + target * w
    core = ndimage.uniform_filter1d(ndimage.minimum_filter1d(out[:-1], 5, mode="wrap"), 15, mode="wrap")
    return np.append(core, core[0])


def rasterize_leg(leg: LegModel, xs: np.ndarray, ys: np.ndarray, z: float, code: np.ndarray, rnorm: np.ndarray,
                  gap: np.ndarray) -> None:
    """Draw one leg into a sub-slice, in place.

    Args:
        xs, ys: world coordinates (mm) of the sub-slice's columns along x and y (1D, ascending).
        z: world z (mm) of the sub-slice.
        code: (len(xs), len(ys)) uint8 fine labels (tissue + LEG_STRIDE * (leg_id - 1)); updated.
        rnorm: same shape, float32: normalised radius of the leg that owns each pixel (for touching legs).
        gap: same shape, float32: half-distance (mm) to the nearest muscle border (for infiltration).
    """
    t = leg.t_of_z(z)
    tc = min(max(t, 0.0), 1.0)
    cx, cy = _at(tc, leg.centre)
    rf0 = float(_at(tc, leg.fascia_radius))
    rf_tab = _polar_table(rf0, _at(tc, leg.shape))
    # posterior flattening (supine on the table): a >= -flat * rf0, soft
    sin_t = np.sin(_TH)
    lim = np.where(sin_t < -0.05, leg.posterior_flat * rf0 / np.maximum(-sin_t, 0.05), 1e9)
    rf_tab = -np.logaddexp(-rf_tab / 3.0, -lim / 3.0) * 3.0
    for b in leg.bones:  # a subcutaneous bone surface (anteromedial tibia): the fascia hugs it
        if b["hug"]:
            rf_tab = _hug(rf_tab, b, tc, rf0)
    rs_tab = rf_tab + leg.sat_thickness + leg.skin
    # the skin does not follow concavities of the fascia: smooth it (fat fills the hollows)
    sm = ndimage.uniform_filter1d(ndimage.maximum_filter1d(rs_tab[:-1], 21, mode="wrap"), 31, mode="wrap")
    rs_tab = np.maximum(np.append(sm, sm[0]), rf_tab + leg.skin + 0.8)
    rmax = float(rs_tab.max()) + 2.0
    ix = np.nonzero(np.abs(xs - cx) < rmax)[0]
    iy = np.nonzero(np.abs(ys - cy) < rmax)[0]
    if ix.size == 0 or iy.size == 0:
        return
    sx, sy = slice(ix[0], ix[-1] + 1), slice(iy[0], iy[-1] + 1)
    dx = (xs[sx] - cx).astype(np.float32)[:, None]
    dy = (ys[sy] - cy).astype(np.float32)[None, :]
    u = leg.mirror * dx
    c, s = np.float32(np.cos(leg.rotation)), np.float32(np.sin(leg.rotation))
    lat = u * c - dy * s
    ant = u * s + dy * c
    r = np.hypot(lat, ant)
    th = np.arctan2(ant, lat)
    rs = _lookup(rs_tab.astype(np.float32), th)
    rn = r / rs
    sub_rn = rnorm[sx, sy]
    own = (rn < 1.0) & (rn < sub_rn)
    if not own.any():
        return
    rf = _lookup(rf_tab.astype(np.float32), th)
    L = np.broadcast_to(lat, r.shape)[own]
    A = np.broadcast_to(ant, r.shape)[own]
    R = r[own]
    RF = rf[own]
    RS = rs[own]
    tis = np.full(R.shape, SAT, dtype=np.uint8)
    tis[R > RS - leg.skin] = SKIN
    fas = R <= RF
    tis[fas] = FASCIA
    inner = R <= RF - leg.fascia
    g = np.full(R.shape, 1e3, dtype=np.float32)
    # muscles: weighted anisotropic Voronoi in warped coordinates
    idx = np.nonzero(inner)[0]
    if idx.size:
        Li, Ai = L[idx], A[idx]
        wl = np.zeros_like(Li)
        wa = np.zeros_like(Ai)
        for kx, ky, kz, ph, al, aa in leg.warp:
            sarg = np.sin(Li * np.float32(kx) + Ai * np.float32(ky) + np.float32(kz * z + ph))
            wl += np.float32(al) * sarg
            wa += np.float32(aa) * np.cos(Li * np.float32(ky) - Ai * np.float32(kx) + np.float32(ph - kz * z))
        Lw, Aw = Li + wl, Ai + wa
        pos = _at(tc, np.moveaxis(leg.seed_pos, 1, 0)) * rf0  # (S, 2) mm
        wts = _at(tc, leg.seed_weight.T)
        live = np.nonzero(wts > 0.01)[0]
        d = np.empty((live.size, idx.size), dtype=np.float32)
        for j, si in enumerate(live):
            ca, sa = np.cos(leg.seed_angle[si]), np.sin(leg.seed_angle[si])
            el, ea = Lw - np.float32(pos[si, 0]), Aw - np.float32(pos[si, 1])
            p1 = el * np.float32(ca) + ea * np.float32(sa)
            p2 = -el * np.float32(sa) + ea * np.float32(ca)
            d[j] = np.sqrt(p1 * p1 / np.float32(leg.seed_aspect[si] ** 2) + p2 * p2) - np.float32(
                (wts[si] - WEIGHT_ZERO) * WEIGHT_MM * rf0)
        if live.size >= 2:
            part = np.partition(d, 1, axis=0)
            d1, d2 = part[0], part[1]
            best = np.argmin(d, axis=0)
            # second-best seed index, for the septum type
            d[best, np.arange(idx.size)] = np.inf
            second = np.argmin(d, axis=0)
        else:
            d1 = d[0]
            d2 = np.full_like(d1, np.inf)
            best = np.zeros(idx.size, dtype=np.int64)
            second = best
        lab = leg.seed_label[live][best]
        h = (d2 - d1) * np.float32(0.5)
        same_lab = leg.seed_label[live][best] == leg.seed_label[live][second]
        same_comp = leg.seed_comp[live][best] == leg.seed_comp[live][second]
        half = np.where(same_comp, np.float32(leg.septum * 0.5), np.float32(leg.septum_comp * 0.5))
        # irregular septa: thickness modulated along the border
        half = half * (np.float32(0.6) + np.float32(0.8) * (0.5 + 0.5 * np.sin(Lw * 0.21 + Aw * 0.17 + z * 0.05)))
        septal = (h < half) & ~same_lab
        h = np.where(same_lab, np.float32(1e3), h)
        lab = np.where(septal, IMAT, lab).astype(np.uint8)
        tis[idx] = lab
        g[idx] = np.where(septal, 0.0, h - half)
    # vessels and their fat pads (deep ones inside the fascia, saphenous veins in the SAT)
    for ve in leg.vessels:
        lo, hi = ve["t_range"]
        if not (lo <= t <= hi):
            continue
        if "sat_angle" in ve:
            ang = ve["sat_angle"]
            rfa = float(_lookup(rf_tab.astype(np.float32), np.array([ang], np.float32))[0])
            rsa = float(_lookup(rs_tab.astype(np.float32), np.array([ang], np.float32))[0])
            rad = min(ve["radius"], 0.3 * (rsa - rfa))
            rc = 0.5 * (rfa + rsa)
            vl, va = rc * np.cos(ang), rc * np.sin(ang)
            dv = np.hypot(L - vl, A - va)
            tis[(dv < rad) & (tis == SAT)] = SAT_VESSEL
        else:
            vl, va = _at(tc, ve["pos"]) * rf0
            dv = np.hypot(L - vl, A - va)
            m = inner & (dv < ve["radius"] + ve["pad"])
            tis[m] = IMAT
            g[m] = 0.0
            tis[inner & (dv < ve["radius"])] = VESSEL
    # bones (on top of everything inside the fascia)
    for b in leg.bones:
        bl, ba = _at(tc, b["pos"]) * rf0
        rb0 = float(_at(tc, b["radius"]))
        rb_tab = _bone_table(b, tc)
        el, ea = L - np.float32(bl), A - np.float32(ba)
        rr = np.hypot(el, ea)
        near = rr < rb0 * 1.6
        if not near.any():
            continue
        rbv = _lookup(rb_tab, np.arctan2(ea[near], el[near]))
        cort = float(_at(tc, b["cortex"]))
        sub = np.full(rbv.shape, 255, np.uint8)
        sub[rr[near] < rbv] = CORTEX
        sub[rr[near] < rbv - cort] = MARROW
        tt = tis[near]
        tis[near] = np.where(sub != 255, sub, tt)
    # write back
    blk_code = code[sx, sy]
    blk_code[own] = tis + np.uint8(LEG_STRIDE * (leg.leg_id - 1))
    sub_rn[own] = rn[own]
    blk_gap = gap[sx, sy]
    blk_gap[own] = g
