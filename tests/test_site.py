"""The site protocol's split (threengan_cli/bench/site.py): patients by name, halves by a fixed
hash, byte copies of held-out images kept out of the pool, links instead of copies, and the
study's paired summary."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from image_factory import save

from threengan_cli.bench import site
from threengan_cli.bench.report import mean_std
from threengan_cli.core import fileio


def test_patient_ids_read_from_kermany_names_join_normal2_and_im_stems():
    assert site.patient_of("/x/PNEUMONIA/person1661_virus_2873.jpeg") == "person1661"
    assert site.patient_of("person12_bacteria_3.jpeg") == "person12"
    assert site.patient_of("IM-0115-0001.jpeg") == "IM-0115"
    assert site.patient_of("NORMAL2-IM-0115-0001-0002.jpeg") == site.patient_of("IM-0115-0002.jpeg")
    assert site.patient_of("/a/scan.png") == "file:scan.png"
    nih = r"^(\d{8})_"
    assert site.patient_of("/x/00001280_004.png", nih) == site.patient_of("00001280_000.png", nih)
    assert site.patient_of("00001280_004.png", nih) == "00001280"


def test_a_patients_half_is_the_parity_of_its_ids_sha256():
    for patient in ("person1", "person2", "IM-0115", "file:x.png"):
        first = hashlib.sha256(patient.encode()).digest()[0]
        assert site.half_of(patient) == ("A" if first % 2 == 0 else "B")
    found = {site.half_of(f"person{i}") for i in range(20)}
    assert found == {"A", "B"}


def _ids_in(half: str, count: int) -> list[int]:
    return [i for i in range(1000) if site.half_of(f"person{i}") == half][:count]


def _site(tmp_path, seed0: int = 0):
    """Two images per patient, patients in both halves, NORMAL2 and IM names of one patient."""
    root = tmp_path / "site"
    seed = seed0
    for i in range(12):
        for _ in range(2):
            seed += 1
            save(root / "PNEUMONIA" / f"person{i}_bacteria_{seed}.jpeg", seed=seed)
    save(root / "NORMAL" / "IM-0115-0001.jpeg", seed=900)
    save(root / "NORMAL" / "NORMAL2-IM-0115-0001.jpeg", seed=901)
    save(root / "NORMAL" / "IM-0200-0001.jpeg", seed=902)
    return root


def test_halves_hold_every_file_once_and_no_patient_in_both(tmp_path):
    files = site.site_files(_site(tmp_path))
    halves = site.halves(files)
    assert sorted(f.path for h in halves.values() for f in h) == sorted(f.path for f in files)
    patients = {h: {f.patient for f in fs} for h, fs in halves.items()}
    assert not patients["A"] & patients["B"]
    assert all(halves.values())
    im = [f for f in files if f.patient == "IM-0115"]
    assert len(im) == 2 and {f.label for f in im} == {"NORMAL"}


def test_the_split_is_the_same_whatever_the_order_of_the_files(tmp_path):
    files = site.site_files(_site(tmp_path))
    one, two = site.split(files, "A"), site.split(list(reversed(files)), "A")
    assert {f.path for f in one.pool} == {f.path for f in two.pool}
    assert {f.path for f in one.held_out} == {f.path for f in two.held_out}


def test_a_pool_file_with_the_bytes_of_a_held_out_file_is_left_out(tmp_path):
    root = _site(tmp_path)
    a, b = _ids_in("A", 1)[0], _ids_in("B", 1)[0]
    # the same bytes under a patient of each half (as NORMAL2-IM-0095 / -0096 in Kermany)
    save(root / "PNEUMONIA" / f"person{a}_virus_7000.jpeg", seed=7000)
    save(root / "PNEUMONIA" / f"person{b}_virus_7001.jpeg", seed=7000)
    files = site.site_files(root)
    pool_a = site.split(files, "A")
    assert [os.path.basename(f.path) for f in pool_a.dropped] == [f"person{a}_virus_7000.jpeg"]
    held = {os.path.basename(f.path) for f in pool_a.held_out}
    assert f"person{b}_virus_7001.jpeg" in held
    pool_digests = {fileio.sha256_of(f.path) for f in pool_a.pool}
    assert not pool_digests & {fileio.sha256_of(f.path) for f in pool_a.held_out}
    # the reverse direction drops B's copy instead
    pool_b = site.split(files, "B")
    assert [os.path.basename(f.path) for f in pool_b.dropped] == [f"person{b}_virus_7001.jpeg"]
    assert len(pool_a.pool) + len(pool_a.dropped) == len(pool_b.held_out)


def test_without_byte_copies_nothing_is_dropped(tmp_path):
    files = site.site_files(_site(tmp_path))
    for half in site.HALVES:
        found = site.split(files, half)
        assert found.dropped == []
        assert len(found.pool) + len(found.held_out) == len(files)


def test_link_folders_point_at_the_files_and_are_made_afresh(tmp_path):
    files = site.site_files(_site(tmp_path))
    flat = site.link_folder(files[:3], tmp_path / "pool", by_class=False)
    links = sorted(flat.iterdir())
    assert len(links) == 3 and all(p.is_symlink() for p in links)
    assert sorted(os.path.realpath(p) for p in links) == sorted(f.path for f in files[:3])
    tree = site.link_folder(files, tmp_path / "held", by_class=True)
    assert sorted(p.name for p in tree.iterdir()) == ["NORMAL", "PNEUMONIA"]
    site.link_folder(files[:1], tmp_path / "held", by_class=True)
    assert len([p for p in tree.rglob("*") if p.is_symlink()]) == 1
    assert all(os.path.isfile(f.path) for f in files)  # the targets are untouched


def test_link_folders_already_made_are_left_in_place(tmp_path, monkeypatch):
    files = site.site_files(_site(tmp_path))
    site.link_folder(files, tmp_path / "held", by_class=True)
    made = []
    real = Path.symlink_to
    monkeypatch.setattr(Path, "symlink_to", lambda self, t: made.append(self) or real(self, t))
    site.link_folder(files, tmp_path / "held", by_class=True)  # a second study, same links
    assert made == []
    site.link_folder(files[:2], tmp_path / "held", by_class=True)  # other links: afresh
    assert len(made) == 2
    assert len([p for p in (tmp_path / "held").rglob("*") if p.is_symlink()]) == 2


def test_a_folder_without_class_folders_is_refused(tmp_path):
    save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        site.site_files(tmp_path)


def _record(variant, seed, half, accuracy, auc=0.9):
    metrics = {"accuracy": accuracy, "auc": auc}
    return {"variant": variant, "seed": seed, "pool_half": half, "final": metrics,
            "best_on_val": metrics}  # fmt: skip


def test_the_summary_pairs_runs_by_seed_and_half():
    records = [
        _record("none", 1, "A", 0.80),
        _record("none", 1, "B", 0.70),
        _record("none", 2, "A", 0.90),
        _record("pool", 1, "A", 0.85),
        _record("pool", 1, "B", 0.72),
        _record("pool", 2, "B", 0.99),  # no partner: left out of the pairs
    ]
    found = site.summarise(records, ["none", "pool"], ("accuracy", "auc"))
    diff = found["paired"]["final"]["pool - none"]["accuracy"]
    expected = mean_std([0.05, 0.02])
    assert diff["pairs"] == 2
    assert diff["mean"] == pytest.approx(expected["mean"])
    assert diff["ci95"] == pytest.approx(expected["ci95"])
    assert found["means"]["final"]["pool"]["accuracy"]["n"] == 3
    assert "none - pool" not in found["paired"]["final"]
    # Each other view against the final model at 0.5, per variant, on the same runs.
    records[0]["final_site_prior"] = {"accuracy": 0.83, "auc": 0.9}
    records[1]["final_site_prior"] = {"accuracy": 0.69, "auc": 0.9}
    view = site.summarise(records, ["none", "pool"], ("accuracy", "auc"))["views"]
    assert view["final_site_prior"]["none"]["pairs"] == 2
    assert view["final_site_prior"]["none"]["mean"] == pytest.approx(0.01)
    assert view["final_site_prior"]["pool"]["pairs"] == 0


def test_a_record_scored_before_a_view_existed_is_left_out_of_that_views_figures():
    records = [_record("none", 1, "A", 0.80), _record("pool", 1, "A", 0.85)]
    records[0]["final_val_threshold"] = {"accuracy": 0.82, "auc": 0.9}
    found = site.summarise(records, ["none", "pool"], ("accuracy", "auc"))
    assert found["means"]["final_val_threshold"]["none"]["accuracy"]["n"] == 1
    assert found["means"]["final_val_threshold"]["pool"]["accuracy"]["n"] == 0
    assert found["paired"]["final_val_threshold"]["pool - none"]["accuracy"]["pairs"] == 0


def _calibrated_at_half(share: float, n: int = 20000, seed: int = 0):
    """Labels drawn at ``share`` positives, and the exact probabilities of a model that
    assumes half: x ~ N(+1, 1) for positives, N(-1, 1) for negatives, p = sigmoid(2x)."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < share
    x = rng.normal(np.where(truth, 1.0, -1.0), 1.0)
    p = 1.0 / (1.0 + np.exp(-2.0 * x))
    return truth, np.stack([1.0 - p, p], axis=1)


