"""Deterministic synthetic abdominal CT phantom: a liver (label 1) with hypodense lesions (label 2).

The phantom exists so that the whole pipeline (loading, training, cascades, evaluation) can be
exercised end to end without downloading patient data. Every case is a pure function of an
integer seed, so a dataset written on one machine is bit-identical to one written on another.

Geometry is in nibabel (x, y, z) array order with a RAS+ affine: world +x points to the
patient's Right, +y Anterior, +z Superior. The liver therefore sits at world x > 0 (patient's
right) and the spine at world y < 0 (posterior).

Anatomy is laid out relative to the field of view (so small test volumes still hold a whole
body), while fat thickness, lesion radii and the vertebral period are in millimetres.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from medseg.errors import DataError
from medseg.utils.io import hidden_sibling, remove_leftovers
from medseg.utils.locks import exclusive_lock

__all__ = [
    "FORMAT_VERSION",
    "LESION_CLASSES",
    "TARGETS_FILE",
    "PhantomCase",
    "case_name",
    "case_seed",
    "count_lesions",
    "generate_case",
    "lesion_class",
    "phantom_affine",
    "write_phantom_dataset",
]

FORMAT_VERSION = 2
"""Bump whenever the generator's output changes, so cached datasets are regenerated."""

DEFAULT_SHAPE: tuple[int, int, int] = (160, 160, 48)
DEFAULT_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.5)

HU_AIR = -1000.0
HU_MIN, HU_MAX = -1024, 3071

LIVER_MARGIN_MM = 3.0  # minimum clearance between the liver and the body wall or the spine
LESION_RADIUS_MM = (5.0, 15.0)
LESION_IRREGULARITY = 0.15
# Probability of a lesion-free case; the remaining mass is spread evenly over 1..max_lesions.
P_NO_LESION = 0.15
VERTEBRA_PERIOD_MM = 28.0
DISC_THICKNESS_MM = 7.0
LABEL_NAMES = {"0": "background", "1": "liver", "2": "lesion"}
# Case-level targets, written to targets.tsv next to the images: the number of lesions, its
# class (LESION_CLASSES by count, the last one for that count and more) and the liver volume.
TARGETS_FILE = "targets.tsv"
LESION_CLASSES = ("none", "one", "several")
_INSTALL_ATTEMPTS = 10

log = logging.getLogger(__name__)

Axes = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class PhantomCase:
    """One generated case; arrays are in (x, y, z) order."""

    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8: 0 background, 1 liver (without lesions), 2 lesion
    affine: np.ndarray  # float64 4x4, RAS+
    num_lesions: int
    liver_volume_ml: float  # volume of labels 1 + 2


@dataclass(frozen=True)
class _Grid:
    """World coordinates (mm) of voxel centres along each axis, as broadcastable arrays.

    Geometry is float64 throughout: masks come from thresholding computed fields, and double
    precision makes it vanishingly unlikely that a last-bit difference between CPUs or BLAS
    builds flips a voxel, which keeps datasets identical across machines.
    """

    x: np.ndarray  # (nx, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (1, 1, nz)
    spacing: tuple[float, float, float]
    half_fov: tuple[float, float, float]  # half the physical extent of the volume per axis

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])

    def axes(self, box: tuple[slice, ...] | None = None) -> Axes:
        """The 1D coordinate vectors, optionally restricted to a box of slices."""
        flat = (self.x.ravel(), self.y.ravel(), self.z.ravel())
        if box is None:
            return flat
        return (flat[0][box[0]], flat[1][box[1]], flat[2][box[2]])

    def sub(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate arrays restricted to a box of slices."""
        ax, ay, az = self.axes(box)
        return ax[:, None, None], ay[None, :, None], az[None, None, :]


@dataclass(frozen=True)
class _Body:
    """Body outline parameters; semi-axes vary along z as (1, 1, nz) arrays."""

    a: np.ndarray
    b: np.ndarray
    cy: float
    a0: float
    b0: float
    fat_mm: float


@dataclass(frozen=True)
class _Tissues:
    """Masks of the anatomy, each of the full volume shape."""

    body: np.ndarray
    inner: np.ndarray
    kidneys: np.ndarray
    cortical: np.ndarray
    cancellous: np.ndarray
    disc: np.ndarray
    canal: np.ndarray
    liver: np.ndarray
    lesions: list[tuple[tuple[slice, ...], np.ndarray]]


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine with the given spacing whose volume centre sits at the world origin."""
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape, dtype=np.float64) - 1.0) * spacing_arr
    return affine


