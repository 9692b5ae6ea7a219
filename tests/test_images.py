"""images.load_image: every format and mode to (size, size) uint8, and clear reasons."""

from __future__ import annotations

import importlib.util
import io
import math
import sys

import numpy as np
import pytest
from image_factory import pixels, save
from PIL import Image

from threengan_cli.data import images
from threengan_cli.data.images import ImageReadError, is_image_file, load_image


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"])
@pytest.mark.parametrize("mode", ["L", "RGB", "P", "1"])
def test_load_image_reads_common_formats_and_modes_to_gray_uint8(tmp_path, suffix, mode):
    if suffix in (".jpg", ".jpeg") and mode == "P":
        pytest.skip("JPEG has no palette mode")
    path = save(tmp_path / f"x{suffix}", seed=1, mode=mode, size=(40, 30))
    out = load_image(path, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8


def test_load_image_of_gray_png_at_own_size_is_exact(tmp_path):
    path = save(tmp_path / "a.png", seed=3)
    np.testing.assert_array_equal(load_image(path, 24), pixels(3))


def test_rgb_becomes_luma(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200
    Image.fromarray(rgb).save(tmp_path / "g.png")
    assert abs(int(load_image(tmp_path / "g.png", 8)[0, 0]) - round(0.587 * 200)) <= 1


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[:, :4, 3] = 0  # left half transparent white
    Image.fromarray(rgba).save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png", 8)
    assert out[:, :4].max() == 0 and out[:, 4:].min() == 255


def test_cmyk_tiff_reads(tmp_path):
    path = save(tmp_path / "c.tif", seed=2, mode="CMYK")
    assert load_image(path, 8).shape == (8, 8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_stretched_by_its_own_range(tmp_path, mode):
    # 12-bit data in a 16-bit container: /65535 would make it nearly black
    ramp = np.tile(np.linspace(0, 4095, 16), (16, 1))
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    img = Image.fromarray(ramp.astype(dtype))
    path = tmp_path / ("d.png" if mode == "I;16" else "d.tif")
    img.save(path)
    out = load_image(path, 16)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20), np.uint8)
    arr[:, :10] = 255  # left half white in the stored (landscape) pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "o.jpg", 20, fit="pad")
    # displayed portrait: white on top, so the padded square has white top rows
    assert out[2:8, 8:12].mean() > 200 and out[12:18, 8:12].mean() < 50


def test_fit_crop_takes_the_centre_and_pad_adds_black(tmp_path):
    arr = np.full((10, 30), 255, np.uint8)
    arr[:, :10] = 0
    arr[:, 20:] = 0
    Image.fromarray(arr).save(tmp_path / "w.png")
    assert load_image(tmp_path / "w.png", 10, fit="crop").min() >= 250
    padded = load_image(tmp_path / "w.png", 30, fit="pad")
    assert padded[:8].max() == 0 and padded[-8:].max() == 0
    assert load_image(tmp_path / "w.png", 10, fit="squash").shape == (10, 10)


def test_large_jpeg_uses_reduced_scale_decoding(tmp_path, monkeypatch):
    path = save(tmp_path / "big.jpg", seed=1, size=(800, 800))
    from PIL.JpegImagePlugin import JpegImageFile

    seen = []
    original = JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        seen.append(self.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    assert load_image(path, 64).shape == (64, 64)
    assert seen == [(100, 100)]  # 1/8 scale: the smallest that keeps >= 64


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "zero-byte file"), (b"hello, not a picture\n", "not an image")],
)
def test_unusable_bytes_give_short_reasons(tmp_path, content, reason):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        load_image(tmp_path / "x.png", 8)


