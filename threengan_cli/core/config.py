"""Settings from a TOML file and flags: read, resolved into the models of ``core/settings``.

A TOML file may hold a table per section (``[prepare]``, ``[train]``, ...); flags given on
the command line override the file; the result is validated once and passed down. A bad
value becomes a :class:`SettingsError` whose message is one line naming the field and what
it allows, which the CLI prints and exits 2 on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from threengan_cli.core.errors import UsageError
from threengan_cli.core.settings import PrepareSettings, Section, TrainSettings
from threengan_cli.core.use_settings import ClassifySettings, EvaluateSettings, GenerateSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli before it joined the standard library
    import tomli as tomllib

MAX_CONFIG_BYTES = 1024 * 1024  # a settings file is a few hundred bytes
# The sections a config file's tables name, each with its model (cli/common._MODELS says
# where each is written, for --help).
SECTIONS: dict[str, type[Section]] = {
    "prepare": PrepareSettings,
    "train": TrainSettings,
    "classify": ClassifySettings,
    "evaluate": EvaluateSettings,
    "generate": GenerateSettings,
}
# A config file may also hold a [benchmark] table. Its model, grid.BenchmarkSettings, lives
# beside the profiles that fill its required fields (grid.resolve_config builds it).
SECTION_NAMES = (*SECTIONS, "benchmark")


class SettingsError(UsageError, ValueError):
    """A setting that cannot be used; the message is one line meant for the user."""


def _range(model: type[BaseModel], name: str) -> str | None:
    """The allowed range of a numeric field, as ``a <= x <= b`` style text."""
    info = model.model_fields.get(name)
    if info is None:
        return None
    lo = hi = None
    for meta in info.metadata:
        for attr, side in (("ge", "lo"), ("gt", "lo"), ("le", "hi"), ("lt", "hi")):
            value = getattr(meta, attr, None)
            if value is not None:
                text = f"{value} {'<=' if attr in ('ge', 'le') else '<'}"
                if side == "lo":
                    lo = text
                else:
                    hi = text.split()[1] + " " + str(value)
    if lo is None and hi is None:
        return None
    return f"{lo + ' ' if lo else ''}{name}{' ' + hi if hi else ''}"


def explain(exc: ValidationError, section: str, model: type[BaseModel] | None = None) -> str:
    """Turn pydantic's report into one line: field, what is allowed, what was given.

    ``model`` is the section's model, where it is not one of :data:`SECTIONS` (the
    benchmark's); it supplies the allowed range of a number."""
    err = exc.errors()[0]
    name = ".".join(str(part) for part in err["loc"]) or section  # methods.1: the second method
    given = err.get("input")
    got = "" if isinstance(given, dict) else f" (got {given!r})"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{section}.{name}: unknown setting"
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        field = str(err["loc"][0])
        allowed = f"must satisfy {_range(model or SECTIONS[section], field)}"
    elif kind == "literal_error":
        allowed = f"must be one of {err['ctx']['expected']}"
    else:
        allowed = err["msg"].removeprefix("Value error, ")
        allowed = allowed[0].lower() + allowed[1:]
    where = section if not err["loc"] else f"{section}.{name}"  # a check of several fields
    return f"{where}: {allowed}{got}"


def read_config(path: Path | None) -> dict[str, Any]:
    """Read a TOML settings file; a missing or malformed file is a SettingsError."""
    if path is None:
        return {}
    path = Path(path)
    if path.exists() and not path.is_file():
        raise SettingsError(f"config file {path} is not a regular file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except OSError as exc:
        raise SettingsError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SettingsError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SettingsError(f"config file {path} line {line} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} cannot be read: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise SettingsError(
            f"config file {path} nests arrays or tables too deeply to be a settings file"
        ) from None
    unknown = sorted(set(data) - set(SECTION_NAMES))
    if unknown:
        raise SettingsError(
            f"config file {path}: unknown section [{unknown[0]}] "
            f"(known: {', '.join(SECTION_NAMES)})"
        )
    return data


def resolve(section: str, config: Path | None = None, **flags: Any):
    """Build the settings of one section: defaults, then the file, then the flags.

    Flags whose value is ``None`` were not given and leave the file's value in place.
    """
    model = SECTIONS[section]
    from_file = read_config(config).get(section, {})
    if not isinstance(from_file, dict):
        raise SettingsError(f"config file {config}: [{section}] must be a table of settings")
    # A file's values are taken as written, strictly: `epochs = true` or `tau = "0.9"` is an
    # error there, not 1 or 0.9 (flags arrive typed by the command line already).
    try:
        model.model_validate(from_file, strict=True, context={"file_alone": True})
    except ValidationError as exc:
        raise SettingsError(f"config file {config}: {explain(exc, section)}") from None
    values = {**from_file, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return model(**values)
    except ValidationError as exc:
        raise SettingsError(explain(exc, section)) from None


def dump(settings: BaseModel) -> str:
    """Settings as pretty JSON, written next to every output."""
    return json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