def _make_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> _Grid:
    affine = phantom_affine(shape, spacing)
    coords = [affine[i, 3] + spacing[i] * np.arange(shape[i], dtype=np.float64) for i in range(3)]
    half_fov = tuple(0.5 * n * s for n, s in zip(shape, spacing, strict=True))
    return _Grid(
        x=coords[0][:, None, None],
        y=coords[1][None, :, None],
        z=coords[2][None, None, :],
        spacing=spacing,
        half_fov=half_fov,  # type: ignore[arg-type]
    )


def _smooth_field(rng: np.random.Generator, axes: Axes, length_mm: float) -> np.ndarray:
    """Smooth, stationary, unit-variance random field sampled on the grid spanned by ``axes``.

    The field is a tensor product of Gaussian bumps on a control lattice of pitch ``length_mm``
    weighted by N(0, 1) coefficients. Being separable it costs three small matrix products
    rather than a large 3D Gaussian filter, and normalising each 1D basis row to unit L2 norm
    makes the variance exactly 1 everywhere.
    """
    bases = []
    for ax in axes:
        lo = float(ax.min()) - 2.0 * length_mm
        hi = float(ax.max()) + 2.0 * length_mm
        ctrl = lo + length_mm * np.arange(int(np.ceil((hi - lo) / length_mm)) + 1)
        basis = np.exp(-0.5 * ((ax[:, None] - ctrl[None, :]) / length_mm) ** 2)
        basis /= np.sqrt((basis**2).sum(axis=1, keepdims=True))
        bases.append(basis)
    weights = rng.standard_normal(tuple(b.shape[1] for b in bases))
    field = np.tensordot(bases[0], weights, axes=(1, 0))  # (nx, cy, cz)
    field = np.tensordot(field, bases[1], axes=(1, 1))  # (nx, cz, ny)
    return np.tensordot(field, bases[2], axes=(1, 1))  # (nx, ny, nz)


def _ellipse_r2(
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    semi: tuple[float | np.ndarray, float | np.ndarray],
) -> np.ndarray:
    """Squared normalised radius of an axial ellipse; < 1 inside."""
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2


def _bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, padded and clipped to the array."""
    box = []
    for axis, size in enumerate(mask.shape):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - pad, 0), min(int(hits[-1]) + pad + 1, size)))
    return tuple(box)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 6-connected component of a mask."""
    components, count = ndi.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _body(grid: _Grid, rng: np.random.Generator) -> tuple[_Body, np.ndarray, np.ndarray]:
    """Elliptic body whose cross-section changes slowly along z, and its fat-free interior."""
    hx, hy, hz = grid.half_fov
    a0 = hx * rng.uniform(0.80, 0.88)
    b0 = hy * rng.uniform(0.62, 0.70)
    cy = hy * rng.uniform(-0.03, 0.03)
    # One sinusoid per semi-axis with a period of 3-5 half-FOVs: a gentle taper along z.
    period = 2.0 * hz * rng.uniform(1.5, 2.5, size=2)
    phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    a = a0 * (1.0 + 0.04 * np.sin(2.0 * np.pi * grid.z / period[0] + phase[0]))
    b = b0 * (1.0 + 0.04 * np.sin(2.0 * np.pi * grid.z / period[1] + phase[1]))
    fat_mm = float(rng.uniform(3.0, 6.0))
    body = _ellipse_r2(grid.x, grid.y, (0.0, cy), (a, b)) < 1.0
    inner = _ellipse_r2(grid.x, grid.y, (0.0, cy), (a - fat_mm, b - fat_mm)) < 1.0
    return _Body(a=a, b=b, cy=cy, a0=a0, b0=b0, fat_mm=fat_mm), body, inner


