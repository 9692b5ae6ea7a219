"""Read any image file into an 8-bit grayscale array at the model size.

All decoding lives here, and both ``prepare`` and ``classify`` call :func:`load_image`, so
what a model was trained on and what it is later shown can never drift apart.

Choices, each one deliberate:

- Colour (RGB, CMYK, P, YCbCr, ...) becomes luma (ITU-R 601-2, Pillow's ``convert("L")``).
- Transparency (RGBA, LA, P with a transparent index) is composited on black: in an X-ray,
  black is air, the natural background, and a transparent margin must not become white.
- 16-bit and wider images (``I;16*``, ``I``, ``F``) are stretched by their own range
  (min..max of the image -> 0..255), not divided by 65535: X-ray PNG/TIFFs often hold 10-
  or 12-bit data in 16-bit containers, which a fixed /65535 would turn almost black. A
  constant image becomes all zeros.
- EXIF orientation is applied before anything else about geometry.
- JPEGs are decoded at reduced scale (libjpeg's DCT scaling, Pillow's ``draft``) to the
  smallest scale that still keeps both sides at least ``size``: at 64 px this decodes the
  224 px Kermany files at 112 px and large originals at 1/8, which is where most of the
  time went; the final resize still does proper antialiasing.
- ``fit``: ``squash`` resizes the whole image to a square (what the paper did), ``crop``
  takes the centred square, ``pad`` letterboxes onto black.
- Resampling: Lanczos with ``reducing_gap`` (Pillow first reduces by an integer box filter
  when the image is much larger than the target, then finishes with Lanczos).
- An image over Pillow's ``MAX_IMAGE_PIXELS`` is refused before it is decoded; truncated
  files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off).
- Only regular files are read (a FIFO, ``/dev/zero`` or a socket would hang or never end),
  and at most :data:`MAX_FILE_BYTES` (256 MiB) of one: far above any real X-ray (a
  uncompressed 4,000 x 4,000 16-bit DICOM is 32 MiB), low enough that several decoding
  processes at once cannot exhaust a machine's memory.
- DICOM (``.dcm``/``.dicom`` or the ``DICM`` magic) through pydicom when installed:
  modality LUT (RescaleSlope/Intercept), then VOI LUT or window, MONOCHROME1 inverted, then
  stretched by range like 16-bit images.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from threengan_cli.core.errors import Failure

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".webp"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
FITS = ("squash", "crop", "pad")
DICOM_HINT = "DICOM needs the dicom extra: pip install 'threengan[dicom]'"
MAX_FILE_BYTES = 256 * 1024 * 1024  # bytes read of one image file at most (see above)

# The model's input range: uint8 pixels p become p * scale + offset, in [-1, 1], the range
# the generator's tanh produces. The one definition; every checkpoint records it, and the
# loaders (torch and NumPy) apply the one a checkpoint records.
NORMALISATION = {"scale": 1 / 127.5, "offset": -1.0, "range": [-1.0, 1.0]}

_RESAMPLE = Image.Resampling.LANCZOS
_REDUCING_GAP = 3.0
_EXIF_ORIENTATION = 0x0112


class ImageReadError(Exception):
    """A file that cannot be used as an image; the message is a short human reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file name looks like an image we read: a known suffix, or a DICOM magic.

    Hidden files (``.DS_Store``, ``._IM-0001.jpeg`` resource forks) never count.
    """
    name = os.path.basename(os.fspath(path))
    if name.startswith("."):
        return False
    suffix = os.path.splitext(name)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix == "":  # DICOM files often carry no extension
        try:
            fd = _open_regular(path)
        except (OSError, ImageReadError):
            return False
        with os.fdopen(fd, "rb") as fh:
            return _is_dicom(fh.read(132))
    return False


def _is_dicom(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``, refused unless it is a regular file.

    Opened non-blocking, so that a FIFO is refused instead of waiting for a writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageReadError("is a folder")
        if not stat.S_ISREG(mode):
            raise ImageReadError(f"not a regular file ({_kind(mode)})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The file's bytes, with OS errors turned into :class:`ImageReadError` reasons.

    Only a regular file is read, and at most ``limit`` bytes of it (default
    :data:`MAX_FILE_BYTES`); a larger file is refused before it is read."""
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        fd = _open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise ImageReadError(f"file too large ({size} bytes > limit {limit})")
            data = fh.read(limit + 1)  # a file still growing stops at the limit too
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except IsADirectoryError:
        raise ImageReadError("is a folder") from None
    except OSError as exc:
        raise ImageReadError(f"unreadable ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise ImageReadError(f"file too large (over the limit of {limit} bytes)")
    return data


def load_image(path: str | os.PathLike, size: int, fit: str = "squash") -> np.ndarray:
    """Decode one image file to a ``(size, size)`` uint8 grayscale array.

    Raises :class:`ImageReadError` with a short reason for anything unusable.
    """
    return decode(read_bytes(path), size, fit, name=os.fspath(path))


def load_image_and_hash(
    path: str | os.PathLike, size: int, fit: str = "squash"
) -> tuple[np.ndarray, str]:
    """:func:`load_image` plus the sha256 of the file's bytes (read once)."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    return decode(data, size, fit, name=os.fspath(path)), digest


def decode(data: bytes, size: int, fit: str = "squash", name: str = "") -> np.ndarray:
    """Decode an encoded image held in memory; ``name`` only helps recognise DICOM."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, not {fit!r}")
    if not data:
        raise ImageReadError("zero-byte file")
    if _is_dicom(data[:132]) or os.path.splitext(name)[1].lower() in DICOM_SUFFIXES:
        return from_array(_dicom_pixels(data), size, fit)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                img.draft("L", (size, size))
            img.load()
            return _finish(img, size, fit)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        pixels = _pixels_in(str(exc))
        raise ImageReadError(f"over the pixel limit ({pixels} px > {limit})") from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        lowered = text.lower()
        if "truncated" in lowered or isinstance(exc, EOFError) or "broken data" in lowered:
            raise ImageReadError("truncated image") from None
        raise ImageReadError(f"cannot decode ({text or type(exc).__name__})") from None


