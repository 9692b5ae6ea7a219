"""``classify --sort-into``: each classified file copied or linked into a folder per label (and
flagged ones into ``ood/``), whole or not at all."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from threengan_cli.core import fileio, paths
from threengan_cli.core.errors import UsageError
from threengan_cli.infer.classify import Row

OOD_FOLDER = "ood"  # --sort-into's folder of flagged images


class Sorter:
    """``--sort-into DIR``: copies (or with ``link`` hard-links, else symlinks) each
    classified input into ``DIR/<label>/``, or into ``DIR/ood/`` where the image is flagged
    as unlike the model's training X-rays and ``ood_folder`` is on: its label is not
    reliable, so it is not filed beside the labelled ones (as ``generate`` keeps
    ``uncertain/`` apart).

    The model's class names become folder names, so each must be a plain one
    (:func:`paths.check_class_folder`, a ValueError otherwise): a checkpoint's names are not
    trusted to stay inside ``DIR``. The file keeps its name; a different file of that name
    already there gets the name with a short hash of its source path added, so two inputs
    never overwrite each other. A rerun replaces what it wrote before, in the input's label
    folder and in the others: where a rerun (another model or threshold) gives an input
    another label, its earlier copy is removed from the old label's folder. Copies appear
    whole or not at all, through :mod:`fileio`'s marked temporaries; one cut short by a kill
    is removed when a later run first writes into that folder.
    """

    def __init__(
        self,
        folder: Path | str,
        classes: Iterable[str],
        link: bool = False,
        ood_folder: bool = True,
    ):
        self.classes = [paths.check_class_folder(name) for name in classes]
        if ood_folder and OOD_FOLDER in (name.casefold() for name in self.classes):
            raise ValueError(
                f"a class is named {OOD_FOLDER!r}, the folder of flagged images "
                "(--no-ood-folder files flagged images under their labels)"
            )
        self.folder, self.link, self.ood_folder = Path(folder), link, ood_folder
        # a rerun may move an input between any two of these: every one is cleaned
        self.folders = [*self.classes, OOD_FOLDER]
        self._ready: set[str] = set()

    def __call__(self, row: Row) -> Path | None:
        """Sort one row's input; ``None`` for an error row."""
        if not row.ok or row.label is None:
            return None
        source = Path(row.path)
        where = OOD_FOLDER if self.ood_folder and row.ood else row.label
        target = self._target(source, self._label_folder(where))
        if not _same_file(source, target):
            fileio.copy_file(source, target, link=self.link)
        for other in self.folders:
            if other != where:
                self._remove_earlier(source, self.folder / other)
        return target

    def _label_folder(self, label: str) -> Path:
        folder = self.folder / label
        if label not in self._ready:  # once per run, not once per file
            folder.mkdir(parents=True, exist_ok=True)
            fileio.clean_stale(folder)
            self._ready.add(label)
        return folder

    @staticmethod
    def _names(source: Path) -> tuple[str, str]:
        tag = hashlib.sha1(os.fsencode(source.resolve())).hexdigest()[:8]
        return source.name, f"{source.stem}-{tag}{source.suffix}"

    def _target(self, source: Path, folder: Path) -> Path:
        plain, tagged = self._names(source)
        target = folder / plain
        if os.path.lexists(target) and not _same_file(source, target):
            target = folder / tagged
        return target

    def _remove_earlier(self, source: Path, folder: Path) -> None:
        for name in self._names(source):
            earlier = folder / name
            if not os.path.isfile(earlier):
                continue
            if os.path.realpath(earlier) == os.path.realpath(source):
                continue  # the input itself lies there: never removed
            if _same_file(source, earlier):
                earlier.unlink()


def sorter_for(cfg: Any, classes: Iterable[str]) -> Sorter | None:
    """The ``--sort-into`` folders of the classify settings ``cfg``, or ``None``; class names
    that cannot be folder names are a :class:`UsageError`, before anything is classified."""
    if cfg.sort_into is None:
        return None
    try:
        return Sorter(cfg.sort_into, classes, link=cfg.link, ood_folder=cfg.ood_folder)
    except ValueError as exc:
        raise UsageError(f"--sort-into makes a folder per class: {exc}") from None


def _same_file(a: Path, b: Path) -> bool:
    """``b`` is ``a`` itself (a link to it) or a copy of it made by :class:`Sorter`."""
    try:
        if os.path.samefile(a, b):
            return True
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