def _spine(
    grid: _Grid, body: _Body, x_shift: float, disc_offset: float, grow_mm: float = 0.0
) -> dict[str, np.ndarray]:
    """Vertebral body, posterior arch, spinous process and canal, posterior in the body.

    ``grow_mm`` enlarges every bony part, giving a keep-out zone for the liver.
    """
    b0 = body.b0
    yv = body.cy - 0.30 * b0
    vert_semi = (0.21 * b0 + grow_mm, 0.17 * b0 + grow_mm)
    yc = yv - 0.17 * b0 - 0.10 * b0
    canal_r = 0.08 * b0
    arch_r = 0.13 * b0 + grow_mm
    ysp = yc - 0.13 * b0 - 0.05 * b0
    spinous_semi = (0.035 * b0 + grow_mm, 0.06 * b0 + grow_mm)

    vertebra = _ellipse_r2(grid.x, grid.y, (x_shift, yv), vert_semi) < 1.0
    shell = 1.5
    vert_core = (
        _ellipse_r2(grid.x, grid.y, (x_shift, yv), (vert_semi[0] - shell, vert_semi[1] - shell))
        < 1.0
    )
    canal = _ellipse_r2(grid.x, grid.y, (x_shift, yc), (canal_r, canal_r)) < 1.0
    arch = (_ellipse_r2(grid.x, grid.y, (x_shift, yc), (arch_r, arch_r)) < 1.0) & ~canal
    spinous = _ellipse_r2(grid.x, grid.y, (x_shift, ysp), spinous_semi) < 1.0
    disc_z = np.mod(grid.z - disc_offset, VERTEBRA_PERIOD_MM) < DISC_THICKNESS_MM
    nz = grid.shape[2]
    ones_z = np.ones((1, 1, nz), dtype=bool)
    vertebra, vert_core = vertebra & ones_z, vert_core & ones_z
    return {
        "cortical": (vertebra & ~vert_core & ~disc_z) | ((arch | spinous) & ones_z),
        "cancellous": vert_core & ~disc_z,
        "disc": vertebra & disc_z,
        "canal": canal & ones_z,
        "all": vertebra | ((arch | spinous | canal) & ones_z),
    }


def _kidneys(grid: _Grid, body: _Body, rng: np.random.Generator) -> np.ndarray:
    """Two kidney-like ellipsoids lateral to the spine: soft-tissue distractors."""
    hz = grid.half_fov[2]
    mask = np.zeros(grid.shape, dtype=bool)
    for side in (1.0, -1.0):
        centre = (
            side * body.a0 * rng.uniform(0.40, 0.50),
            body.cy - body.b0 * rng.uniform(0.20, 0.30),
            -hz * rng.uniform(0.10, 0.35),
        )
        semi = (
            body.a0 * rng.uniform(0.13, 0.17),
            body.b0 * rng.uniform(0.18, 0.24),
            hz * rng.uniform(0.30, 0.40),
        )
        r2 = (
            ((grid.x - centre[0]) / semi[0]) ** 2
            + ((grid.y - centre[1]) / semi[1]) ** 2
            + ((grid.z - centre[2]) / semi[2]) ** 2
        )
        mask |= r2 < 1.0
    return mask