def _pixels_in(message: str) -> str:
    """Pillow's bomb messages start 'Image size (N pixels) exceeds ...'."""
    import re

    found = re.search(r"\((\d+) pixels\)", message)
    return found.group(1) if found else "?"


def _finish(img: Image.Image, size: int, fit: str) -> np.ndarray:
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return _fit(_to_gray(img), size, fit)


def _to_gray(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit ``L`` (see the module docstring for the choices)."""
    mode = img.mode
    if mode == "L":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        if mode == "PA":
            img = img.convert("RGBA")
        black = Image.new("L", img.size, 0)
        black.paste(img.convert("L"), mask=img.getchannel("A"))
        return black
    if mode.startswith(("I", "F")):
        return Image.fromarray(stretch(np.asarray(img)))
    if mode == "1":
        return img.convert("L")
    try:
        return img.convert("L")
    except ValueError:  # modes Pillow cannot take straight to L (e.g. LAB, HSV)
        return img.convert("RGB").convert("L")


def stretch(values: np.ndarray) -> np.ndarray:
    """Any numeric array to uint8 by its own min..max; a constant array becomes zeros."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)))
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def from_array(pixels: np.ndarray, size: int, fit: str = "squash") -> np.ndarray:
    """An in-memory image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to ``(size, size)``.

    uint8 arrays are taken as they are; anything else is stretched by its range. Used for
    MedMNIST ``.npz`` arrays and DICOM pixel data.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        if pixels.dtype != np.uint8:
            pixels = stretch(pixels)
        img = Image.fromarray(np.ascontiguousarray(pixels))  # RGB or RGBA
    elif pixels.ndim == 2:
        if pixels.dtype != np.uint8:
            pixels = stretch(pixels)
        img = Image.fromarray(np.ascontiguousarray(pixels))  # L
    else:
        raise ImageReadError(f"unsupported pixel array shape {pixels.shape}")
    return _fit(_to_gray(img), size, fit)


def _fit(img: Image.Image, size: int, fit: str) -> np.ndarray:
    w, h = img.size
    if fit == "squash" or w == h:
        if (w, h) != (size, size):
            img = img.resize((size, size), _RESAMPLE, reducing_gap=_REDUCING_GAP)
    elif fit == "crop":
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize(
            (size, size),
            _RESAMPLE,
            box=(left, top, left + side, top + side),
            reducing_gap=_REDUCING_GAP,
        )
    else:  # pad: letterbox on black
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        inner = img.resize((nw, nh), _RESAMPLE, reducing_gap=_REDUCING_GAP)
        img = Image.new("L", (size, size), 0)
        img.paste(inner, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(img, dtype=np.uint8).copy()


def _dicom_pixels(data: bytes) -> np.ndarray:
    """DICOM pixel data after modality and VOI transforms, MONOCHROME1 inverted."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageReadError(DICOM_HINT) from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        limit = Image.MAX_IMAGE_PIXELS
        if limit and rows * cols > limit:
            raise ImageReadError(f"over the pixel limit ({rows * cols} px > {limit})")
        if "PixelData" not in ds:
            raise ImageReadError("DICOM without pixel data")
        arr = ds.pixel_array
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            arr = arr[0]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if photometric.startswith("MONOCHROME"):
            arr = apply_modality_lut(arr, ds)
            arr = apply_voi_lut(arr, ds)
            arr = np.asarray(arr, dtype=np.float64)
            if photometric == "MONOCHROME1":  # high values are dark: flip to MONOCHROME2
                arr = arr.max() + arr.min() - arr
        return arr
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises many kinds for broken files
        raise ImageReadError(f"unreadable DICOM ({exc})") from None


class GridUnavailable(Failure):
    """torchvision, which draws sample grids, does not import; one line for the user."""


def grid_maker():
    """torchvision's ``make_grid``. Only the training and generate paths, which have torch
    already, make grids: torchvision is imported here, on first use, so that decoding never
    needs it. A torchvision that does not import (missing, or built for another torch:
    "operator torchvision::nms does not exist") is a :class:`GridUnavailable` naming both
    versions and the fix; training asks before its first epoch, not after it."""
    try:
        from torchvision.utils import make_grid
    except Exception as exc:  # RuntimeError, ImportError, OSError (a missing .so): all "broken"
        from threengan_cli.core.system import torchvision_problem

        problem = torchvision_problem(exc)
        raise GridUnavailable(f"sample grids need torchvision: {problem}") from None
    return make_grid


def grid_png(pixels: np.ndarray, nrow: int = 8, pad: int = 2) -> bytes:
    """An 8-bit grayscale PNG of uint8 images (B, H, W) laid out by torchvision's
    ``make_grid``: ``nrow`` per row, ``pad`` px black gutters; one image is written as it is."""
    import torch

    make_grid = grid_maker()
    # make_grid repeats a single channel into three; the first is the grayscale grid.
    grid = make_grid(torch.from_numpy(pixels)[:, None], nrow=nrow, padding=pad)[0]
    buf = io.BytesIO()
    Image.fromarray(grid.numpy()).save(buf, format="PNG")
    return buf.getvalue()