def test_truncated_jpeg_is_an_error(tmp_path):
    path = save(tmp_path / "t.jpg", seed=1, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(path, 16)


def test_image_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", seed=1, size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: a warning, made an error
    with pytest.raises(ImageReadError, match=r"over the pixel limit \(1600 px > 1000\)"):
        load_image(path, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 > 2x: Pillow's own error
    with pytest.raises(ImageReadError, match="over the pixel limit"):
        load_image(path, 8)


def test_missing_file_and_folder_give_reasons(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "nope.png", 8)
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path, 8)


def test_permission_denied_is_a_reason(tmp_path, monkeypatch):
    path = save(tmp_path / "p.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("threengan_cli.data.images.os.open", denied)
    with pytest.raises(ImageReadError, match="permission denied"):
        load_image(path, 8)


def _dicom_bytes(arr: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=12)
    for key, value in extra.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_monochrome1_is_inverted_and_read_without_suffix(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 16), (16, 1)).astype(np.uint16)
    (tmp_path / "plain.dcm").write_bytes(_dicom_bytes(ramp))
    (tmp_path / "inverted").write_bytes(_dicom_bytes(ramp, "MONOCHROME1"))
    assert is_image_file(tmp_path / "inverted")
    plain = load_image(tmp_path / "plain.dcm", 16)
    inverted = load_image(tmp_path / "inverted", 16)
    assert plain[0, 0] == 0 and plain[0, -1] == 255
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_dicom_window_is_applied(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 16), (16, 1)).astype(np.uint16)
    data = _dicom_bytes(ramp, WindowCenter=1000, WindowWidth=400)
    (tmp_path / "w.dcm").write_bytes(data)
    out = load_image(tmp_path / "w.dcm", 16)
    assert out[0, -1] == 255 and (out[0] == 255).sum() > 8  # above the window: saturated


def test_dicom_without_pydicom_asks_for_the_extra(tmp_path, monkeypatch):
    ramp = np.zeros((8, 8), np.uint16)
    (tmp_path / "x.dcm").write_bytes(_dicom_bytes(ramp))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImageReadError, match=r"pip install 'threengan\[dicom\]'"):
        load_image(tmp_path / "x.dcm", 8)


def test_is_image_file_skips_hidden_and_other_names(tmp_path):
    assert not is_image_file(tmp_path / ".DS_Store")
    assert not is_image_file(tmp_path / "._IM-0001.jpeg")
    assert not is_image_file(tmp_path / "notes.txt")
    assert is_image_file(tmp_path / "IM-0001.JPEG")
    assert ".png" in images.IMAGE_SUFFIXES


# grids are drawn by torchvision, which a classify-only install (no torch) does not have
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="grids need torch and torchvision"
)


def _grid_before_torchvision(pixels: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """The grid layout grid_png had before it used torchvision's make_grid."""
    b, h, w = pixels.shape
    rows = -(-b // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.uint8)
    for i in range(b):
        top, left = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        grid[top : top + h, left : left + w] = pixels[i]
    return grid


@needs_torch
@pytest.mark.parametrize(
    ("count", "nrow"),
    [(64, 8)]  # training's sample grid
    + [(n, math.ceil(math.sqrt(n))) for n in (2, 3, 10, 16, 17, 63, 64)],  # generate's
)
def test_grid_png_keeps_the_layout_and_pixels_of_its_numpy_version(count, nrow):
    pixels = np.random.default_rng(count).integers(0, 256, (count, 12, 10), dtype=np.uint8)
    with Image.open(io.BytesIO(images.grid_png(pixels, nrow=nrow))) as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), _grid_before_torchvision(pixels, nrow))


@needs_torch
def test_a_torchvision_that_does_not_import_is_one_line_naming_both_versions(broken_torchvision):
    import torch

    pixels = np.zeros((4, 12, 10), dtype=np.uint8)
    with pytest.raises(images.GridUnavailable) as info:
        images.grid_png(pixels)
    message = str(info.value)
    assert "\n" not in message
    assert f"does not work with torch {torch.__version__}" in message
    assert "torchvision::nms" in message and "pip install --force-reinstall" in message


@needs_torch
def test_a_grid_of_one_image_is_that_image_without_gutters():
    pixels = np.random.default_rng(1).integers(0, 256, (1, 12, 10), dtype=np.uint8)
    with Image.open(io.BytesIO(images.grid_png(pixels, nrow=1))) as img:
        np.testing.assert_array_equal(np.asarray(img), pixels[0])
