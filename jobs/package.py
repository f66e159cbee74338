"""Zip the project's Python packages for spark-submit --py-files.

    python -m jobs.package OUTPUT.zip
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

PACKAGES = ("reccore", "jobs", "devstack")
ROOT = Path(__file__).resolve().parent.parent


def build(output: Path) -> Path:
    """Write the zip of PACKAGES (sources only) to ``output`` and return it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for package in PACKAGES:
            for source in sorted((ROOT / package).rglob("*.py")):
                archive.write(source, source.relative_to(ROOT).as_posix())
    partial.replace(output)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m jobs.package OUTPUT.zip\n")
        sys.exit(2)
    build(Path(sys.argv[1]))
