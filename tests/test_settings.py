"""Settings: defaults, TOML file, flag overrides, one-line errors."""

from __future__ import annotations

import json

import pytest

from threengan_cli.core.config import SettingsError, dump, resolve
from threengan_cli.core.settings import TrainSettings


def test_defaults_are_the_papers_values():
    cfg = resolve("train")
    assert (cfg.tau, cfg.alpha, cfg.lam, cfg.epochs, cfg.batch_size) == (0.9, 0.3, 0.01, 100, 10)
    assert (cfg.lr, cfg.beta1, cfg.width, cfg.latent) == (2e-4, 0.5, 64, 100)


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 7\ntau = 0.8\n[prepare]\nimage_size = 32\n")
    cfg = resolve("train", config, epochs=3, tau=None)
    assert cfg.epochs == 3  # flag wins
    assert cfg.tau == 0.8  # file applies where no flag was given
    assert resolve("prepare", config).image_size == 32


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"epochs": 0}, "train.epochs: must satisfy 1 <= epochs <= 100000 (got 0)"),
        ({"tau": 1.5}, "train.tau: must satisfy 0.0 <= tau <= 1.0 (got 1.5)"),
        ({"lr": 0}, "train.lr: must satisfy 0.0 < lr <= 1.0 (got 0)"),
        ({"method": "gan"}, "train.method: must be one of"),
        ({"device": "gpu"}, "train.device: must be auto, cpu, cuda, cuda:N or mps"),
        (
            {"recipe": "paper", "unlabelled_teacher": True},
            "train.unlabelled_teacher: needs ema > 0: the teacher is the moving average",
        ),
        (
            {"ema": 0.0, "generated_teacher": True},
            "train.generated_teacher: needs ema > 0",
        ),
        ({"unlabelled_ratio": 0}, "train.unlabelled_ratio: must satisfy 1 <= unlabelled_ratio"),
        ({"unlabelled_threshold": "flex"}, "train.unlabelled_threshold: must be one of"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_field_and_range(flags, expected):
    with pytest.raises(SettingsError) as info:
        resolve("train", **flags)
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_unknown_keys_in_a_file_are_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepoch = 3\n")
    with pytest.raises(SettingsError, match="train.epoch: unknown setting"):
        resolve("train", config)
    config.write_text("[trian]\nepochs = 3\n")
    with pytest.raises(SettingsError, match=r"unknown section \[trian\]"):
        resolve("train", config)


def test_a_malformed_or_missing_file_is_a_settings_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(SettingsError, match="cannot be read"):
        resolve("train", bad)
    with pytest.raises(SettingsError, match="not found"):
        resolve("train", tmp_path / "missing.toml")


def test_settings_are_frozen_and_dump_round_trips():
    cfg = resolve("train", epochs=5)
    with pytest.raises(ValueError):
        cfg.epochs = 6  # type: ignore[misc]
    assert TrainSettings(**json.loads(dump(cfg))) == cfg


def test_patient_pattern_must_compile_with_a_group():
    with pytest.raises(SettingsError, match="patient_pattern"):
        resolve("prepare", patient_pattern="(")
    with pytest.raises(SettingsError, match="capturing group"):
        resolve("prepare", patient_pattern=r"\d+")
    assert resolve("prepare", patient_pattern=r"p(\d+)_").patient_pattern == r"p(\d+)_"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("epochs = true", "train.epochs"),
        ('tau = "0.9"', "train.tau"),
        ("epochs = 2.0", "train.epochs"),
        ("cuda_graphs = 1", "train.cuda_graphs"),
        ("size = false", "train.size"),
    ],
)
def test_a_config_file_value_of_the_wrong_type_is_refused_not_converted(tmp_path, line, field):
    config = tmp_path / "c.toml"
    config.write_text(f"[train]\n{line}\n")
    with pytest.raises(SettingsError, match=rf"c\.toml: {field}: "):
        resolve("train", config)


def test_a_config_file_number_for_a_float_setting_is_fine(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[train]\ntau = 1\nlr = 0.001\n")
    assert resolve("train", config).tau == 1.0


def test_a_non_utf8_or_oversized_config_or_a_section_that_is_no_table_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b'[train]\nepochs = 3\nname = "caf\xe9"\n')
    with pytest.raises(SettingsError, match="line 3 is not UTF-8 text"):
        resolve("train", config)
    config.write_text("train = 3\n")
    with pytest.raises(SettingsError, match=r"\[train\] must be a table"):
        resolve("train", config)
    config.write_text("# " + "x" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(SettingsError, match="larger than"):
        resolve("train", config)


@pytest.mark.parametrize("recipe", ["paper", "robust"])
def test_the_pseudo_label_options_are_off_in_both_recipes(recipe):
    cfg = resolve("train", recipe=recipe)
    assert (cfg.unlabelled_ratio, cfg.unlabelled_rampup) == (1, 0)
    assert not (cfg.unlabelled_align or cfg.unlabelled_teacher or cfg.generated_teacher)
    assert cfg.unlabelled_threshold == "fixed"
    assert not cfg.unlabelled_interpolation and cfg.precise_bn_images == "labelled"
    assert resolve("train", recipe=recipe, ema=0.99, unlabelled_teacher=True).unlabelled_teacher


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"precise_bn_images": "unlabelled"}, "needs precise_bn and a pool"),
        (
            {"precise_bn_images": "unlabelled", "unlabelled": "rest", "recipe": "paper"},
            "needs precise_bn and a pool",
        ),
        (
            {"unlabelled_interpolation": True, "unlabelled_norm": "labelled"},
            "does not combine with unlabelled_teacher or unlabelled_norm",
        ),
        (
            {"unlabelled_interpolation": True, "unlabelled_teacher": True},
            "does not combine with unlabelled_teacher or unlabelled_norm",
        ),
    ],
)
def test_the_site_options_refuse_what_they_cannot_do(flags, expected):
    with pytest.raises(SettingsError, match=expected) as info:
        resolve("train", **flags)
    assert "\n" not in str(info.value)
    ok = resolve("train", unlabelled="rest", precise_bn_images="unlabelled")
    assert ok.precise_bn_images == "unlabelled"


def test_a_site_option_in_a_file_may_take_its_pool_from_the_flag(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text('[train]\nprecise_bn_images = "unlabelled"\n')
    assert resolve("train", config, unlabelled="pool/").precise_bn_images == "unlabelled"
    with pytest.raises(SettingsError, match="needs precise_bn and a pool") as info:
        resolve("train", config)
    assert str(info.value).startswith("train: precise_bn_images")


def test_a_config_file_nested_too_deeply_is_one_line_not_a_recursion_error(tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text("[classify]\nbatch_size = " + "[" * 500 + "]" * 500 + "\n")
    with pytest.raises(SettingsError, match="nests arrays or tables too deeply"):
        resolve("classify", config)


@pytest.mark.parametrize("field", ["unlabelled_weight", "alpha", "lam", "ema"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_train_setting_that_is_not_a_finite_number_is_refused(tmp_path, field, value):
    config = tmp_path / "w.toml"
    config.write_text(f"[train]\n{field} = {value}\n")  # TOML spells them inf and nan
    with pytest.raises(SettingsError, match=f"train.{field}: input should be a finite number"):
        resolve("train", config)
