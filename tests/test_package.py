"""The Debian package: built by `make deb` (tools/build_deb.py), installed for real on this
machine with `dpkg -i`, used from its own binaries (a node started by the installed `rblock
up`, `rblock status` against it over a Unix control socket), its units checked by
`systemd-analyze verify` (systemd is not PID 1 here: verify, never boot), its man pages
rendered by man and groff, its bash completion run, and removed again with `dpkg --purge`
(the last test), leaving the machine as it was.

Installing needs root; a machine-wide lock serializes two runs (dpkg is machine-wide). Under
CI=true a missing requirement fails; elsewhere it skips. Two fast tests need no install: the
man pages and completion cover every subcommand and option of the parsers (one definition,
no copy to drift), and the shipped example cluster file loads once uncommented.
"""

from __future__ import annotations

import fcntl
import gzip
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.cluster import REPO, free_ports
from tools import build_deb, cli_docs
from tools.procs import stop_by_pid

LOCK = Path("/run/lock/rblock-test-package.lock")  # machine-wide, as dpkg's database is
LOCK_TIMEOUT_S = 900.0  # another run's build, install and tests
BUILD_TIMEOUT_S = 1500.0  # a first build compiles libvirt-python
DPKG_TIMEOUT_S = 300.0
CMD_TIMEOUT_S = 60.0
UP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the installed commands only, no .venv
COMMANDS = ("dpkg", "dpkg-deb", "dpkg-shlibdeps", "strip", "systemd-analyze", "man", "groff",
            "bash", "make")
UNIT_DIR = Path("/lib/systemd/system")
DSH_STATE = Path("/var/lib/systemd/deb-systemd-helper-enabled")
RUN_DIR = Path("/run/rblock")
VERSION = build_deb.project_version()


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def _installed() -> bool:
    """dpkg knows the package in any state but not-installed (config-files counts)."""
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", build_deb.PACKAGE],
                         capture_output=True, text=True)
    return res.returncode == 0 and res.stdout.split()[-1:] != ["not-installed"]


def _env(**extra: str) -> dict[str, str]:
    """A host's environment: no .venv, no PYTHONPATH, the C locale (ASCII man pages)."""
    keep = {k: v for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith("LC_")}
    return {**keep, "PATH": PATH, "LC_ALL": "C", "LANG": "C", **extra}


def run(cmd: list[str], cwd: Path | str = "/", timeout_s: float = CMD_TIMEOUT_S,
        **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout_s,
                          env=_env(**env))


