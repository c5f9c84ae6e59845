"""The image file formats medseg reads, and the case ids their file names give.

One table serves every place that looks for images (dataset discovery, validation, predict
inputs, eval folders): NIfTI is read with nibabel, NRRD and MetaImage with SimpleITK, and a
folder holding one DICOM series with SimpleITK/GDCM (see :mod:`medseg.data.image_io`). Zarr
datasets are discovered on their own (:mod:`medseg.data.zarr_store`).
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import ConfigError, DataError

# format name -> file endings; the first ending is the one medseg writes
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "NIfTI": (".nii.gz", ".nii"),
    "NRRD": (".nrrd", ".nhdr"),
    "MetaImage": (".mha", ".mhd"),
}
# Longest first, so ``.nii.gz`` is found before any shorter ending it contains.
IMAGE_ENDINGS = tuple(
    sorted((e for endings in IMAGE_FORMATS.values() for e in endings), key=len, reverse=True)
)
NIFTI_ENDINGS = IMAGE_FORMATS["NIfTI"]
# What `output_format` may say: write predictions in the input's format, or always NIfTI.
OUTPUT_FORMATS = ("input", "nifti")


def supported_formats() -> str:
    """The readable formats, as error messages list them."""
    files = ", ".join(f"{name} ({' '.join(endings)})" for name, endings in IMAGE_FORMATS.items())
    return f"{files} or a folder holding one DICOM series"


def image_ending(name: str) -> str | None:
    """The known image ending of a file name (case-sensitive, as the libraries are), or None."""
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def format_of(path: Path) -> str:
    """``NIfTI``, ``NRRD``, ``MetaImage`` or ``DICOM`` (a folder).

    Raises:
        DataError: naming the file and the supported formats when the ending is unknown.
    """
    if path.is_dir():
        return "DICOM"
    ending = image_ending(path.name)
    if ending is None:
        raise DataError(
            f"{path}: unknown image format {_suffix(path.name)!r}; medseg reads "
            f"{supported_formats()}"
        )
    return next(name for name, endings in IMAGE_FORMATS.items() if ending in endings)


def _suffix(name: str) -> str:
    suffixes = Path(name).suffixes
    return "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])


def strip_image_ending(name: str) -> str:
    """``case.nii.gz``, ``case.nrrd``, ``case.mha`` -> ``case``; other names stay as they are
    (a DICOM series folder is named after its case)."""
    ending = image_ending(name)
    return name[: -len(ending)] if ending else name


def output_ending(reference: Path, output_format: str) -> str:
    """The ending of a prediction written for the input `reference`: the input's format in
    its single-file form (``.nhdr`` -> ``.nrrd``, ``.mhd`` -> ``.mha``: a detached header and
    data file could not be replaced in one atomic rename), or NIfTI for DICOM series and with
    ``output_format=nifti``."""
    check_output_format(output_format)
    if output_format == "nifti" or reference.is_dir():
        return NIFTI_ENDINGS[0]
    return IMAGE_FORMATS[format_of(reference)][0]


def check_output_format(output_format: str) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"output_format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}"
        )
