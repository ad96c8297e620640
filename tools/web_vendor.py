"""The browser libraries shipped with hvctl web, from the npm registry at pinned versions
(hosts have no internet at run time, so nothing is loaded from a CDN).

    .venv/bin/python tools/web_vendor.py     # fetch with `npm pack`, check, copy

Each entry: the package, its version, the sha256 of the tarball `npm pack` downloads, and
what is copied from it into hvctl/web/static/vendor/NAME-VERSION/: a file goes there by its
name; a directory ("core/") keeps its path, so ES modules find each other by their relative
imports.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENDOR = REPO / "hvctl" / "web" / "static" / "vendor"
LIBS = [
    # xterm.js: the guest's serial console in the page
    ("@xterm/xterm", "5.5.0", "bd954fa721872170188cc5d7e83e88db3c83c9a18a4e8d24c2783d26491f59d2",
     "xterm", ["lib/xterm.js", "css/xterm.css", "LICENSE"]),
    # noVNC: the guest's screen (VNC) in the page. 1.7.0 ships its ES modules (core/, with
    # pako under vendor/); 1.5 and 1.6 ship only a CommonJS build (lib/) a browser cannot
    # import. LICENSE.txt names the license texts under docs/.
    ("@novnc/novnc", "1.7.0", "32689f18d6abe96bc6530828a6bd0b9ae33bda07c083a6575ed255b5a8f2e903",
     "novnc", ["core/", "vendor/pako/", "docs/", "LICENSE.txt", "AUTHORS"]),
    # uPlot: the Storage page's charts (IOPS, latency, resync rate); 50 KB, no dependencies,
    # draws on a canvas and takes appended points cheaply (Chart.js is 4x its size)
    ("uplot", "1.6.32", "4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d",
     "uplot", ["dist/uPlot.iife.min.js", "dist/uPlot.min.css", "LICENSE"]),
]


def main() -> int:
    for package, version, sha256, name, files in LIBS:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(["npm", "pack", f"{package}@{version}"], cwd=tmp,
                                 capture_output=True, text=True, check=True).stdout.split()
            tgz = Path(tmp) / out[-1]
            got = hashlib.sha256(tgz.read_bytes()).hexdigest()
            if got != sha256:
                print(f"{package}@{version}: sha256 {got}, expected {sha256}; not copied",
                      file=sys.stderr)
                return 1
            with tarfile.open(tgz) as t:
                # the "data" filter (no links out, no devices) where this Python has it
                # (3.11.4+); the tarball's sha256 is checked above either way
                t.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                     else {}))
            dest = VENDOR / f"{name}-{version}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                src = Path(tmp) / "package" / f
                if f.endswith("/"):
                    shutil.copytree(src, dest / f, dirs_exist_ok=True)
                else:
                    shutil.copy(src, dest / src.name)
            print(f"{package}@{version} -> {dest.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