def _liver(grid: _Grid, body: _Body, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth irregular blob on the patient's right (+x): a deformed, tapered ellipsoid.

    The implicit function of an ellipsoid is perturbed by a low-frequency random field before
    thresholding; the result is clipped to ``allowed``, reduced to its largest component and
    hole-filled, so it is always one solid piece.
    """
    hz = grid.half_fov[2]
    centre = (
        body.a0 * rng.uniform(0.36, 0.44),
        body.cy + body.b0 * rng.uniform(0.0, 0.12),
        hz * rng.uniform(0.0, 0.15),
    )
    semi = (
        body.a0 * rng.uniform(0.38, 0.46),
        body.b0 * rng.uniform(0.55, 0.65),
        hz * rng.uniform(0.55, 0.68),
    )
    amplitude = rng.uniform(0.15, 0.25)
    length_mm = 0.8 * min(semi[0], semi[1])
    field = _smooth_field(rng, grid.axes(), length_mm)
    dx = (grid.x - centre[0]) / semi[0]
    # Thicker (in y) laterally, thinner towards the midline, like a right lobe and left lobe.
    taper = 1.0 + 0.3 * np.clip(dx, -1.0, 1.0)
    rho = np.sqrt(
        dx**2
        + ((grid.y - centre[1]) / (semi[1] * taper)) ** 2
        + ((grid.z - centre[2]) / semi[2]) ** 2
    )
    liver = (rho - 1.0 + amplitude * field < 0.0) & allowed
    if not liver.any():
        raise RuntimeError("phantom liver is empty; the volume is too small for the phantom")
    box = _bbox(liver)
    liver[box] = ndi.binary_fill_holes(_largest_component(liver[box]))
    return liver


def _lesion_count(rng: np.random.Generator, max_lesions: int) -> int:
    if max_lesions <= 0:
        return 0
    probs = np.full(max_lesions + 1, (1.0 - P_NO_LESION) / max_lesions)
    probs[0] = P_NO_LESION
    return int(rng.choice(max_lesions + 1, p=probs))


def _lesions(
    grid: _Grid, liver: np.ndarray, count: int, rng: np.random.Generator
) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """Place up to ``count`` separate, slightly irregular ellipsoids strictly inside the liver.

    Each lesion is bounded by a sphere of radius ``extent`` around its centre. A centre is only
    accepted where the distance map of the eroded liver exceeds ``extent`` (so all 6-neighbours
    of lesion voxels are liver) and where it keeps a gap of more than a voxel diagonal to every
    earlier lesion (so lesions never touch, even diagonally). Radii that do not fit are shrunk;
    lesions that cannot reach the minimum radius are dropped, so fewer than ``count`` may result.
    Returns (box, mask) pairs in full-volume index space.
    """
    if count == 0:
        return []
    spacing = np.asarray(grid.spacing, dtype=np.float64)
    gap = float(np.linalg.norm(spacing)) + 1.0
    box = _bbox(liver, pad=1)
    interior = ndi.binary_erosion(liver[box])  # 6-connected: voxels whose 6-neighbours are liver
    if not interior.any():
        return []
    offsets = np.array([s.start for s in box], dtype=np.intp)
    candidates = np.argwhere(interior)
    points = candidates * spacing  # mm, relative to the box origin
    # Largest lesion extent allowed at each candidate: every point closer than this is interior.
    room = ndi.distance_transform_edt(interior, sampling=grid.spacing)[interior]
    min_extent = LESION_RADIUS_MM[0] * (1.0 + LESION_IRREGULARITY)
    radii = np.sort(rng.uniform(*LESION_RADIUS_MM, size=count))[::-1]
    placed: list[tuple[tuple[slice, ...], np.ndarray]] = []
    for radius in radii:
        factors = rng.uniform(0.8, 1.2, size=3)
        wanted = radius * factors.max() * (1.0 + LESION_IRREGULARITY)
        extent = min(wanted, float(room.max(initial=0.0)))
        if extent < min(wanted, min_extent):
            break
        choice = np.flatnonzero(room >= extent)
        index = int(choice[rng.integers(choice.size)])
        semi = radius * factors * (extent / wanted)
        mask_box, mask = _lesion_mask(grid, box, offsets + candidates[index], semi, rng)
        local = tuple(
            slice(s.start - o, s.stop - o) for s, o in zip(mask_box, offsets, strict=True)
        )
        mask = _largest_component(mask & interior[local])
        placed.append((mask_box, mask))
        room = np.minimum(room, np.linalg.norm(points - points[index], axis=1) - extent - gap)
    return placed


def _lesion_mask(
    grid: _Grid,
    liver_box: tuple[slice, ...],
    centre_idx: np.ndarray,
    semi: np.ndarray,
    rng: np.random.Generator,
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Irregular ellipsoid around a voxel centre, on a local box inside the liver's box."""
    spacing = np.asarray(grid.spacing)
    reach = np.ceil(semi.max() * (1.0 + LESION_IRREGULARITY) / spacing).astype(int) + 1
    box = tuple(
        slice(max(int(c - r), lb.start), min(int(c + r + 1), lb.stop))
        for c, r, lb in zip(centre_idx, reach, liver_box, strict=True)
    )
    x, y, z = grid.sub(box)
    centre = [float(grid.axes()[i][centre_idx[i]]) for i in range(3)]
    rho = np.sqrt(
        ((x - centre[0]) / semi[0]) ** 2
        + ((y - centre[1]) / semi[1]) ** 2
        + ((z - centre[2]) / semi[2]) ** 2
    )
    # tanh bounds the perturbation, so the lesion never leaves its (1 + irregularity) sphere.
    field = np.tanh(_smooth_field(rng, grid.axes(box), 0.8 * float(semi.min())))
    return box, rho < 1.0 + LESION_IRREGULARITY * field


def _liver_room(grid: _Grid, body: _Body, keep_out: np.ndarray) -> np.ndarray:
    """Where the liver may be: inside the muscle wall by a margin, clear of the spine."""
    semi = (body.a - body.fat_mm - LIVER_MARGIN_MM, body.b - body.fat_mm - LIVER_MARGIN_MM)
    room = (_ellipse_r2(grid.x, grid.y, (0.0, body.cy), semi) < 1.0) & ~keep_out
    room[:, :, [0, -1]] = False  # never cut flat by the volume's top or bottom slice
    return room


def _anatomy(grid: _Grid, rng: np.random.Generator, max_lesions: int) -> _Tissues:
    body_params, body, inner = _body(grid, rng)
    kidneys = _kidneys(grid, body_params, rng) & inner
    x_shift = float(rng.uniform(-0.02, 0.02)) * body_params.a0
    disc_offset = float(rng.uniform(0.0, VERTEBRA_PERIOD_MM))
    spine = _spine(grid, body_params, x_shift, disc_offset)
    keep_out = _spine(grid, body_params, x_shift, disc_offset, grow_mm=LIVER_MARGIN_MM)["all"]
    liver = _liver(grid, body_params, _liver_room(grid, body_params, keep_out), rng)
    lesions = _lesions(grid, liver, _lesion_count(rng, max_lesions), rng)
    return _Tissues(
        body=body,
        inner=inner,
        kidneys=kidneys,
        cortical=spine["cortical"] & inner,
        cancellous=spine["cancellous"] & inner,
        disc=spine["disc"] & inner,
        canal=spine["canal"] & inner,
        liver=liver,
        lesions=lesions,
    )


def _render(
    grid: _Grid, tissues: _Tissues, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint tissue intensities, blur (partial volume), add noise; returns (image, label)."""
    liver_hu = rng.uniform(57.0, 63.0)
    # Tied to the liver so the liver/muscle contrast is ~20 HU in every case.
    paint = [
        (tissues.body, rng.uniform(-110.0, -90.0)),
        (tissues.inner, liver_hu - rng.uniform(17.0, 23.0)),
        (tissues.kidneys, rng.uniform(28.0, 34.0)),
        (tissues.liver, liver_hu),
        (tissues.cortical, rng.uniform(620.0, 700.0)),
        (tissues.cancellous, rng.uniform(400.0, 460.0)),
        (tissues.disc, rng.uniform(80.0, 100.0)),
        (tissues.canal, rng.uniform(15.0, 25.0)),
    ]
    image = np.full(grid.shape, HU_AIR, dtype=np.float32)
    for mask, hu in paint:
        image[mask] = hu
    label = tissues.liver.astype(np.uint8)
    for box, mask in tissues.lesions:
        image[box][mask] = rng.uniform(10.0, 22.0)
        label[box][mask] = 2
    image = ndi.gaussian_filter(image, sigma=0.5)
    image += _noise(grid.shape, rng.uniform(10.0, 14.0), rng)
    image = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)
    return image, label


def _noise(shape: tuple[int, int, int], sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """In-plane correlated Gaussian noise (like reconstructed CT) with std ``sigma_hu``."""
    smoothing = (0.6, 0.6, 0.0)
    noise = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), smoothing)
    impulse = np.zeros((9, 9, 1), dtype=np.float64)
    impulse[4, 4, 0] = 1.0
    kernel_norm = float(np.sqrt((ndi.gaussian_filter(impulse, smoothing) ** 2).sum()))
    return noise * np.float32(sigma_hu / kernel_norm)


def _validate(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], max_lesions: int
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or any(int(n) < 8 for n in shape):
        raise ValueError(f"shape must be three sizes of at least 8 voxels, got {shape}")
    if len(spacing) != 3 or any(float(s) <= 0.0 for s in spacing):
        raise ValueError(f"spacing must be three positive values in mm, got {spacing}")
    if max_lesions < 0:
        raise ValueError(f"max_lesions must be >= 0, got {max_lesions}")
    return (
        (int(shape[0]), int(shape[1]), int(shape[2])),
        (float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )


def generate_case(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    max_lesions: int = 3,
) -> PhantomCase:
    """Generate one phantom case, a pure function of its arguments (``seed`` >= 0)."""
    shape, spacing = _validate(shape, spacing, max_lesions)
    rng = np.random.default_rng(seed)
    grid = _make_grid(shape, spacing)
    tissues = _anatomy(grid, rng, max_lesions)
    image, label = _render(grid, tissues, rng)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return PhantomCase(
        image=image,
        label=label,
        affine=phantom_affine(shape, spacing),
        num_lesions=len(tissues.lesions),
        liver_volume_ml=int(np.count_nonzero(label)) * voxel_ml,
    )


def count_lesions(label: np.ndarray) -> int:
    """Number of separate lesions (6-connected components of label 2) in a label map."""
    return int(ndi.label(np.asarray(label) == 2)[1])


def lesion_class(num_lesions: int) -> str:
    """The lesion-count class of a case: none, one or several."""
    return LESION_CLASSES[min(num_lesions, len(LESION_CLASSES) - 1)]


def case_seed(seed: int, index: int) -> int:
    """Per-case seed, derived from the dataset seed independently of the number of cases."""
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(index,))
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


def case_name(index: int) -> str:
    return f"phantom_{index:03d}"


def _phantom_params(
    num_cases: int,
    seed: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    max_lesions: int,
) -> dict[str, Any]:
    """The generation parameters as stored in (and compared against) dataset.json."""
    return {
        "format_version": FORMAT_VERSION,
        "num_cases": int(num_cases),
        "seed": int(seed),
        "shape": [int(n) for n in shape],
        "spacing": [float(s) for s in spacing],
        "max_lesions": int(max_lesions),
    }


def _read_phantom_params(root: Path) -> dict[str, Any] | None:
    """The phantom parameters recorded at ``root``, or None if it is not a medseg phantom."""
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    params = meta.get("medseg_phantom") if isinstance(meta, dict) else None
    return params if isinstance(params, dict) else None


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def _not_a_phantom(root: Path) -> DataError:
    return DataError(
        f"{root} exists and is not a medseg phantom (no dataset.json with a 'medseg_phantom' "
        "entry); refusing to overwrite it"
    )


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)  # scanner
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    nib.save(image, path)


def _write_all(staging: Path, params: dict[str, Any]) -> None:
    """Write every case and dataset.json into ``staging``."""
    (staging / "imagesTr").mkdir()
    (staging / "labelsTr").mkdir()
    shape = tuple(params["shape"])
    spacing = tuple(params["spacing"])
    training = []
    targets = ["case_id\tnum_lesions\tlesion_class\tliver_volume_ml"]
    for index in range(params["num_cases"]):
        case = generate_case(
            case_seed(params["seed"], index), shape, spacing, params["max_lesions"]
        )
        name = f"{case_name(index)}.nii.gz"
        _save_nifti(case.image, case.affine, staging / "imagesTr" / name)
        _save_nifti(case.label, case.affine, staging / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        targets.append(
            f"{case_name(index)}\t{case.num_lesions}\t{lesion_class(case.num_lesions)}\t"
            f"{case.liver_volume_ml:.3f}"
        )
    (staging / TARGETS_FILE).write_text("\n".join(targets) + "\n")
    meta = {
        "name": "Phantom",
        "description": (
            "Synthetic abdominal CT phantom (HU) with a liver and hypodense liver lesions, "
            "generated deterministically by medseg.data.phantom"
        ),
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABEL_NAMES,
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "medseg_phantom": params,
    }
    (staging / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _install(staging: Path, root: Path, params: dict[str, Any]) -> None:
    """Move the finished ``staging`` directory to ``root`` with directory renames only.

    A rename onto a non-empty directory fails, which is how a concurrent writer is detected:
    if the dataset it installed matches ours we drop ours; an older phantom with other
    parameters is renamed aside (and deleted once ours is in place); anything else is refused.
    """
    displaced: list[Path] = []
    try:
        for _ in range(_INSTALL_ATTEMPTS):
            try:
                staging.rename(root)
                return
            except OSError:
                if not root.exists():
                    continue  # someone moved it aside between our rename and this check
            current = _read_phantom_params(root)
            if current == params:
                shutil.rmtree(staging)
                return
            if current is None:
                if _is_empty_dir(root):
                    root.rmdir()
                    continue
                raise _not_a_phantom(root)
            aside = hidden_sibling(root, "old")
            try:
                root.rename(aside)
            except FileNotFoundError:
                continue
            displaced.append(aside)
        raise RuntimeError(f"could not install the phantom at {root}: it kept changing")
    finally:
        for path in displaced:
            shutil.rmtree(path, ignore_errors=True)


def write_phantom_dataset(
    root: str | Path,
    num_cases: int = 30,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    max_lesions: int = 3,
) -> Path:
    """Write (or reuse) a phantom dataset in Medical Segmentation Decathlon layout at ``root``,
    with the case-level targets in ``targets.tsv`` (case_id, num_lesions, lesion_class,
    liver_volume_ml).

    Returns immediately if ``root`` already holds a phantom made with the same parameters.
    Otherwise the dataset is built in a unique sibling directory and renamed into place, so
    ``root`` never holds a partial dataset. Concurrent callers take turns (see
    :mod:`medseg.utils.locks`): one generates it, the others wait and find it written; the
    staging folders of a killed generation are removed by the next one.
    An existing phantom with different parameters is replaced; any other existing content
    (except an empty directory) makes this raise ``DataError``.
    """
    root = Path(root)
    shape, spacing = _validate(shape, spacing, max_lesions)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    params = _phantom_params(num_cases, seed, shape, spacing, max_lesions)
    if _read_phantom_params(root) == params:
        return root
    with exclusive_lock(root):
        current = _read_phantom_params(root)  # written by a process we waited for?
        if current == params:
            return root
        if current is None and root.exists() and not _is_empty_dir(root):
            raise _not_a_phantom(root)
        for leftover in remove_leftovers(root.parent, root.name):
            log.info("removed %s, left by an interrupted run", leftover)
        log.info("generating a %d-case phantom into %s", num_cases, root)
        # Not tempfile.mkdtemp: its 0o700 mode would stick to the installed dataset.
        staging = hidden_sibling(root, "tmp")
        staging.mkdir()
        try:
            _write_all(staging, params)
            _install(staging, root, params)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return root
