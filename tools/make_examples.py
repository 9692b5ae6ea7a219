"""Make the example X-rays shipped in the package (threengan_cli/examples/) from the public
Kermany test set, by a fixed rule, so the choice can be checked and repeated.

Rule: in test/NORMAL the first 4 files by name; in test/PNEUMONIA the first 2 "bacteria"
and the first 2 "virus" files by name whose patients differ. Each is converted to 8-bit
grayscale, its longer side scaled down to 256 px (Lanczos) and saved as JPEG quality 90
under its original name, then ATTRIBUTION.md is written.

    python tools/make_examples.py ../shared/data/kermany-chest-xray [--out threengan_cli/examples]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image

SIDE = 256

ATTRIBUTION = """# Example chest X-rays

These {n} images come from the test set of the public chest X-ray data of

> Kermany, D. S., Goldbaum, M., Cai, W., et al. "Identifying Medical Diagnoses and Treatable
> Diseases by Image-Based Deep Learning." *Cell* 172(5), 1122-1131.e9 (2018).
> doi:10.1016/j.cell.2018.02.010

as published in Kermany, D., Zhang, K., Goldbaum, M. "Labeled Optical Coherence Tomography
(OCT) and Chest X-Ray Images for Classification", Mendeley Data, v2 (2018),
doi:10.17632/rscbjbr9sj.2, under the Creative Commons Attribution 4.0 International license
(CC BY 4.0, https://creativecommons.org/licenses/by/4.0/).

Modified: converted to 8-bit grayscale and downscaled so that the longer side is {side} px
(Lanczos), saved as JPEG (quality 90). Chosen by a fixed rule (`tools/make_examples.py`), not
for how the model does on them. Each keeps its original file name, in a folder named for its
label in the dataset:

{rows}

The full dataset (train, val and test, several thousand X-rays) is at the Mendeley Data
address above; `threengan prepare` reads its `chest_xray/` folder as it is.
"""


def pick(test: Path) -> list[tuple[str, Path]]:
    normal = sorted((test / "NORMAL").iterdir())[:4]
    chosen = [("NORMAL", p) for p in normal]
    for kind in ("bacteria", "virus"):
        patients: set[str] = set()
        for path in sorted((test / "PNEUMONIA").iterdir()):
            match = re.match(r"person(\d+)_" + kind, path.name)
            if match and match[1] not in patients:
                patients.add(match[1])
                chosen.append(("PNEUMONIA", path))
            if len(patients) == 2:
                break
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the chest_xray folder (train/ val/ test/)")
    parser.add_argument("--out", type=Path, default=Path("threengan_cli/examples"))
    args = parser.parse_args()
    rows = []
    for label, path in pick(args.source / "test"):
        with Image.open(path) as img:
            gray = img.convert("L")
            scale = SIDE / max(gray.size)
            size = (round(gray.width * scale), round(gray.height * scale))
            small = gray.resize(size, Image.Resampling.LANCZOS)
        target = args.out / label / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        small.save(target, "JPEG", quality=90)
        rows.append(f"- `{label}/{path.name}` (test/{label}/{path.name})")
    text = ATTRIBUTION.format(n=len(rows), side=SIDE, rows="\n".join(rows))
    (args.out / "ATTRIBUTION.md").write_text(text)
    print(f"wrote {len(rows)} images and ATTRIBUTION.md to {args.out}")


if __name__ == "__main__":
    main()
