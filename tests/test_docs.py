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
