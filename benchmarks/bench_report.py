"""Size and load time of ``classify --report`` pages in headless Chromium.

For each page: its size, and over --repeats runs of ``chromium --headless --dump-dom`` the
median of (1) when the page became usable (its script done: JSON parsed, counts and the first
240 cards built), (2) when its load event fired (the images of those cards decoded), both as
the page measures them from the navigation's start, and (3) the whole browser process's
wall time, next to that of an empty page (the browser's own start-up).

    python -m threengan_cli classify ../shared/data/kermany-chest-xray/train -r -o r.csv \\
        --report report.html
    python benchmarks/bench_report.py report.html
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def render(page: Path, profile: Path) -> tuple[float, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium installed (apt-get install chromium)")
    t0 = time.perf_counter()
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return time.perf_counter() - t0, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.html"
        empty.write_text("<!DOCTYPE html><title>empty</title>")
        base = statistics.median(render(empty, Path(tmp) / "p")[0] for _ in range(args.repeats))
        print(f"empty page: {base:.2f} s of browser wall time (median of {args.repeats})")
        for page in args.pages:
            walls, ready, loaded, shown = [], [], [], ""
            for _ in range(args.repeats):
                wall, dom = render(page, Path(tmp) / "p")
                walls.append(wall)
                ready.append(int(re.search(r'data-ready="(\d+)"', dom)[1]))
                found = re.search(r'data-loaded="(\d+)"', dom)
                loaded.append(int(found[1]) if found else float("nan"))
                shown = re.search(r'id="shown">([^<]*)<', dom)[1]
            print(
                f"{page}: {page.stat().st_size / 1e6:.1f} MB, {shown}; usable after "
                f"{statistics.median(ready):.0f} ms, loaded after {statistics.median(loaded):.0f} "
                f"ms; browser wall {statistics.median(walls):.2f} s (empty page {base:.2f} s)"
            )


if __name__ == "__main__":
    main()