def test_reweighting_to_the_source_shares_changes_nothing():
    _, probs = _calibrated_at_half(0.7, n=50)
    half = np.array([0.5, 0.5])
    assert site.reweighted(probs, half, half) == pytest.approx(probs)
    moved = site.reweighted(probs, half, np.array([0.3, 0.7]))
    assert moved.sum(axis=1) == pytest.approx(np.ones(50))
    assert (moved[:, 1] > probs[:, 1]).all()


@pytest.mark.parametrize("share", [0.3, 0.5, 0.7])
def test_em_finds_the_class_shares_of_unlabelled_images(share):
    _, probs = _calibrated_at_half(share)
    found = site.site_prior(probs, np.array([0.5, 0.5]))
    assert found[1] == pytest.approx(share, abs=0.02)
    assert found.sum() == pytest.approx(1.0)


def test_reweighting_to_the_estimated_shares_raises_accuracy_where_they_differ():
    truth, probs = _calibrated_at_half(0.75, seed=1)
    half = np.array([0.5, 0.5])
    before = np.mean((probs[:, 1] > 0.5) == truth)
    after = np.mean(
        (site.reweighted(probs, half, site.site_prior(probs, half))[:, 1] > 0.5) == truth
    )
    assert after > before + 0.01


def _study_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "site_study.py"
    spec = importlib.util.spec_from_file_location("site_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_study_trains_with_and_without_the_pool_scores_the_other_half_and_resumes(
    dataset, tmp_path
):
    import json

    root = tmp_path / "site"
    for i in range(36):  # the tiny dataset's classes are "0" and "1"
        save(root / "0" / f"IM-{i:04d}-0001.png", seed=i, size=(32, 32))
        save(root / "1" / f"person{i}_bacteria_{i}.png", seed=100 + i, size=(32, 32))
    expected = site.split(site.site_files(root), "A")
    assert len(expected.held_out) >= 32  # classify --adapt bn needs 32 or more
    out = tmp_path / "study"
    args = ["--source", str(dataset), "--site", str(root), "--out", str(out), "--size", "4",
            "--width", "4", "--epochs", "1", "--seeds", "3", "--halves", "A",
            "--variants", "none,pool", "--device", "cpu"]  # fmt: skip
    study = _study_script()
    assert study.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in results["records"]}
    assert runs["pool"]["pool_images"] == len(expected.pool) and runs["none"]["pool_images"] == 0
    assert runs["pool"]["held_out_images"] == len(expected.held_out)
    for variant, pool in (("none", None), ("pool", str(out / "site" / "pool-A"))):
        settings = json.loads((out / "runs" / f"{variant}-s3-poolA" / "settings.json").read_text())
        assert settings["unlabelled"] == pool and settings["seed"] == 3
    assert 0.0 <= runs["pool"]["final"]["accuracy"] <= 1.0
    # Also scored at the threshold chosen on the source's val split, on a copy deleted after.
    assert 0.0 < runs["pool"]["final_val_threshold"]["threshold"] < 1.0
    assert not list(out.glob("runs/*/val-threshold.safetensors"))
    # And reweighted to the class shares EM finds on the pool's images.
    shares = runs["none"]["final_site_prior"]["site_prior"]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= runs["none"]["final_site_prior"]["accuracy"] <= 1.0
    # And with BatchNorm statistics recomputed on the held-out X-rays (classify --adapt bn).
    assert 0.0 <= runs["pool"]["final_adapted_bn"]["accuracy"] <= 1.0
    assert "--adapt bn" in (out / "logs" / "none-s3-poolA.log").read_text()
    # "best on val" is best.safetensors: --run alone would load the final model again.
    assert runs["pool"]["best_model"] == "best"
    assert "--model best" in (out / "logs" / "pool-s3-poolA.log").read_text()
    assert results["summary"]["paired"]["final"]["pool - none"]["accuracy"]["pairs"] == 1
    assert "pool - none" in (out / "report.md").read_text()
    assert "reweighted to the class shares" in (out / "report.md").read_text()
    model = out / "runs" / "pool-s3-poolA" / "last.safetensors"
    before = model.stat().st_mtime_ns
    assert study.main(args) == 0  # a second call finds every run done
    assert model.stat().st_mtime_ns == before


def test_the_cross_method_tables_pair_the_same_variant_by_seed_and_half():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "site_tables.py"
    spec = importlib.util.spec_from_file_location("site_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def metrics(accuracy):
        return {"accuracy": accuracy, "auc": 0.9, "sensitivity": 0.8, "specificity": 0.7,
                "ood_flagged": 0.05}  # fmt: skip

    def record(variant, seed, half, accuracy):
        return {"variant": variant, "seed": seed, "pool_half": half, "final": metrics(accuracy)}

    studies = {
        "3ngan": [record("none", 1, "A", 0.90), record("none", 1, "B", 0.80)],
        "vanilla": [record("none", 1, "A", 0.85), record("none", 2, "A", 0.10)],
    }
    text = module.tables(studies)
    # One pair (seed 1, half A): 90 - 85 = +5.00 points, the unpaired runs left out.
    assert "| 3ngan − vanilla, none | 1 | +5.00 |" in text
    assert "| 3ngan none | 2 | 85.00 [" in text
