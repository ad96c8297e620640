"""`make deb`: the Debian package of rblock and hvctl for bookworm (build/deb/rblock_V_ARCH.deb).

    python -m tools.build_deb [--out build/deb]      # prints the .deb's path

Theory of operation. The package is a staged tree packed by `dpkg-deb --build`, no debhelper:

1. The project's wheel is built from a clean copy of its sources (build/deb/src), so nothing
   stale in a setuptools build directory can end up in it.
2. A venv is made in the staged tree at STAGE/opt/rblock by Debian's /usr/bin/python3 (3.11,
   the interpreter bookworm guarantees), without pip, and the wheel and its PyPI dependencies
   are installed into it with the build venv's pip (`pip --python`). libvirt-python has no
   wheels: pip builds it against libvirt-dev, once (the pip cache is build/deb/pip-cache).
   Debian's python3-aiohttp (3.8), python3-argon2 (21.1) and python3-prometheus-client
   (0.16) are older than pyproject.toml allows, so nothing comes from system site-packages:
   the venv sees only its own libraries, whatever else the host has installed.
3. A venv knows its own path: the scripts' shebangs and pyvenv.cfg name STAGE/opt/rblock.
   They are rewritten to /opt/rblock, the bytecode is compiled with /opt/rblock paths in it
   (checked-hash .pyc: valid whatever mtimes dpkg gives the files), and then no file of the
   tree may still name the build directory (checked: such a file would break on install).
4. Around it: /usr/bin/{rblock,hvctl} symlinks, the units of contrib/systemd, tmpfiles.d for
   /run/rblock, /etc/rblock/cluster.toml and /etc/default/rblock (conffiles, all comments),
   man pages and bash completion from tools/cli_docs.py (the same parsers as --help), the
   README and examples under /usr/share/doc/rblock, and the maintainer scripts of
   packaging/debian/. Depends: python3 3.11 and what dpkg-shlibdeps finds the venv's
   compiled modules linked against (libvirt0, libc6).

Everything it writes is under OUT (build/deb); a lock there serializes two builds.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
OUT_DEFAULT = REPO / "build" / "deb"
PACKAGE = "rblock"
VENV_DIR = "/opt/rblock"  # where the venv lives on the installed host
PYTHON_SYSTEM = "/usr/bin/python3"  # Debian's: the venv's interpreter on the host
PYTHON_DEPENDS = "python3 (>= 3.11), python3 (<< 3.12)"  # the venv's lib/python3.11
MAINTAINER = "rblock maintainers <maintainers@users.noreply.r-seed-f7561ea2.example>"
TOOLS = ("rblock", "hvctl")
UNITS = ("rblock.service", "hvctl-agent.service", "hvctl-web.service")
CONFFILES = {  # installed path -> source in the repository
    "/etc/rblock/cluster.toml": PACKAGING / "cluster.toml",
    "/etc/default/rblock": PACKAGING / "default",
}
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
# The wheel's inputs, copied to a clean directory (pyproject.toml's packages and readme).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "rblock", "hvctl")
# Bounds: a step that takes longer is stuck (the first build compiles libvirt-python).
PIP_TIMEOUT_S = 1200
STEP_TIMEOUT_S = 300
# What the venv must import: the project's dependencies by module name, checked after install.
IMPORTS = ("rblock.cli", "hvctl.cli", "uvloop", "crc32c", "aiohttp", "libvirt", "jinja2",
           "aiohttp_jinja2", "argon2", "prometheus_client")


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"build_deb: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout_s: float = STEP_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kw)
    if res.returncode != 0:
        raise BuildError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                         f"{res.stderr[-4000:]}{res.stdout[-2000:]}")
    return res


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def deb_path(out: Path = OUT_DEFAULT) -> Path:
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    return out / f"{PACKAGE}_{project_version()}_{arch}.deb"


def source_date_epoch() -> str:
    """The last commit's time (reproducible dates in man pages and the archive), else now."""
    res = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
                         capture_output=True, text=True)
    stamp = res.stdout.strip()
    return stamp if res.returncode == 0 and stamp.isdigit() else str(int(time.time()))


