"""JPEG decoding for classify: Pillow's draft decode against ``torchvision.io.decode_image``.

    python benchmarks/bench_decode.py [--size 64] [--repeats 7] [FOLDER ...]

Default folders: the Kermany test split (224 px RGB JPEGs) and val split (16 full-size
grayscale JPEGs, about 1,000 to 1,800 px a side), under ``../shared/data`` from the
repository root. The files are read into memory first: only decoding and resizing are timed.

Three ways from bytes to the ``(size, size)`` uint8 array the model sees, all finishing with
the same resize (``images.from_array``: Lanczos with ``reducing_gap``):

- ``pillow draft``: ``images.decode``, what prepare and classify run. libjpeg decodes at the
  smallest DCT scale (1/2 .. 1/8) that keeps both sides at least ``size``.
- ``pillow full``: Pillow decoding at full scale, then the same resize.
- ``torchvision``: ``decode_image(..., mode=GRAY)`` at full scale (torchvision has no
  reduced-scale decode), then the same resize.

Prints per folder the median over ``--repeats`` rounds of the milliseconds per image (the
three ways take turns within each round, so a busy moment on a shared machine slows all of
them alike), torchvision's time as a ratio of the draft decode's, and how many images come
out pixel-identical to the draft decode's and to Pillow's full decode (and the largest
difference in grey levels): a difference from the draft decode that the full decode shares
comes from decoding at reduced scale, not from the decoder.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from threengan_cli.data import images

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "kermany-chest-xray"


def pillow_draft(data: bytes, size: int) -> np.ndarray:
    return images.decode(data, size)


def pillow_full(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return images.from_array(np.asarray(img.convert("L")), size)


def torchvision_decode(data: bytes, size: int) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_image

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return images.from_array(decode_image(encoded, mode=ImageReadMode.GRAY)[0].numpy(), size)


WAYS = {"pillow draft": pillow_draft, "pillow full": pillow_full, "torchvision": torchvision_decode}


def measure(files: list[bytes], size: int, repeats: int) -> dict[str, float]:
    """Median ms per image of each way, the ways taking turns in every round."""
    for way in WAYS.values():  # warm-up: imports, libjpeg tables
        way(files[0], size)
    rounds: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(repeats):
        for name, way in WAYS.items():
            t0 = time.perf_counter()
            for data in files:
                way(data, size)
            rounds[name].append(1e3 * (time.perf_counter() - t0) / len(files))
    return {name: statistics.median(ms) for name, ms in rounds.items()}


def agreement(files: list[bytes], size: int, reference: str) -> dict[str, tuple[int, int]]:
    """Per way: (images identical to ``reference``'s, largest difference in grey levels)."""
    out = {}
    expected = [WAYS[reference](data, size).astype(np.int16) for data in files]
    for name, way in WAYS.items():
        same, worst = 0, 0
        for data, ref in zip(files, expected, strict=True):
            diff = np.abs(way(data, size).astype(np.int16) - ref)
            same += int(not diff.any())
            worst = max(worst, int(diff.max()))
        out[name] = (same, worst)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    folders = args.folders or [DATA / "test", DATA / "val"]
    import torch
    import torchvision

    torch.set_num_threads(1)  # classify decodes one image per worker process
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Pillow {Image.__version__}; size {args.size}, median of {args.repeats} rounds\n"
    )
    print(
        "| folder | images | way | ms/image | vs draft | same as draft (max diff) "
        "| same as full (max diff) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for folder in folders:
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
        if not paths:
            sys.exit(f"no JPEGs in {folder}")
        files = [p.read_bytes() for p in paths]
        ms = measure(files, args.size, args.repeats)
        draft = agreement(files, args.size, "pillow draft")
        full = agreement(files, args.size, "pillow full")
        n = len(files)
        for name, value in ms.items():
            ratio = value / ms["pillow draft"]
            print(
                f"| {folder.name} | {n} | {name} | {value:.2f} | {ratio:.2f}x "
                f"| {draft[name][0]}/{n} ({draft[name][1]}) "
                f"| {full[name][0]}/{n} ({full[name][1]}) |"
            )


if __name__ == "__main__":
    main()
