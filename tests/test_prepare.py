"""prepare.prepare, and datasets.load_prepared / balanced_subset, on small generated sources."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_factory import class_tree, kermany_like, save
from PIL import Image

from threengan_cli.core.settings import PrepareSettings
from threengan_cli.data.datasets import balanced_subset, list_prepared, load_prepared
from threengan_cli.data.prepare import prepare
from threengan_cli.data.sources import DatasetError, patient_id

SMALL = {"image_size": 16, "workers": 1}


def settings(**kw) -> PrepareSettings:
    return PrepareSettings(**{**SMALL, **kw})


def no_partials(folder: Path) -> bool:
    return not list(folder.glob(".*partial*"))


def test_prepare_class_folders_writes_a_loadable_dataset(tmp_path):
    src = class_tree(tmp_path / "src", {"b_cls": 6, "a_cls": 4})
    out = tmp_path / "out" / "ds"
    report = prepare(src, out, settings(val_fraction=0.0))
    assert report.classes == ["a_cls", "b_cls"]  # sorted folder names give the labels
    assert report.counts["train"] == {"a_cls": 4, "b_cls": 6}
    ds = load_prepared(out)
    assert ds.images.shape == (10, 16, 16) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.split.dtype == np.uint8
    assert sorted(ds.labels.tolist()) == [0] * 4 + [1] * 6
    assert {p.name for p in out.iterdir()} == {"data.safetensors", "manifest.json", "settings.json"}
    assert ds.manifest["format_version"] == 1 and len(ds.manifest["images"]) == 10
    assert ds.subset("train")[0].shape == (10, 16, 16) and len(ds.subset("test")[0]) == 0


def test_prepare_reports_progress(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    calls = []
    prepare(src, tmp_path / "ds", settings(), on_progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (6, 6)


def test_prepare_in_parallel_matches_in_process(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 8, "b": 8})
    prepare(src, tmp_path / "one", settings(workers=1))
    prepare(src, tmp_path / "two", settings(workers=2))
    np.testing.assert_array_equal(
        load_prepared(tmp_path / "one").images, load_prepared(tmp_path / "two").images
    )


def test_kermany_layout_keeps_test_and_carves_val_by_patient(tmp_path):
    src = kermany_like(tmp_path / "src", train=20, val=2, test=4)
    report = prepare(src, tmp_path / "ds", settings(val_fraction=0.3, min_val=10))
    assert report.source_kind == "split-folders"
    assert report.counts["test"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert report.val_carved and report.source_val_images == 4
    assert "joined train" in report.val_note
    ds = load_prepared(tmp_path / "ds")
    patients = {
        s: {m["patient"] for m in ds.manifest["images"] if m["split"] == s}
        for s in ("train", "val")
    }
    assert patients["val"] and not patients["train"] & patients["val"]
    assert sum(report.counts["train"].values()) + sum(report.counts["val"].values()) == 44


def test_a_large_enough_source_val_is_kept_and_patients_do_not_straddle(tmp_path):
    src = kermany_like(tmp_path / "src", train=8, val=4, test=2)
    # a train image of a val patient moves to val
    save(src / "train" / "NORMAL" / "IM-0500-0009.jpeg", seed=777)
    report = prepare(src, tmp_path / "ds", settings(min_val=4))
    assert not report.val_carved and report.val_patient_moves == 1
    assert report.counts["val"]["NORMAL"] == 5


def test_duplicates_are_dropped_from_train_but_kept_in_test_and_leakage_removed(tmp_path):
    src = kermany_like(tmp_path / "src", train=6, val=0, test=4)
    normal = src / "train" / "NORMAL"
    shutil.copy(normal / "IM-0000-0001.jpeg", normal / "IM-0099-0001.jpeg")  # train dup
    test_normal = src / "test" / "NORMAL"
    shutil.copy(test_normal / "IM-0900-0001.jpeg", test_normal / "IM-0999-0001.jpeg")  # test dup
    shutil.copy(test_normal / "IM-0901-0001.jpeg", normal / "IM-0098-0001.jpeg")  # leak
    report = prepare(src, tmp_path / "ds", settings(val_fraction=0.0))
    assert report.duplicates_dropped == [
        ("train/NORMAL/IM-0099-0001.jpeg", "train/NORMAL/IM-0000-0001.jpeg")
    ]
    assert report.test_duplicates == [
        ("test/NORMAL/IM-0999-0001.jpeg", "test/NORMAL/IM-0900-0001.jpeg")
    ]
    assert report.leakage_removed == [
        ("train/NORMAL/IM-0098-0001.jpeg", "test/NORMAL/IM-0901-0001.jpeg")
    ]
    assert report.counts["test"]["NORMAL"] == 5 and report.counts["train"]["NORMAL"] == 6


def test_prepare_skips_unreadable_files_and_counts_them(tmp_path, monkeypatch):
    src = class_tree(tmp_path / "src", {"a": 3, "b": 3})
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "a" / "notes.txt").write_text("hi")
    (src / "a" / "empty.png").write_bytes(b"")
    (src / "a" / "text.png").write_text("not a png")
    jpg = save(src / "b" / "cut.jpg", seed=50, size=(64, 64))
    jpg.write_bytes(jpg.read_bytes()[:300])
    save(src / "b" / "huge.png", seed=51, size=(40, 40))
    os.symlink("loop-b.png", src / "a" / "loop-a.png")
    os.symlink("loop-a.png", src / "a" / "loop-b.png")
    os.symlink("..", src / "a" / "up")  # a folder loop: must not be followed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    report = prepare(src, tmp_path / "ds", settings())
    reasons = dict(report.skipped)
    assert ".DS_Store" not in reasons and "a/.DS_Store" not in reasons  # silent
    assert reasons["a/notes.txt"] == "not an image file"
    assert reasons["a/empty.png"] == "zero-byte file"
    assert reasons["a/text.png"] == "not an image"
    assert reasons["b/cut.jpg"] == "truncated image"
    assert reasons["b/huge.png"].startswith("over the pixel limit (1600 px > 1000)")
    assert "symbolic links" in reasons["a/loop-a.png"]
    assert reasons["a/up"] == "link to a folder (not followed)"
    assert report.counts["train"] == {"a": 3, "b": 3}
    assert len(report.unreadable) == 6


def test_pixel_limit_also_applies_in_worker_processes(tmp_path, monkeypatch):
    src = class_tree(tmp_path / "src", {"a": 4, "b": 4})
    save(src / "b" / "huge.png", seed=51, size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    report = prepare(src, tmp_path / "ds", settings(workers=2))
    assert dict(report.skipped)["b/huge.png"].startswith("over the pixel limit")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_permission_is_skipped(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    locked = save(src / "a" / "locked.png", seed=99)
    locked.chmod(0)
    report = prepare(src, tmp_path / "ds", settings())
    assert dict(report.skipped)["a/locked.png"] == "permission denied"


def test_strict_fails_on_unreadable_images_and_writes_nothing(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    (src / "a" / "bad.png").write_text("nope")
    (src / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DatasetError, match="--strict"):
        prepare(src, tmp_path / "out" / "ds", settings(strict=True))
    assert not (tmp_path / "out" / "ds").exists() and no_partials(tmp_path / "out")
    (src / "a" / "bad.png").unlink()
    prepare(src, tmp_path / "out" / "ds", settings(strict=True))  # .DS_Store never counts


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no class folders"),
        (lambda p: class_tree(p, {"only": 3}), "only one class"),
        (lambda p: (p.mkdir(), (p / "a").mkdir(), (p / "b").mkdir()), "no images found"),
        (
            lambda p: [
                (p / c).mkdir(parents=True) or (p / c / "x.png").write_text("no") for c in "ab"
            ],
            "nothing readable",
        ),
    ],
    ids=["missing", "empty", "one-class", "empty-classes", "nothing-readable"],
)
def test_bad_sources_raise_one_line_errors(tmp_path, make, message):
    make(tmp_path / "src")
    with pytest.raises(DatasetError, match=message) as info:
        prepare(tmp_path / "src", tmp_path / "ds", settings())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ds").exists()


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    prepare(src, tmp_path / "ds", settings())
    other = class_tree(tmp_path / "other", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match="another source.*use --force"):
        prepare(other, tmp_path / "ds", settings())
    class_tree(src, {"c": 2}, seed=500)  # pixels of its own
    report = prepare(src, tmp_path / "ds", settings(), force=True)
    assert report.classes == ["a", "b", "c"] and load_prepared(tmp_path / "ds").classes[2] == "c"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        prepare(src, tmp_path / "mine", settings(), force=True)


def test_interrupt_during_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.numpy

    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "out" / "ds", settings())
    assert list((tmp_path / "out").iterdir()) == []


def test_npz_source_with_column_labels_and_rgb_images(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "mini.npz",
        train_images=rng.integers(0, 256, (10, 28, 28, 3), dtype=np.uint8),
        train_labels=np.array([[0], [1]] * 5),
        val_images=rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8),
        val_labels=np.array([[0], [1]] * 2),
        test_images=rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8),
        test_labels=np.array([[0], [1]] * 3),
    )
    report = prepare(tmp_path / "mini.npz", tmp_path / "ds", settings(min_val=2))
    assert report.source_kind == "npz" and report.classes == ["0", "1"]
    assert report.counts == {
        "train": {"0": 5, "1": 5},
        "val": {"0": 2, "1": 2},
        "test": {"0": 3, "1": 3},
    }
    assert load_prepared(tmp_path / "ds").images.shape == (20, 16, 16)


def test_npz_gray_source(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "g.npz",
        train_images=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
        train_labels=np.array([0, 1] * 4),
    )
    report = prepare(tmp_path / "g.npz", tmp_path / "ds", settings(val_fraction=0.25))
    assert sum(report.counts["val"].values()) == 2


def test_csv_source_with_splits_and_relative_paths(tmp_path):
    class_tree(tmp_path / "imgs", {"cat": 4, "dog": 4})
    rows = ["path,label,split"]
    for i, p in enumerate(sorted((tmp_path / "imgs").rglob("*.png"))):
        rows.append(f"imgs/{p.parent.name}/{p.name},{p.parent.name},{'test' if i % 4 == 0 else ''}")
    rows.append("imgs/missing.png,cat,train")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    report = prepare(tmp_path / "list.csv", tmp_path / "ds", settings(val_fraction=0.0))
    assert report.source_kind == "csv" and report.classes == ["cat", "dog"]
    assert report.counts["test"] == {"cat": 1, "dog": 1}
    assert report.skipped == [("imgs/missing.png", "file not found")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("path,label\na.png,x\nb.png,y\nc.png,z,\n", None),
        ("path,label,split\na.png,x,train\nb.png,y,train\nc.png,zebra,test\n", "unknown label"),
        ("path,label,split\na.png,x,train\nb.png,y,holdout\n", "unknown split"),
        ("file,class\na.png,x\n", "header row"),
        ("path,label\na.png,\n", "empty label"),
    ],
    ids=["ok", "unknown-label", "unknown-split", "no-header", "empty-label"],
)
def test_csv_problems_are_one_line_errors(tmp_path, body, message):
    for name in "abc":
        save(tmp_path / f"{name}.png", seed=ord(name))
    (tmp_path / "l.csv").write_text(body)
    if message is None:
        assert prepare(tmp_path / "l.csv", tmp_path / "ds", settings()).total == 3
        return
    with pytest.raises(DatasetError, match=message):
        prepare(tmp_path / "l.csv", tmp_path / "ds", settings())


def test_patient_ids_from_kermany_names_and_a_custom_pattern():
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("IM-0115-0001.jpeg") == patient_id("NORMAL2-IM-0115-0001.jpeg")
    assert patient_id("person1000_bacteria_2931.jpeg") == "person1000"
    assert patient_id("scan_7.png") is None
    assert patient_id("p042-view2.png", r"p(\d+)-") == "042"


def test_custom_patient_pattern_groups_the_val_carve(tmp_path):
    for c in ("a", "b"):
        for p in range(5):
            for v in range(3):
                save(tmp_path / "src" / c / f"{c}pt{p}-v{v}.png", seed=hash((c, p, v)) % 10**6)
    prepare(
        tmp_path / "src",
        tmp_path / "ds",
        settings(patient_pattern=r"(\w+pt\d+)-", val_fraction=0.4),
    )
    ds = load_prepared(tmp_path / "ds")
    by_split = {
        s: {m["patient"] for m in ds.manifest["images"] if m["split"] == s}
        for s in ("train", "val")
    }
    assert by_split["val"] and not by_split["train"] & by_split["val"]
    assert all(len(by_split[s]) for s in by_split)


def test_load_prepared_refuses_missing_corrupt_and_newer(tmp_path):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        load_prepared(tmp_path / "nothing")
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    prepare(src, tmp_path / "ds", settings())
    manifest = tmp_path / "ds" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"format_version": 1', '"format_version": 9', 1))
    with pytest.raises(DatasetError, match="newer"):
        load_prepared(tmp_path / "ds")
    manifest.write_text(text)
    (tmp_path / "ds" / "data.safetensors").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="corrupt"):
        load_prepared(tmp_path / "ds")
    manifest.write_text("{not json")
    with pytest.raises(DatasetError, match="corrupt"):
        load_prepared(tmp_path / "ds")


def test_balanced_subset_draws_half_per_class_by_seed():
    labels = np.array([0] * 10 + [1] * 30)
    idx = balanced_subset(labels, 8, seed=1)
    assert np.bincount(labels[idx]).tolist() == [4, 4] and len(set(idx)) == 8
    np.testing.assert_array_equal(idx, balanced_subset(labels, 8, seed=1))
    assert not np.array_equal(idx, balanced_subset(labels, 8, seed=2))
    with pytest.raises(DatasetError, match="only 10"):
        balanced_subset(labels, 24, seed=0)


def test_balanced_subset_names_classes_and_refuses_a_size_that_does_not_divide():
    labels = np.array([0] * 10 + [1] * 30)
    with pytest.raises(DatasetError, match="class NORMAL has only 10 training images"):
        balanced_subset(labels, 24, seed=0, classes=["NORMAL", "PNEUMONIA"])
    with pytest.raises(DatasetError, match="such as 8 or 10"):
        balanced_subset(labels, 9, seed=0)


def test_list_prepared_lists_datasets_and_broken_ones(tmp_path):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    prepare(src, tmp_path / "root" / "one", settings())
    (tmp_path / "root" / "broken").mkdir()
    found = {d["name"]: d for d in list_prepared(tmp_path / "root")}
    assert found["one"]["images"] == 4 and found["one"]["classes"] == ["a", "b"]
    assert "error" in found["broken"]


def test_the_same_source_and_settings_again_is_up_to_date_and_anything_else_needs_force(
    tmp_path,
):
    src = class_tree(tmp_path / "src", {"a": 2, "b": 2})
    first = prepare(src, tmp_path / "ds", settings())
    written = (tmp_path / "ds" / "data.safetensors").stat().st_mtime_ns
    again = prepare(src, tmp_path / "ds", settings(workers=2))  # workers change nothing
    assert again.up_to_date and not first.up_to_date
    assert again.counts == first.counts and again.classes == first.classes
    assert (tmp_path / "ds" / "data.safetensors").stat().st_mtime_ns == written
    with pytest.raises(DatasetError, match="other settings .*image_size.*--force"):
        prepare(src, tmp_path / "ds", settings(image_size=8))
    class_tree(src, {"c": 1})  # a file added to the source
    with pytest.raises(DatasetError, match="source changed since.*--force"):
        prepare(src, tmp_path / "ds", settings())
    other = class_tree(tmp_path / "other", {"a": 2, "b": 2})
    with pytest.raises(DatasetError, match="another source.*--force"):
        prepare(other, tmp_path / "ds", settings())