def build(out: Path = OUT_DEFAULT) -> Path:
    """Build the package; returns the .deb's path."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(out)


def _build(out: Path) -> Path:
    t0 = time.monotonic()
    version = project_version()
    env = {**os.environ, "PIP_CACHE_DIR": str(out / "pip-cache"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "SOURCE_DATE_EPOCH": source_date_epoch(),
           "PYTHONDONTWRITEBYTECODE": "1"}
    stage = out / "root"
    for d in (stage, out / "src", out / "dist"):
        shutil.rmtree(d, ignore_errors=True)
    venv = stage / VENV_DIR.lstrip("/")

    wheel = _project_wheel(out, env)
    log(f"{wheel.name} in {time.monotonic() - t0:.1f}s")
    t = time.monotonic()
    run([PYTHON_SYSTEM, "-m", "venv", "--without-pip", str(venv)])
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--no-compile", "--no-warn-script-location", str(wheel)],
        timeout_s=PIP_TIMEOUT_S, env=env)
    log(f"venv installed in {time.monotonic() - t:.1f}s")
    _relocate(venv)
    frozen = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                  "freeze", "--all"], env=env).stdout
    _strip(venv)
    run([str(venv / "bin" / "python"), "-m", "compileall", "-q", "--invalidation-mode",
         "checked-hash", "-s", str(stage), "-p", "/", str(venv / "lib")], env=env)
    _check_imports(venv)
    _files(stage, version, frozen, env)
    _check_no_build_paths(stage, out)
    depends = _depends(out, venv)
    _control(stage, version, depends)
    _normalize_modes(stage)
    _md5sums(stage)
    deb = deb_path(out)
    deb.unlink(missing_ok=True)
    t = time.monotonic()
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "-z6", "--build", str(stage), str(deb)],
        env=env)
    log(f"dpkg-deb in {time.monotonic() - t:.1f}s")
    log(f"{deb} ({deb.stat().st_size // 2**20} MiB) in {time.monotonic() - t0:.1f}s")
    return deb


def _project_wheel(out: Path, env: dict) -> Path:
    src = out / "src"
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in WHEEL_SOURCES:
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        else:
            shutil.copy2(p, src / name)
    # no build isolation: the build venv's setuptools, not a download per build
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out / "dist"), str(src)], env=env)
    wheels = list((out / "dist").glob(f"{PACKAGE}-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _relocate(venv: Path) -> None:
    """Rewrite STAGE/opt/rblock to /opt/rblock in the venv's scripts and pyvenv.cfg."""
    old = str(venv).encode()
    for p in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if old in data:
            p.write_bytes(data.replace(old, VENV_DIR.encode()))
    # pip's record of the wheel file it installed from (a path in build/): no use on a host
    for direct in venv.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        record = direct.parent / "RECORD"
        record.write_text("".join(line for line in record.read_text().splitlines(True)
                                  if not line.startswith(f"{direct.parent.name}/direct_url.json")))
        direct.unlink()
    for link in (venv / "bin").iterdir():
        if link.is_symlink():
            target = os.readlink(link)
            assert not target.startswith(str(venv)), (link, target)


def _strip(venv: Path) -> None:
    """Debug symbols out of compiled modules (libvirt-python is built with -g)."""
    libs = [str(p) for p in venv.glob("lib/python3*/site-packages/**/*.so*") if p.is_file()]
    if libs:
        run(["strip", "--strip-unneeded", *libs])


def _check_imports(venv: Path) -> None:
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    run([str(venv / "bin" / "python"), "-I", "-c", code, *IMPORTS], cwd="/")


def _check_no_build_paths(stage: Path, out: Path) -> None:
    """No staged file may name the build directory: it would not exist on the host."""
    needle = str(out.resolve()).encode()
    bad = []
    for p in stage.rglob("*"):
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
            bad.append(str(p.relative_to(stage)))
    if bad:
        raise BuildError(f"{len(bad)} staged files name {out}: {', '.join(bad[:10])}")


