"""docs/cli.md is generated from the Typer app and must match the code."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from cli_docs import render
    finally:
        sys.path.pop(0)
    from threengan_cli.cli.app import app

    assert render(app, "threengan") == (ROOT / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: run python tools/cli_docs.py > docs/cli.md"
    )


def test_cli_reference_is_plain_markdown():
    text = (ROOT / "docs" / "cli.md").read_text()
    assert "<span" not in text and "&#" not in text and "&gt;" not in text
    assert "```console\n$ threengan classify" in text


def test_help_defers_markdown_and_traceback_but_they_still_work():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from threengan_cli.cli.app import main\n"
        "sys.argv = ['threengan', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'markdown_it' not in sys.modules and 'pygments' not in sys.modules\n"
        "from rich.markdown import Markdown\n"
        "from rich.traceback import Traceback\n"
        "assert type(Markdown('# x')).__module__ == 'rich.markdown'\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n"
        "    tb = Traceback.from_exception(type(exc), exc, exc.__traceback__)\n"
        "assert type(tb).__name__ == 'Traceback' and 'pygments' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_every_version_the_docs_and_help_name_is_this_one_or_earlier():
    """"Models trained before threengan 0.2" needs a threengan 0.2 to exist."""
    import re

    from threengan_cli import __version__

    def parts(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version.split("."))

    texts = [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("threengan_cli/*.py")]
    named = {
        (path.name, found)
        for path in texts
        for found in re.findall(r"threengan (\d+\.\d+(?:\.\d+)?)", path.read_text())
    }
    assert named, "the test reads no version words: it would pass whatever they say"
    ahead = sorted((name, v) for name, v in named if parts(v) > parts(__version__))
    assert not ahead, f"threengan is {__version__}; these name a later version: {ahead}"
    wheel = f"threengan-{__version__}-py3-none-any.whl"
    readme = (ROOT / "README.md").read_text()
    assert wheel in readme and "threengan-0.1.0-" not in readme.replace(wheel, "")