def _lock():
    """The machine-wide lock, taken within LOCK_TIMEOUT_S (another run may hold it)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    f = LOCK.open("w")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                _unavailable(f"{LOCK} held for {LOCK_TIMEOUT_S:g}s by another run")
            time.sleep(1.0)


@pytest.fixture(scope="module")
def package():
    """Build with `make deb`, install with dpkg -i; purged at the end if a test has not."""
    if os.geteuid() != 0:
        _unavailable("installing the package needs root (dpkg -i)")
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        _unavailable(f"missing {', '.join(missing)}: make venv installs them (APT_PACKAGES)")
    for mod in ("argparse_manpage", "shtab"):
        if importlib.util.find_spec(mod) is None:
            _unavailable(f"python module {mod} missing: make venv installs '.[build]'")
    lock = _lock()
    try:
        if _installed():
            _unavailable(f"package {build_deb.PACKAGE} is installed on this machine; the "
                         f"test installs and purges its own: dpkg --purge {build_deb.PACKAGE}")
        for p in (Path("/usr/bin/rblock"), Path("/usr/bin/hvctl"), Path(build_deb.VENV_DIR)):
            if os.path.lexists(p):
                _unavailable(f"{p} exists outside the package; the test would replace it")
        before = {"dsh": sorted(os.listdir(DSH_STATE)) if DSH_STATE.is_dir() else [],
                  "run_dir": RUN_DIR.exists()}
        t0 = time.monotonic()
        res = subprocess.run(["make", "-s", "deb"], cwd=REPO, capture_output=True, text=True,
                             timeout=BUILD_TIMEOUT_S)
        build_s = time.monotonic() - t0
        assert res.returncode == 0, f"make deb failed:\n{res.stderr}{res.stdout}"
        deb = build_deb.deb_path()
        assert deb.is_file(), res.stdout
        print(f"make deb: {build_s:.1f}s, {deb.stat().st_size // 2**20} MiB")
        res = run(["dpkg", "-i", str(deb)], timeout_s=DPKG_TIMEOUT_S)
        assert res.returncode == 0, f"dpkg -i failed:\n{res.stderr}{res.stdout}"
        files = run(["dpkg", "-L", build_deb.PACKAGE]).stdout.split("\n")
        yield {"deb": deb, "files": [f for f in files if f], "before": before,
               "build_s": build_s}
    finally:
        if _installed():
            subprocess.run(["dpkg", "--purge", build_deb.PACKAGE], capture_output=True,
                           timeout=DPKG_TIMEOUT_S)
        lock.close()


# --- no install needed -----------------------------------------------------------------------


def test_man_pages_and_completion_cover_every_subcommand_and_option():
    """Both come from the parsers --help prints: whatever they define is in them."""
    for tool in cli_docs.TOOLS:
        page = cli_docs.manpage(tool, VERSION)
        completion = cli_docs.completion(tool)
        text = page.replace("\\-", "-").replace("\\fB", "").replace("\\fR", "")
        for path, parser in cli_docs.walk(cli_docs.build_parser(tool)):
            if path:
                assert f"{tool} {' '.join(path)}" in text, (tool, path)
                assert path[-1] in completion, (tool, path)
            for action in parser._actions:
                for opt in action.option_strings:
                    if opt not in ("-h", "--help"):
                        assert opt in text, (tool, path, opt)
                        assert opt in completion, (tool, path, opt)
        assert f"_shtab_{tool}()" in completion
        assert page.startswith(f'.TH {tool.upper()} "1"')


def test_man_pages_and_completion_do_not_depend_on_the_build_host(monkeypatch):
    """A parser default taken from the host's name or the environment would put the build
    machine's into every installed page: two builds with different ones give the same."""
    import socket

    outputs = []
    for n in ("a", "b"):
        monkeypatch.setattr(socket, "gethostname", lambda n=n: f"build-host-{n}")
        for var in ("RBLOCK_CONFIG", "HVCTL_CONFIG"):
            monkeypatch.setenv(var, f"/srv/{n}/cluster.toml")
        outputs.append([(cli_docs.manpage(t, VERSION, "2025-01-01"), cli_docs.completion(t))
                        for t in cli_docs.TOOLS])
    assert outputs[0] == outputs[1]


def test_shipped_example_config_loads_uncommented():
    """/etc/rblock/cluster.toml is all comments; its "#key = value" lines, uncommented, are a
    valid two-node cluster with a guest (the keys cannot drift from the loaders)."""
    from hvctl.config import load as load_hv
    from rblock.config import load

    text = (REPO / "packaging" / "cluster.toml").read_text()
    assert all(not line.strip() or line.startswith("#") for line in text.splitlines())
    settings = re.sub(r"(?m)^#(?=[^ #!\n])", "", text)
    path = Path(f"/tmp/rblock-example-{uuid.uuid4().hex[:8]}.toml")
    try:
        path.write_text(settings)
        cfg = load(path)
        assert sorted(cfg.nodes) == ["alpha", "beta"] and list(cfg.resources) == ["r0"]
        assert "vm1" in load_hv(path).guests
    finally:
        path.unlink(missing_ok=True)


# --- the installed package -------------------------------------------------------------------


