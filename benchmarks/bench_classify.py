"""Throughput and memory of ``threengan classify`` against the floor of merely decoding.

Throughput: N full-size JPEG chest X-rays (synthetic 1500x1300 by default, or a folder of
real ones with --folder) are classified end to end (expanding paths, decoding in the pool,
the model, building rows); the floor is decoding and resizing the same files with the same
function (``images.load_image``, JPEG draft mode) in a process pool on all cores, with no
model. Both are medians over repeats, pool start-up included in both. The target is a ratio
within 1.2x. Inference alone (the model on ready uint8 batches) is timed too, to show which
side is the bottleneck.

--heatmaps: the NumPy engine with ``--heatmaps`` (a PNG per image into a temporary folder) and
with ``--report`` too, timed in turn with the plain run within each repeat; the ratios are
what they cost classify (target: >= 0.5x the throughput without them).

--onnx: the same model exported (``threengan export``) and run by onnxruntime, beside the
NumPy and torch engines.

--stats: the same model twice, without and with out-of-distribution statistics and a
temperature (fitted here on 256 random images, as training fits them on its own), timed in
turn within each repeat: the ratio is what the out-of-distribution score costs classify.

Memory (--memory): peak RSS of the ``threengan classify -`` process over 1,000 and 100,000
paths on stdin (100 tiny PNGs repeated), to show that memory stays flat with the input size.

    python benchmarks/bench_classify.py                      # 400 synthetic X-rays, width 64
    python benchmarks/bench_classify.py --folder /work/shared/data/kermany-chest-xray/val
    python benchmarks/bench_classify.py --stats              # the cost of the ood score
    python benchmarks/bench_classify.py --heatmaps --folder ../shared/data/kermany-chest-xray/test
    python benchmarks/bench_classify.py --memory
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from threengan_cli.data import images


def make_model(path: Path, width: int, image_size: int, stats: bool = False) -> Path:
    """A randomly initialised 3ngan checkpoint as shipped (G and C only): same FLOPs as a
    trained one; with ``stats``, out-of-distribution statistics and a temperature too."""
    import torch

    from threengan_cli.core.settings import TrainSettings
    from threengan_cli.data.images import NORMALISATION
    from threengan_cli.infer import ood
    from threengan_cli.model import checkpoints
    from threengan_cli.model.methods import METHODS
    from threengan_cli.train.scoring import _logits_and_features

    settings = TrainSettings(width=width)
    torch.manual_seed(0)
    nets = METHODS["3ngan"].networks(settings, 2, image_size)
    meta = {
        "method": "3ngan",
        "settings": settings.model_dump(mode="json"),
        "classes": ["normal", "pneumonia"],
        "num_classes": 2,
        "image_size": image_size,
        "channels": 1,
        "fit": "squash",
        "normalisation": NORMALISATION,
    }
    stored = None
    if stats:
        rng = np.random.default_rng(0)
        pixels = torch.from_numpy(rng.integers(0, 256, (256, image_size, image_size), np.uint8))
        _, features = _logits_and_features(nets["C"], pixels, 2)
        grid = ood.pixel_features(pixels.numpy())  # the pixel Gaussian too, as training fits
        tensors, info = ood.fit_ood(features[:192], features[192:], pixels=(grid[:192], grid[192:]))
        tensors["temperature"] = np.array(1.5, dtype=np.float32)
        stored = {k: torch.from_numpy(np.array(v, order="C")) for k, v in tensors.items()}
        meta["stats"] = {"ood": info, "temperature": {"split": "val", "images": 64}}
    nets = {k: v for k, v in nets.items() if k in ("G", "C")}
    checkpoints.save(path, meta, nets, stats=stored)
    return path


def synthetic_xrays(folder: Path, n: int, size=(1500, 1300), distinct: int = 16) -> list[Path]:
    """``n`` JPEGs that compress like radiographs (smooth anatomy-like shading plus film
    noise, quality 90, about 0.3 MB each); ``distinct`` different images, copied."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = []
    for k in range(distinct):
        rng = np.random.default_rng(k)
        base = 90 + 60 * np.sin(xx / (60 + 7 * k)) * np.cos(yy / (80 + 5 * k))
        lungs = 70 * np.exp(-(((xx - w * 0.32) / 220) ** 2 + ((yy - h * 0.5) / 380) ** 2))
        lungs += 70 * np.exp(-(((xx - w * 0.68) / 220) ** 2 + ((yy - h * 0.5) / 380) ** 2))
        pixels = np.clip(base + lungs + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)
        target = folder / f"template_{k:02d}.jpeg"
        Image.fromarray(pixels, "L").save(target, quality=90)
        blobs.append(target.read_bytes())
    paths = []
    for i in range(n):
        path = folder / f"xray_{i:05d}.jpeg"
        path.write_bytes(blobs[i % distinct])
        paths.append(path)
    for k in range(distinct):
        (folder / f"template_{k:02d}.jpeg").unlink()
    return paths


