"""Training patches read from prepared cases, fed through a TorchIO Queue.

Each item of :class:`PatchDataset` is one patch: a corner drawn by :class:`PatchLocator`,
the voxels read from the case's arrays (a box around the patch when a rotation or zoom is
drawn, see :mod:`medseg.data.augment`), and the preset's TorchIO transforms applied to the
patch. Whole volumes are never loaded, so the cost of a patch does not depend on the
volume's size and volumes larger than memory train from Zarr.

The dataset is a plain indexable dataset (item ``i`` belongs to case
``i // samples_per_volume``), so a ``tio.Queue`` shuffles, buffers and loads it with worker
processes, and a ``subject_sampler`` (e.g. a DistributedSampler) can split it.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from medseg.data.augment import SpatialAugmentation, input_box, warp_patch
from medseg.data.cascade import dilate_mm, prior_key
from medseg.data.prepared import PreparedCase

SAMPLERS = ("label", "uniform", "labelled")


class PatchLocator:
    """Draws patch corners in a case.

    ``label``: pick a label value with probability ``label_probabilities[value]`` (among the
    values present where a patch fits), then a centre uniformly among its voxels, as TorchIO's
    LabelSampler does, but from the locations recorded when the case was prepared.
    ``uniform``: a corner uniformly where the patch fits (TorchIO's UniformSampler).
    ``labelled``: a corner uniformly among the case's pre-selected patches.

    A patch along an axis shorter than the patch is centred on it (padded on both sides).
    With ``skip_empty_slices`` (2D training), centres lie on slices along ``slice_axis``
    that hold foreground; with a ``region`` (a later cascade stage), centres of the label
    sampler lie in that region. A case with no usable location falls back to ``uniform``.

    ``focus_size`` (default: the patch) is the part of the patch around its centre that
    must lie inside the volume: the training stage's own view of the patch (see
    :mod:`medseg.models.resolution`). A cascade stage that sees only the centre of a large
    patch then gets the sampled voxel at the centre of its view wherever it lies, the rest of
    the patch being padded beyond the volume's edge, instead of only the centres where the
    whole patch fits.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        sampler: str,
        label_probabilities: Mapping[int, float],
        slice_axis: int | None = None,
        skip_empty_slices: bool = False,
        region: RegionFilter | None = None,
        focus_size: Sequence[int] | None = None,
    ):
        self.patch_size = np.asarray(patch_size, dtype=np.int64)
        self.focus_size = np.asarray(
            patch_size if focus_size is None else focus_size, dtype=np.int64
        )
        self.sampler = sampler
        self.probabilities = {int(k): float(v) for k, v in label_probabilities.items()}
        self.slice_axis = slice_axis
        self.skip_empty_slices = skip_empty_slices
        self.region = region
        self._valid: dict[str, dict[int, np.ndarray]] = {}

    def corner(self, case: PreparedCase, rng: np.random.Generator) -> np.ndarray:
        if self.sampler == "label":
            centre = self._label_centre(case, rng)
            if centre is not None:
                return self._corner_of(centre, case.shape)
        elif self.sampler == "labelled" and case.preselected is not None and len(case.preselected):
            return case.preselected[rng.integers(len(case.preselected))].astype(np.int64)
        return self._uniform_corner(case, rng)

    def _corner_of(self, centre: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        shape = np.asarray(shape)
        short = shape < self.focus_size
        return np.where(short, -((self.patch_size - shape) // 2), centre - self.patch_size // 2)

    def _centre_range(self, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[low, high) of the centres whose focus box fits in a volume of `shape` (any
        centre along an axis shorter than the focus: the patch is centred there)."""
        short = shape < self.focus_size
        low = np.where(short, 0, self.focus_size // 2)
        high = np.where(short, shape, shape - (self.focus_size - 1) // 2)
        return low, high

    def _valid_locations(self, case: PreparedCase) -> dict[int, np.ndarray]:
        """Per label value, the recorded locations where a patch centre may lie."""
        if case.case_id not in self._valid:
            low, high = self._centre_range(np.asarray(case.shape))
            valid = {}
            recorded = self.region.locations(case) if self.region else case.index.locations
            for value, where in recorded.items():
                keep = np.all((where >= low) & (where < high), axis=1)
                if self.skip_empty_slices:
                    nonempty = case.index.foreground_slices[self.slice_axis]
                    keep &= nonempty[where[:, self.slice_axis]]
                valid[value] = where[keep]
            self._valid[case.case_id] = valid
        return self._valid[case.case_id]

    def _label_centre(self, case: PreparedCase, rng: np.random.Generator) -> np.ndarray | None:
        valid = self._valid_locations(case)
        values = [v for v, p in self.probabilities.items() if p > 0 and len(valid.get(v, ()))]
        if not values:
            return None
        weights = np.array([self.probabilities[v] for v in values])
        value = values[rng.choice(len(values), p=weights / weights.sum())]
        where = valid[value]
        return where[rng.integers(len(where))].astype(np.int64)

    def _uniform_corner(self, case: PreparedCase, rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(case.shape)
        low, high = self._centre_range(shape)
        centre = np.array([rng.integers(a, b) for a, b in zip(low, high, strict=True)])
        if self.skip_empty_slices and case.index is not None:
            nonempty = np.flatnonzero(case.index.foreground_slices[self.slice_axis])
            if len(nonempty):
                centre[self.slice_axis] = nonempty[rng.integers(len(nonempty))]
        return self._corner_of(centre, shape)


class PatchDataset(Dataset):
    """``samples_per_volume`` augmented patches per case, as TorchIO subjects.

    Each subject has ``image`` [C, *patch], ``label`` [1, *patch], the case's earlier-stage
    masks ``prior_<stage>`` [1, *patch] if it has any, ``case_id``, the case's ``values``
    (case-level targets) and ``tio.LOCATION`` (the patch's [x0, y0, z0, x1, y1, z1] in the
    case's voxels, before augmentation).

    Args:
        cases: the training cases.
        locator: draws the patch corners.
        patch_size: (x, y, z) voxels.
        spatial: rotation and scaling applied while the patch is read, or None.
        transform: TorchIO transforms applied to each patch, or None.
        samples_per_volume: patches per case and epoch.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        locator: PatchLocator,
        patch_size: Sequence[int],
        spatial: SpatialAugmentation | None,
        transform: tio.Transform | None,
        samples_per_volume: int,
    ):
        self.cases = list(cases)
        self.locator = locator
        self.patch_size = tuple(int(p) for p in patch_size)
        self.spatial = spatial
        self.transform = transform
        self.samples_per_volume = samples_per_volume

    def __len__(self) -> int:
        return len(self.cases) * self.samples_per_volume

    def dry_iter(self) -> list[str]:
        """What ``tio.Queue`` inspects to count patches: one entry per item (each item is a
        single patch, so none carries a ``num_samples`` attribute)."""
        return [c.case_id for c in self.cases for _ in range(self.samples_per_volume)]

    def __getitem__(self, index: int) -> tio.Subject:
        case = self.cases[index // self.samples_per_volume]
        # Seeded from torch's generator so Lightning's seeding and the DataLoader's per-worker
        # seeds make the patch sequence reproducible.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        corner = self.locator.corner(case, rng)
        image, masks = self._read(case, corner, rng)
        affine = case.affine.copy()
        affine[:3, 3] = case.affine[:3, :3] @ corner + case.affine[:3, 3]
        fields: dict = {
            "image": tio.ScalarImage(tensor=image, affine=affine),
            "case_id": case.case_id,
            tio.LOCATION: torch.as_tensor([*corner, *(corner + self.patch_size)]),
        }
        for name, mask in masks.items():
            fields[name] = tio.LabelMap(tensor=mask, affine=affine)
        subject = tio.Subject(**fields, **case.values)
        return subject if self.transform is None else self.transform(subject)

    def _read(
        self, case: PreparedCase, corner: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The patch's image and its masks (``label``, ``prior_<stage>``), warped when the
        spatial augmentation is drawn."""
        matrix = None if self.spatial is None else self.spatial.sample(rng, case.spacing)
        if matrix is None:
            low, size = corner, np.asarray(self.patch_size)
        else:
            centre = corner + (np.asarray(self.patch_size) - 1) / 2
            low, high = input_box(centre, matrix, self.patch_size)
            size = high - low
        image, label = case.read(low, size)
        masks = {} if label is None else {"label": label}
        masks |= {prior_key(k): v for k, v in case.read_priors(low, size).items()}
        if matrix is None:
            return torch.from_numpy(image), {k: torch.from_numpy(v) for k, v in masks.items()}
        stacked = torch.from_numpy(np.concatenate(list(masks.values()))) if masks else None
        image, warped = warp_patch(
            torch.from_numpy(image), stacked, centre - low, matrix, self.patch_size
        )
        return image, {k: warped[i : i + 1] for i, k in enumerate(masks)}


class RegionFilter:
    """Keeps patch centres within ``margin_mm`` of an earlier cascade stage's mask: the
    stage's predictions when the case has them (``priors``), else the ground truth of the
    stage's label values. A case whose region is empty (the earlier stage found nothing)
    keeps all its locations.

    The recorded locations are filtered once per case (the label is read whole once); call
    :meth:`prepare` in the main process so the Queue's workers inherit the result.
    """

    def __init__(self, stage: str, values: Sequence[int], margin_mm: float):
        self.stage = stage
        self.values = list(values)
        self.margin_mm = margin_mm
        self._kept: dict[str, dict[int, np.ndarray] | None] = {}

    def prepare(self, cases: Sequence[PreparedCase]) -> None:
        for case in cases:
            self.locations(case)

    def locations(self, case: PreparedCase) -> dict[int, np.ndarray]:
        if case.case_id not in self._kept:
            self._kept[case.case_id] = self._filter(case)
        kept = self._kept[case.case_id]
        return case.index.locations if kept is None else kept

    def _filter(self, case: PreparedCase) -> dict[int, np.ndarray] | None:
        prior = case.priors.get(self.stage)
        if prior is not None:
            mask = np.asarray(prior[:]) > 0
        else:
            mask = np.isin(np.asarray(case.label[:]), self.values)
        if not mask.any():
            return None
        # The grown mask lies inside the mask's box grown by the margin: dilate only there.
        spacing = np.asarray(case.spacing)
        reach = np.ceil(self.margin_mm / spacing).astype(np.int64)
        where = np.argwhere(mask)
        low = np.maximum(where.min(0) - reach, 0)
        high = np.minimum(where.max(0) + reach + 1, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        grown = dilate_mm(mask[box], self.margin_mm, spacing)
        kept = {}
        for value, found in case.index.locations.items():
            inside = np.all((found >= low) & (found < high), axis=1)
            keep = np.zeros(len(found), dtype=bool)
            keep[inside] = grown[tuple((found[inside] - low).T)]
            kept[value] = found[keep]
        return kept


class ReadyPatchSampler(tio.data.PatchSampler):
    """The Queue's sampler when every subject already is a patch: yields it unchanged."""

    def _generate_patches(
        self, subject: tio.Subject, num_patches: int | None = None
    ) -> Generator[tio.Subject]:
        for _ in range(1 if num_patches is None else num_patches):
            yield subject


class VolumeDataset(Dataset):
    """Whole prepared cases as TorchIO subjects (validation, test), optionally transformed
    (e.g. voxel targets computed from the label)."""

    def __init__(self, cases: Sequence[PreparedCase], transform: tio.Transform | None = None):
        self.cases = list(cases)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> tio.Subject:
        subject = self.cases[index].subject()
        return subject if self.transform is None else self.transform(subject)