@pytest.mark.slow
def test_installed_layout(package):
    files = set(package["files"])
    for tool in cli_docs.TOOLS:
        assert f"/usr/bin/{tool}" in files
        assert os.readlink(f"/usr/bin/{tool}") == f"{build_deb.VENV_DIR}/bin/{tool}"
        assert f"/usr/share/man/man1/{tool}.1.gz" in files
        assert f"/usr/share/bash-completion/completions/{tool}" in files
    for unit in build_deb.UNITS:
        assert f"/lib/systemd/system/{unit}" in files
    assert "/usr/lib/tmpfiles.d/rblock.conf" in files
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", build_deb.PACKAGE]).stdout
    assert sorted(line.split()[0] for line in conffiles.strip().splitlines()) == sorted(
        build_deb.CONFFILES)
    # postinst made the run directory (systemd-tmpfiles), not only the next boot
    assert RUN_DIR.is_dir() and (RUN_DIR.stat().st_mode & 0o777) == 0o755
    # the venv is the package's own: its code, its libraries, Debian's python3.11
    res = run([f"{build_deb.VENV_DIR}/bin/python", "-I", "-c",
               "import sys, importlib, rblock, hvctl\n"
               "for m in sys.argv[1:]: importlib.import_module(m)\n"
               "print(rblock.__file__, hvctl.__file__, sys.prefix)", *build_deb.IMPORTS])
    assert res.returncode == 0, res.stderr
    for path in res.stdout.split():
        assert path.startswith(build_deb.VENV_DIR), res.stdout


@pytest.mark.slow
def test_installed_versions(package, tmp_path):
    """`rblock --version` and `hvctl --version` on the PATH, both asked before either fails."""
    answers = {}
    for tool in cli_docs.TOOLS:
        assert shutil.which(tool, path=PATH) == f"/usr/bin/{tool}"
        res = run([tool, "--version"], cwd=tmp_path)
        answers[tool] = (res.returncode, VERSION in res.stdout, res.stdout + res.stderr)
    bad = {t: a[2] for t, a in answers.items() if a[:2] != (0, True)}
    assert not bad, f"--version without status 0 and {VERSION}: {bad}"


