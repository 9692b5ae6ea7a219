"""``benchmark merge``: the shards of one grid (``--shard I/N`` folders) joined into one report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from threengan_cli.bench.benchmark import BenchmarkError, read_json, read_run_record
from threengan_cli.bench.grid import PROFILES, BenchmarkSettings, cells, comparison_pairs, grid
from threengan_cli.bench.report import reductions, write_outputs
from threengan_cli.core.config import explain
from threengan_cli.train import runs


def merge(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Join the outputs of shards (or of any benchmark folders with one grid) into one
    report; the same aggregation as an unsharded run. Runs missing from every folder are
    listed as missing, not silently left out."""
    if not dirs:
        raise BenchmarkError("give at least one benchmark folder to merge")
    cfg: BenchmarkSettings | None = None
    dataset = None
    found: dict[str, Path] = {}
    for d in map(Path, dirs):
        manifest_path = d / "benchmark.json"
        if not manifest_path.is_file():
            raise BenchmarkError(f"{d} is not a benchmark folder (no benchmark.json)")
        manifest = read_json(manifest_path)
        try:
            this = BenchmarkSettings(**manifest["settings"])
        except ValidationError as exc:
            why = explain(exc, "benchmark", BenchmarkSettings)
            raise BenchmarkError(f"{manifest_path} holds no valid settings ({why})") from None
        except (KeyError, TypeError) as exc:
            raise BenchmarkError(f"{manifest_path} holds no valid settings ({exc})") from None
        if cfg is None:
            cfg, dataset = this, manifest.get("dataset")
        else:
            a = this.model_dump(exclude={"device"})
            b = cfg.model_dump(exclude={"device"})
            if a != b:
                k = next(k for k in a if a[k] != b[k])
                raise BenchmarkError(
                    f"{d} is a different benchmark ({k} = {a[k]!r} there, {b[k]!r} in "
                    f"{dirs[0]}); merge only shards of one grid"
                )
        for run_dir in sorted((d / "runs").glob("*")):
            done = runs.state(run_dir) in ("finished", "failed")
            if done and run_dir.name not in found:
                found[run_dir.name] = run_dir
    assert cfg is not None
    specs = grid(cfg)
    records = [read_run_record(found[s.name]) for s in specs if s.name in found]
    return write_outputs(
        Path(out),
        cfg,
        dataset or "",
        [s.name for s in specs],
        cells(cfg),
        comparison_pairs(cfg),
        records,
        reductions(cfg, PROFILES["paper"]),
        merged_from=[str(d) for d in dirs],
    )
