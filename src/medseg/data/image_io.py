"""Image files in every format of :mod:`medseg.data.formats`: voxel data, headers, and files
written with another file's geometry.

medseg's arrays are in the file's voxel order with a RAS affine (nibabel's convention);
SimpleITK's LPS geometry is converted as TorchIO does, so the same volume saved as NIfTI,
NRRD, MetaImage or a DICOM series reads as the same array and affine. Readers raise
DataError naming the file: a damaged or truncated file is an error, never zeros.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 (the conventional name)
import torchio as tio

from medseg.data.dicom import check_nonuniform_slices, read_series
from medseg.data.formats import NIFTI_ENDINGS, format_of, image_ending
from medseg.data.geometry import check_affine
from medseg.errors import DataError
from medseg.utils.io import atomic_save_files


@dataclass(frozen=True)
class ReadOptions:
    """How the files of a dataset (or predict's inputs) are read.

    Args:
        nonuniform_slices: DICOM series whose slices are unevenly spaced: ``error`` or
            ``resample`` (see :func:`medseg.data.dicom.read_series`).
        reorient_labels: a label (or merged mask) stored on the image's grid with flipped or
            permuted axes is reoriented onto the image grid instead of reported.
        config_prefix: where these keys are in the config (``data.``, or ``""`` for
            predict), so errors name them.
    """

    nonuniform_slices: str = "error"
    reorient_labels: bool = False
    config_prefix: str = "data."

    def __post_init__(self):
        check_nonuniform_slices(self.dicom_key, self.nonuniform_slices)

    @property
    def dicom_key(self) -> str:
        return f"{self.config_prefix}dicom.nonuniform_slices"

    @property
    def reorient_key(self) -> str:
        return f"{self.config_prefix}reorient_labels"

    def identity(self) -> dict:
        """What changes the data read (part of the cache key)."""
        return {
            "nonuniform_slices": self.nonuniform_slices,
            "reorient_labels": self.reorient_labels,
        }

    def reader(self) -> Callable[[str | Path], tuple[np.ndarray, np.ndarray]]:
        """:func:`read_image` with these options, as TorchIO's ``reader`` (picklable)."""
        return functools.partial(read_image, options=self)


# The defaults: refuse uneven DICOM slices, report labels on a flipped grid.
DEFAULT_READING = ReadOptions()


def read_image(
    path: str | Path, options: ReadOptions = DEFAULT_READING
) -> tuple[np.ndarray, np.ndarray]:
    """Data ([C, x, y, z] or [x, y, z]) and RAS affine of an image file, a DICOM series
    folder or an array of a Zarr dataset (see :mod:`medseg.data.zarr_store`).

    NIfTI files are read with nibabel: SimpleITK (TorchIO's default) fills a truncated
    ``.nii.gz`` with zeros without an error; nibabel raises, so a damaged file is reported
    instead of trained on. NRRD and MetaImage go to SimpleITK, which raises for truncated
    data and missing data files.
    """
    path = Path(path)
    if path.is_dir():
        # Imported here: zarr_store builds subjects, which read with this module.
        from medseg.data.zarr_store import is_zarr_array, read_zarr_array

        if is_zarr_array(path):
            return read_zarr_array(path)
        series = read_series(path, options.nonuniform_slices, options.dicom_key)
        data, affine = tio.io.sitk_to_nib(series, keepdim=True)
    elif (name := format_of(path)) != "NIfTI":
        image = _itk_call(path, name, sitk.ReadImage, str(path))
        data, affine = tio.io.sitk_to_nib(image, keepdim=True)
    else:
        image = nib.load(path)
        data, affine = np.asanyarray(image.dataobj), image.affine
        if data.ndim == 4:  # (x, y, z, C) -> (C, x, y, z)
            data = np.moveaxis(data, -1, 0)
    return data, check_affine(affine, str(path))


def _itk_call(path: Path, name: str, function: Callable, *args):
    try:
        return function(*args)
    except RuntimeError as error:
        raise DataError(
            f"{path}: cannot be read as a {name} image: damaged or truncated data, or a "
            f"missing data file ({_itk_reason(error)})"
        ) from error


def _itk_reason(error: RuntimeError) -> str:
    """The last informative line of an ITK exception, without its source file and object
    addresses."""
    text = re.sub(r"(itk::)?(ITK )?ERROR: \w+\(0x[0-9a-f]+\): |\[nrrd\] ", "", str(error))
    lines = [line.strip() for line in text.splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Exception", "Reason"))]
    return useful[-1] if useful else lines[0]


@dataclass(frozen=True)
class ImageHeader:
    """An image's shape ([x, y, z] or [x, y, z, C]) and RAS affine."""

    shape: tuple[int, ...]
    affine: np.ndarray


def read_header(path: Path, options: ReadOptions = DEFAULT_READING) -> ImageHeader:
    """Shape and affine without reading the voxels (a DICOM series is read whole: its
    slice positions are checked on the way).

    Raises:
        DataError: naming the file when it is missing, of an unknown format or unreadable.
    """
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    name = format_of(path)
    if name == "DICOM":
        data, affine = read_image(path, options)
        channels, *spatial = data.shape
        return ImageHeader(tuple(spatial) if channels == 1 else (*spatial, channels), affine)
    if name == "NIfTI":
        try:
            image = nib.load(path)
        except Exception as error:  # nibabel raises many types for unreadable files
            raise DataError(
                f"{path}: cannot be opened as an image ({type(error).__name__}: {error})"
            ) from error
        return ImageHeader(tuple(image.shape), check_affine(image.affine, str(path)))
    reader = _itk_information(path, name)
    components = reader.GetNumberOfComponents()
    shape = tuple(reader.GetSize()) + ((components,) if components > 1 else ())
    return ImageHeader(shape, check_affine(tio.io.get_ras_affine_from_sitk(reader), str(path)))


def _itk_information(path: Path, name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _itk_call(path, name, reader.ReadImageInformation)
    return reader


def open_as_nifti(path: str | Path) -> nib.Nifti1Image:
    """A NIfTI file as nibabel opens it (header kept); any other image read into a NIfTI
    image with its affine, so code that reads NIfTI files accepts every format."""
    path = Path(path)
    if image_ending(path.name) in NIFTI_ENDINGS:
        return nib.load(path)
    data, affine = read_image(path)
    data = np.asarray(data)
    if data.ndim == 4:  # (C, x, y, z) -> (x, y, z, C), one channel as 3D
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    return nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))


def save_like(reference: Path, affine: np.ndarray, outputs: Mapping[Path, np.ndarray]) -> None:
    """Write each array of `outputs` (path -> [x, y, z] or [x, y, z, K] data on the grid of
    the RAS `affine`, as the image `reference` was read), atomically and all or none: as
    NIfTI (with the reference's header when it is NIfTI) or, for a ``.nrrd``/``.mha`` path,
    with the reference's exact origin, spacing and direction."""
    atomic_save_files(
        {path: _writer(reference, data, affine, path) for path, data in outputs.items()}
    )


def _writer(
    reference: Path, data: np.ndarray, affine: np.ndarray, path: Path
) -> Callable[[Path], object]:
    if image_ending(path.name) in NIFTI_ENDINGS:
        image = _nifti_like(reference, data, affine)
        return lambda tmp: nib.save(image, tmp)
    itk_image = _itk_like(reference, data)
    return lambda tmp: sitk.WriteImage(itk_image, str(tmp), True)  # compressed


def _nifti_like(reference: Path, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """`data` with the affine (and the reference's header when it is NIfTI: with the data's
    own dtype and shape, no scaling)."""
    if image_ending(reference.name) in NIFTI_ENDINGS:
        source = nib.load(reference)
        image = type(source)(data, source.affine, source.header.copy())
    else:
        image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    image.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1, 0)
    image.header["cal_min"] = image.header["cal_max"] = 0
    return image


def _itk_like(reference: Path, data: np.ndarray) -> sitk.Image:
    information = _itk_information(reference, format_of(reference))
    axes = (2, 1, 0, 3)[: data.ndim]  # (x, y, z[, K]) -> SimpleITK's (z, y, x[, K])
    image = sitk.GetImageFromArray(np.transpose(data, axes), isVector=data.ndim == 4)
    image.SetOrigin(information.GetOrigin())
    image.SetSpacing(information.GetSpacing())
    image.SetDirection(information.GetDirection())
    return image
