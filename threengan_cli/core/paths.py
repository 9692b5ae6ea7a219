"""Where threengan keeps its files.

Everything lives under one home folder: the platform's user data dir
(``platformdirs.user_data_dir("threengan")``), or ``$THREENGAN_HOME`` when set, which tests
always set so they never touch a user's real data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from threengan_cli.core.errors import UsageError

ENV_HOME = "THREENGAN_HOME"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# A class name that becomes a folder: letters and digits of any script, then also space,
# '.', '_' and '-'; never a trailing space or dot (Windows drops them). So never "..", a
# slash, an absolute path, a hidden name or a control character.
_CLASS_FOLDER = re.compile(r"[^\W_](?:[\w .-]{0,98}[\w-])?")


def home() -> Path:
    override = os.environ.get(ENV_HOME)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("threengan", appauthor=False))


def datasets_dir() -> Path:
    return home() / "datasets"


def runs_dir() -> Path:
    return home() / "runs"


def is_name(text: str) -> bool:
    """Whether ``text`` can name a dataset or run (rather than be a path)."""
    return bool(_NAME.match(text))


def check_name(name: str) -> str:
    """A dataset or run name is one plain path component (no slashes, no dots first)."""
    if not _NAME.match(name):
        raise ValueError(
            f"invalid name {name!r}: use letters, digits, '.', '_' or '-' (at most 100)"
        )
    return name


def check_class_folder(name: str) -> str:
    """A class name used as a folder name (``classify --sort-into``, ``generate --label``)
    must be one plain path component; a model's class names come from its checkpoint, which
    anybody may have written, so they are never trusted to stay inside the output folder."""
    if not isinstance(name, str) or not _CLASS_FOLDER.fullmatch(name):
        raise ValueError(
            f"class name {name!r} cannot be a folder name (letters, digits, space, '.', '_' "
            "or '-', starting with a letter or digit, at most 100)"
        )
    return name


def resolve_dataset(name_or_path: str) -> Path:
    """A prepared dataset given by name (under the data dir) or by folder path."""
    candidate = Path(name_or_path).expanduser()
    if (candidate / "manifest.json").is_file():
        return candidate
    if _NAME.match(name_or_path):
        return datasets_dir() / name_or_path
    return candidate


def dataset_dir_for(source: Path, name: str | None, out_dir: Path | None) -> Path:
    """Where ``prepare`` writes: ``--out``, else ``--name`` (or the source's name) under the
    data dir; a UsageError for a name that cannot be one."""
    if out_dir is not None:
        return out_dir
    try:
        return datasets_dir() / check_name(name or source.stem)
    except ValueError as exc:
        raise UsageError(f"{exc} (choose one with --name)") from None


def prepared_dataset(name_or_path: str) -> Path:
    """The folder of the prepared dataset ``name_or_path``; a UsageError where there is none."""
    folder = resolve_dataset(name_or_path)
    if not (folder / "manifest.json").is_file():
        raise UsageError(
            f"no prepared dataset {name_or_path!r} (looked in {folder}); "
            "run `threengan prepare SOURCE --name NAME` first"
        )
    return folder


DEFAULT_MODEL = "default.safetensors"


def bundled_model() -> Path | None:
    """The default model shipped inside the package, or ``None`` where it is not installed."""
    from importlib import resources

    try:
        candidate = resources.files("threengan_cli") / "models" / DEFAULT_MODEL
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover - broken install
        return None
    if not candidate.is_file():
        return None
    return Path(str(candidate))


def examples_dir() -> Path | None:
    """The example X-rays shipped in the package (``examples/<label>/*.jpeg``, with their
    ATTRIBUTION.md), or ``None`` where the install lacks them."""
    from importlib import resources

    try:
        folder = Path(str(resources.files("threengan_cli") / "examples"))
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover - broken install
        return None
    return folder if (folder / "ATTRIBUTION.md").is_file() else None


def example_images() -> list[Path]:
    """The example X-ray files, sorted by label folder, then name (empty if not installed)."""
    folder = examples_dir()
    if folder is None:
        return []
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