def _decode(path: str, size: int) -> int:
    return int(images.load_image(path, size, "squash")[0, 0])


def floor_run(paths: list[str], size: int, workers: int) -> float:
    """Seconds to decode+resize every file on all cores, nothing else."""
    t0 = time.perf_counter()
    chunk = max(1, len(paths) // (workers * 8))
    with ProcessPoolExecutor(workers) as pool:
        for _ in pool.map(_decode, paths, [size] * len(paths), chunksize=chunk):
            pass
    return time.perf_counter() - t0


def classify_run(paths: list[str], model, batch_size: int, workers: int) -> float:
    from threengan_cli.infer.classify import classify

    t0 = time.perf_counter()
    n = sum(1 for row in classify(paths, model, batch_size=batch_size, workers=workers) if row.ok)
    assert n == len(paths), n
    return time.perf_counter() - t0


def visuals_run(
    paths: list[str], model, batch_size: int, workers: int, folder: Path, report: bool
) -> float:
    """:func:`classify_run` with ``--heatmaps`` into ``folder`` (and ``--report``)."""
    from threengan_cli.infer.classify import classify
    from threengan_cli.infer.heatmap import Visuals

    t0 = time.perf_counter()
    page = folder / "report.html" if report else None
    visuals = Visuals(model, folder / "heatmaps", page, {})
    n = 0
    for row in classify(paths, visuals.model, batch_size=batch_size, workers=workers):
        visuals.add(row)
        n += row.ok
    visuals.finish()
    assert n == len(paths), n
    return time.perf_counter() - t0


def inference_rate(model, batch_size: int, batches: int = 20) -> float:
    size = model.image_size
    x = np.random.default_rng(0).integers(0, 256, (batch_size, size, size), dtype=np.uint8)
    model.probabilities_of(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        model.probabilities_of(x)
    return batch_size * batches / (time.perf_counter() - t0)


def throughput(args) -> None:
    import torch

    from threengan_cli.infer import numpy_engine
    from threengan_cli.infer.torch_engine import load_model

    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.folder:
            paths = sorted(p for p in Path(args.folder).rglob("*") if images.is_image_file(p))
            source = f"{len(paths)} files from {args.folder}"
        else:
            paths = synthetic_xrays(tmp / "xrays", args.n)
            mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
            source = f"{len(paths)} synthetic 1500x1300 JPEGs ({mb:.2f} MB each)"
        paths = [str(p) for p in paths]
        checkpoint = make_model(tmp / "m.safetensors", args.width, args.image_size)
        # The CLI's engine on a CPU is NumPy (no torch import); torch's is --device cuda/mps.
        models = {
            "numpy": numpy_engine.load(checkpoint),
            "torch": load_model(checkpoint, device=args.device),
        }
        if args.onnx:  # the same weights exported, run by onnxruntime
            from threengan_cli.infer import onnx_export

            onnx_export.export(models["numpy"], tmp / "m.onnx")
            models["onnx"] = onnx_export.load(tmp / "m.onnx")
        if args.stats:
            scored = make_model(tmp / "s.safetensors", args.width, args.image_size, stats=True)
            models["numpy+ood"] = numpy_engine.load(scored)
            models["torch+ood"] = load_model(scored, device=args.device)
        floor_run(paths[: workers * 4], args.image_size, workers)  # warm the page cache
        floors: list[float] = []
        runs: dict[str, list[float]] = {name: [] for name in models}
        visual = ["numpy+heatmaps", "numpy+heatmaps+report"] if args.heatmaps else []
        runs.update({name: [] for name in visual})
        for _ in range(args.repeats):
            floors.append(floor_run(paths, args.image_size, workers))
            for name, model in models.items():
                runs[name].append(classify_run(paths, model, args.batch_size, workers))
            for name in visual:
                made = tmp / name
                runs[name].append(
                    visuals_run(
                        paths, models["numpy"], args.batch_size, workers, made, "report" in name
                    )
                )
        floor_s = statistics.median(floors)
        n = len(paths)
        print(f"input:      {source}")
        print(
            f"machine:    {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, torch device {models['torch'].device}"
        )
        print(
            f"model:      3ngan C at width {args.width}, {args.image_size}px, batch "
            f"{args.batch_size}, {workers} decoding workers, median of {args.repeats}"
        )
        print(f"floor:          {n / floor_s:8.1f} img/s  (decode+resize only, {floor_s:.2f} s)")
        for name in runs:
            run_s = statistics.median(runs[name])
            print(
                f"classify {name}: {n / run_s:8.1f} img/s  ({run_s:.2f} s; "
                f"{run_s / floor_s:.2f}x the floor, target <= 1.2x)"
            )
        for name in [m for m in models if m.endswith("+ood")]:
            plain = statistics.median(runs[name.removesuffix("+ood")])
            print(
                f"with the ood score, {name.removesuffix('+ood')}: "
                f"{plain / statistics.median(runs[name]):.3f}x the throughput without it"
            )
        for name in visual:
            plain = statistics.median(runs["numpy"])
            print(
                f"with {name.removeprefix('numpy+')}: "
                f"{plain / statistics.median(runs[name]):.3f}x the throughput without "
                "(target >= 0.5x)"
            )
        for name, model in models.items():
            print(
                f"inference {name}: {inference_rate(model, args.batch_size):7.1f} img/s  "
                "(the model alone on ready batches)"
            )


def _rss_of(cmd: list[str], stdin_path: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a command whose stdin is a file (Linux: ru_maxrss in kB)."""
    t0 = time.perf_counter()
    with open(stdin_path) as fh:
        proc = subprocess.Popen(cmd, stdin=fh, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Made in a child process: this one must not import torch, because a child started
        # by fork + exec keeps the parent's resident size in its ru_maxrss.
        ckpt = tmp / "m.safetensors"
        subprocess.run(
            [sys.executable, __file__, "--make-model", str(ckpt), "--width", str(args.width)],
            check=True,
        )
        rng = np.random.default_rng(0)
        tiny = []
        for i in range(100):
            path = tmp / "tiny" / f"img_{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (72, 80), dtype=np.uint8), "L").save(path)
            tiny.append(str(path))
        cmd = [
            sys.executable,
            "-m",
            "threengan_cli",
            "classify",
            "-",
            "--checkpoint",
            str(ckpt),
            "--format",
            "csv",
            "--quiet",
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--device",
            args.device,
        ]
        print(
            f"peak RSS of `threengan classify -` (main process or largest worker), "
            f"{os.cpu_count()} cores, width {args.width}:"
        )
        for n in (1_000, 100_000):
            listing = tmp / f"list_{n}.txt"
            listing.write_text("".join(f"{tiny[i % 100]}\n" for i in range(n)))
            seconds, peak = _rss_of(cmd, listing)
            print(
                f"  {n:>7,} paths: {peak:7.1f} MB peak RSS, {seconds:6.1f} s "
                f"({n / seconds:.0f} img/s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="synthetic X-rays (default 400)")
    parser.add_argument("--folder", help="benchmark on the image files in this folder instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory", action="store_true", help="peak RSS over 1k and 100k paths")
    parser.add_argument("--stats", action="store_true", help="also time the ood score's cost")
    parser.add_argument(
        "--heatmaps", action="store_true", help="also time --heatmaps and --report (numpy)"
    )
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX export")
    parser.add_argument("--make-model", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        make_model(Path(args.make_model), args.width, args.image_size)
    elif args.memory:
        memory(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
