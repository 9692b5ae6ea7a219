"""A classify-only install without PyTorch: classify, evaluate and info work; commands that
need torch say how to get it, in one line, exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from threengan_cli.core import paths

# torch (and torchvision) made unimportable, as in `pip install --no-deps threengan` plus the
# dependencies other than torch
_BLOCK = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None
sys.meta_path.insert(0, NoTorch())
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, p=None: None if n.split('.')[0] == 'torch' else _find(n, p)
from threengan_cli.cli.app import main
sys.argv = ['threengan', *sys.argv[1:]]
main()
"""


def _run(*args: str, home) -> subprocess.CompletedProcess:
    env = {"THREENGAN_HOME": str(home), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK, *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    "args",
    [("classify", "--examples", "-f", "csv"), ("evaluate", "EXAMPLES"), ("info",)],
)
def test_classify_evaluate_and_info_work_without_torch(args, tmp_path):
    args = tuple(str(paths.examples_dir()) if a == "EXAMPLES" else a for a in args)
    done = _run(*args, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_info_says_torch_is_missing_and_how_to_get_the_cpu_build(tmp_path):
    done = _run("info", "--json", home=tmp_path)
    assert '"torch": "not installed"' in done.stdout


def test_a_command_that_needs_torch_says_how_to_install_it(tmp_path):
    done = _run("classify", "--examples", "--engine", "torch", home=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "needs PyTorch" in done.stderr
    assert "download.pytorch.org/whl/cpu" in done.stderr


def test_heatmaps_report_and_onnx_export_need_no_torch(tmp_path):
    done = _run(
        "classify", "--examples", "-f", "csv", "--heatmaps", str(tmp_path / "maps"),
        "--report", str(tmp_path / "report.html"), home=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "maps").glob("*.png"))) == 8
    assert (tmp_path / "report.html").is_file()
    pytest.importorskip("onnx")
    done = _run("export", "-o", str(tmp_path / "m.onnx"), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 1_000_000