@pytest.mark.slow
def test_status_of_a_node_started_from_the_installed_binary(package, tmp_path):
    """A two-node file, only alpha started (beta never comes): `rblock up` from /usr/bin,
    its control API on a Unix socket in the temp dir, `rblock status` against it."""
    rep, nbd, rep_b, ctl_b, nbd_b = free_ports(5)
    sock = tmp_path / "alpha.sock"
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f"""[resource.r0]
size = "16M"
secret = "{uuid.uuid4().hex}"

[node.alpha]
replication = "127.0.0.1:{rep}"
control = "unix:{sock}"
nbd = "127.0.0.1:{nbd}"

[node.alpha.disk]
r0 = "alpha/r0.img"

[node.beta]
replication = "127.0.0.1:{rep_b}"
control = "127.0.0.1:{ctl_b}"
nbd = "127.0.0.1:{nbd_b}"

[node.beta.disk]
r0 = "beta/r0.img"
""")
    node = ["--config", str(cfg), "--node", "alpha"]
    res = run(["rblock", "create-md", *node], cwd=tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    out, err = tmp_path / "up.out", tmp_path / "up.log"
    proc = subprocess.Popen(["rblock", "up", *node], stdout=out.open("wb"),
                            stderr=err.open("wb"), cwd=tmp_path, env=_env())
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while "ready" not in out.read_text().splitlines():
            assert proc.poll() is None, f"rblock up exited {proc.returncode}: {err.read_text()}"
            assert time.monotonic() < deadline, f"not ready in {UP_TIMEOUT_S:g}s: " + \
                err.read_text()
            time.sleep(0.05)
        # the installed interpreter and script, not the checkout's
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [f"{build_deb.VENV_DIR}/bin/python".encode(), b"/usr/bin/rblock"]
        res = run(["rblock", "status", *node], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("r0 role:Secondary"), res.stdout
        res = run(["rblock", "status", "--json", *node], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        r0 = json.loads(res.stdout)["resources"][0]
        assert (r0["name"], r0["role"], r0["peers"][0]["node"]) == ("r0", "Secondary", "beta")
    finally:
        status, killed = stop_by_pid(proc, signal.SIGTERM, STOP_TIMEOUT_S)
    assert (status, killed) == (0, False), err.read_text()


@pytest.mark.slow
def test_installed_units_verify(package):
    units = [str(UNIT_DIR / u) for u in build_deb.UNITS]
    res = run(["systemd-analyze", "verify", *units])
    # verify exits 0 on unknown keys and bad settings but names them: nothing may be said
    assert (res.returncode, res.stdout + res.stderr) == (0, ""), res.stderr
    text = (UNIT_DIR / "rblock.service").read_text()
    assert "RuntimeDirectory=rblock" in text and "ExecStart=/usr/bin/rblock up" in text


@pytest.mark.slow
def test_installed_man_pages(package, tmp_path):
    for tool in cli_docs.TOOLS:
        res = run(["man", "-w", tool])
        assert res.stdout.strip() == f"/usr/share/man/man1/{tool}.1.gz", res.stderr
        res = run(["man", "-l", res.stdout.strip()], MANWIDTH="200")
        assert res.returncode == 0, res.stderr
        assert re.match(rf"{tool.upper()}\(1\)", res.stdout), res.stdout[:200]
        assert f"{tool} - {cli_docs.SUMMARY[tool]}" in res.stdout
        for path, _parser in cli_docs.walk(cli_docs.build_parser(tool)):
            assert " ".join((tool, *path)) in res.stdout, path
        # groff says nothing: no unknown request, no line it could not set
        page = tmp_path / f"{tool}.1"
        page.write_bytes(gzip.decompress(Path(f"/usr/share/man/man1/{tool}.1.gz").read_bytes()))
        res = run(["groff", "-man", "-Tascii", "-ww", "-z", str(page)])
        assert (res.returncode, res.stderr) == (0, "")


def _complete(tool: str, *words: str) -> set[str]:
    quoted = " ".join(w or '""' for w in words)
    script = (f"source /usr/share/bash-completion/completions/{tool}; "
              f"COMP_WORDS=({tool} {quoted}); "
              f"COMP_CWORD={len(words)}; _shtab_{tool}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    res = run(["bash", "--norc", "--noprofile", "-c", script])
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


@pytest.mark.slow
def test_installed_bash_completion(package):
    assert _complete("rblock", "st") == {"status"}
    assert "--json" in _complete("rblock", "status", "--j")
    assert _complete("hvctl", "gu") == {"guest"}
    assert _complete("hvctl", "guest", "st") == {"status", "start", "stop"}
    for tool in cli_docs.TOOLS:
        parser = cli_docs.build_parser(tool)
        top = {p[0] for p, _ in cli_docs.walk(parser) if len(p) == 1}
        assert top <= _complete(tool, ""), tool


@pytest.mark.slow
def test_purge_leaves_the_machine_as_it_was(package):
    """The last test: dpkg --purge removes every file the package had, its conffiles, the
    empty run directory and deb-systemd-helper's records."""
    res = run(["dpkg", "--purge", build_deb.PACKAGE], timeout_s=DPKG_TIMEOUT_S)
    assert res.returncode == 0, res.stderr + res.stdout
    assert not _installed()
    left = [f for f in package["files"] if os.path.lexists(f) and not os.path.isdir(f)]
    assert left == []
    for d in (build_deb.VENV_DIR, "/etc/rblock", "/usr/share/doc/rblock"):
        assert not os.path.lexists(d), d
    for path in build_deb.CONFFILES:
        assert not os.path.lexists(path), path
    after = sorted(os.listdir(DSH_STATE)) if DSH_STATE.is_dir() else []
    assert after == package["before"]["dsh"]
    assert RUN_DIR.exists() == package["before"]["run_dir"]