def _files(stage: Path, version: str, frozen: str, env: dict) -> None:
    from tools import cli_docs

    usr_bin = stage / "usr" / "bin"
    usr_bin.mkdir(parents=True)
    for tool in TOOLS:
        (usr_bin / tool).symlink_to(f"{VENV_DIR}/bin/{tool}")
        assert (stage / VENV_DIR.lstrip("/") / "bin" / tool).is_file(), tool
    units = stage / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO / "contrib" / "systemd" / unit, units / unit)
    tmpfiles = stage / "usr" / "lib" / "tmpfiles.d"
    tmpfiles.mkdir(parents=True)
    shutil.copy(PACKAGING / "tmpfiles.conf", tmpfiles / f"{PACKAGE}.conf")
    for path, src in CONFFILES.items():
        dst = stage / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)

    gen = stage.parent / "cli-docs"
    shutil.rmtree(gen, ignore_errors=True)
    date = time.strftime("%Y-%m-%d", time.gmtime(int(env["SOURCE_DATE_EPOCH"])))
    cli_docs.write_all(gen, version, date)
    man = stage / "usr" / "share" / "man" / f"man{cli_docs.MAN_SECTION}"
    completions = stage / "usr" / "share" / "bash-completion" / "completions"
    man.mkdir(parents=True)
    completions.mkdir(parents=True)
    for tool in TOOLS:
        page = (gen / f"man{cli_docs.MAN_SECTION}" / f"{tool}.{cli_docs.MAN_SECTION}")
        _gzip(page.read_bytes(), man / f"{page.name}.gz")
        shutil.copy(gen / "completions" / tool, completions / tool)

    doc = stage / "usr" / "share" / "doc" / PACKAGE
    doc.mkdir(parents=True)
    shutil.copy(REPO / "README.md", doc / "README.md")
    shutil.copytree(REPO / "examples", doc / "examples")
    (doc / "python-packages.txt").write_text(
        f"# The Python packages inside {VENV_DIR} (pip freeze at build time)\n{frozen}")


def _gzip(data: bytes, dst: Path) -> None:
    """gzip -9n: no name or time inside (Debian policy for man pages; reproducible)."""
    with open(dst, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f,
                                             compresslevel=9, mtime=0) as gz:
        gz.write(data)


def _depends(out: Path, venv: Path) -> str:
    """python3 3.11 and the shared libraries the compiled modules need (dpkg-shlibdeps)."""
    libs = [str(p) for p in venv.glob("lib/python3*/site-packages/**/*.so*") if p.is_file()]
    # dpkg-shlibdeps wants a source tree: an empty debian/control is enough for -O
    work = out / "shlibdeps"
    (work / "debian").mkdir(parents=True, exist_ok=True)
    (work / "debian" / "control").write_text("")
    res = run(["dpkg-shlibdeps", "-O", "--ignore-missing-info", "-e", *libs], cwd=work)
    m = re.search(r"^shlibs:Depends=(.*)$", res.stdout, re.M)
    found = [d.strip() for d in m.group(1).split(",")] if m else []
    return ", ".join([PYTHON_DEPENDS, *found])


def _control(stage: Path, version: str, depends: str) -> None:
    control = stage / "DEBIAN"
    control.mkdir()
    size_kib = sum(p.lstat().st_size for p in stage.rglob("*")) // 1024 + 1
    fields = {"@VERSION@": version, "@ARCH@": run(["dpkg", "--print-architecture"]).stdout
              .strip(), "@MAINTAINER@": MAINTAINER, "@INSTALLED_SIZE@": str(size_kib),
              "@DEPENDS@": depends}
    text = (PACKAGING / "debian" / "control").read_text()
    for k, v in fields.items():
        text = text.replace(k, v)
    assert "@" not in text.replace(MAINTAINER, ""), text
    (control / "control").write_text(text)
    (control / "conffiles").write_text("".join(f"{p}\n" for p in CONFFILES))
    for script in MAINTAINER_SCRIPTS:
        shutil.copy(PACKAGING / "debian" / script, control / script)
        (control / script).chmod(0o755)


def _normalize_modes(stage: Path) -> None:
    """Directories 0755, files 0644 or 0755 (executable): the checkout's umask is not ours."""
    for p in [stage, *stage.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o755)
        else:
            p.chmod(0o755 if p.stat().st_mode & 0o111 else 0o644)


def _md5sums(stage: Path) -> None:
    lines = []
    for p in sorted(stage.rglob("*")):
        rel = p.relative_to(stage)
        if rel.parts[0] == "DEBIAN" or p.is_symlink() or not p.is_file():
            continue
        if f"/{rel}" in CONFFILES:
            continue  # dpkg keeps conffiles' sums itself
        lines.append(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {rel}\n")
    (stage / "DEBIAN" / "md5sums").write_text("".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.build_deb",
                                 description="build the Debian package (build/deb/*.deb)")
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT, help="build directory")
    args = ap.parse_args(argv)
    try:
        print(build(args.out.resolve()))
    except BuildError as e:
        print(f"build_deb: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
