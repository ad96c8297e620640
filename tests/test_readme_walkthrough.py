"""The README's walkthrough, run as written: its marked console and shell blocks, in order, in
a temporary directory, with real nodes; each command's output compared with the lines the
README shows.

Theory of operation
-------------------
A block the test runs is preceded in README.md by `<!-- walkthrough -->` (options after a
colon); a marker `<!-- walkthrough: ctrl-c 1 2 -->` with no block stands for the reader
pressing Ctrl-C in those terminals (SIGINT; the process must exit 0). Blocks:

    ```sh        every statement runs, in order, in one bash (so cd, export and A=... carry
                 over), stdin from /dev/null; each must exit 0; output is not compared.
    ```console   `$ COMMAND` lines run the same way; the lines up to the next `$ ` are what it
                 prints (stdout and stderr together), compared after normalisation. A line
                 `...` stands for any number of lines. A command that prints an error line
                 of its own (`rblock: ...`) must exit 1, any other 0. Commands that only
                 read (status, cmp, splitbrain list) are run again until they match, for up
                 to SETTLE_S: the README shows the state once it has settled.
    ```toml      with `append FILE`: appended to FILE as written, which must then load
                 (hvctl.config.load, rblock's loader inside); `append-check FILE`: the same
                 on a copy, the walkthrough's FILE left as it was.

A command whose comment says `# terminal N` runs in the background as terminal N (another
window, for the reader): `rblock up` and `rblock serve` until they print `ready`. In a console
block its expected lines must appear in that terminal's output, in order, others between
them allowed; a command already running in terminal N is only compared, not started again.

What differs between the README and a run is substituted, both ways: the README's ports
(7790, 10809, ...) by free ones, /tmp/r0 and /tmp/tls by directories under tmp_path, and in
two-nodes.toml resync_rate by RESYNC_RATE (so that the status during the first full sync is
caught while it runs). Times, dates, rates, progress and byte counters of a running sync are
normalised (VOLATILE). Set WALKTHROUGH_RECORD=1 to print every block's actual output, to
update the README from.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster import REPO, free_ports

README = REPO / "README.md"
README_PORTS = (7790, 7791, 7800, 7801, 10809, 10810, 10811)
README_DIRS = ("/tmp/r0", "/tmp/tls")
RESYNC_RATE = "48M"  # 256 MiB in ~5 s: long enough to see the sync running
SETTLE_S = 20.0  # how long a read-only command may take to show the README's state
READY_S = 20.0  # rblock up/serve to print "ready"
STOP_S = 20.0  # a terminal's process to exit after Ctrl-C
COMMAND_S = 60.0  # any one command
SENTINEL = "__walkthrough_rc__"
READ_ONLY = re.compile(r"^(rblock (status|splitbrain list)\b|cmp\b|nbdinfo\b|qemu-img info\b)")
VOLATILE = [  # (pattern, what it becomes in both the README's lines and the actual ones)
    (re.compile(r"(?<!\d)\d{4}-\d\d-\d\d(?!\d)"), "YYYY-MM-DD"),
    (re.compile(r"(?<!\d)\d\d:\d\d:\d\d(?:[.,]\d+)?(?:[+-]\d\d:?\d\d|Z)?(?!\d)"), "HH:MM:SS"),
    (re.compile(r"\b\d+(?:\.\d+)? sec \([\d.]+ \S+/sec and [\d.]+ ops/sec\)"),
     "T sec (R/sec and N ops/sec)"),  # qemu-io's timing line
    (re.compile(r"\b(rate|eta|done|sent|received):\S+"), r"\1:*"),
    (re.compile(r"\bout-of-sync:\S+(?= done:)"), "out-of-sync:*"),  # while a sync runs
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)?s\b"), "Ns"),  # "for 3s", "the last 0.4s ago"
    (re.compile(r"\b\d+ attempts\b"), "N attempts"),
]
MARK = re.compile(r"^<!-- walkthrough(?::\s*(?P<opts>.*?))?\s*-->\s*$")


@dataclass
class Block:
    line: int  # in README.md, 1-based: where the block's text starts
    lang: str
    opts: list[str]
    text: str


@dataclass
class Terminal:
    command: str
    proc_pid: int
    out: Path


@dataclass
class Run:
    tmp: Path
    ports: dict[int, int]
    shell: subprocess.Popen
    terminals: dict[int, Terminal] = field(default_factory=dict)
    record: bool = False

    # --- substitution -------------------------------------------------------------------------

    def to_test(self, text: str) -> str:
        for d in README_DIRS:
            text = text.replace(d, str(self.tmp / Path(d).name))
        for readme, mine in self.ports.items():
            text = re.sub(rf"(?<!\d){readme}(?!\d)", str(mine), text)
        return text

    def to_readme(self, text: str) -> str:
        for d in README_DIRS:
            text = text.replace(str(self.tmp / Path(d).name), d)
        for readme, mine in self.ports.items():
            text = re.sub(rf"(?<!\d){mine}(?!\d)", str(readme), text)
        return text

    def fix_config(self) -> None:
        """The copied example: its ports, and a slower resync (see the header)."""
        path = self.tmp / "r0" / "two-nodes.toml"
        if not path.exists():
            return
        text = path.read_text()
        fixed = self.to_test(text).replace('# resync_rate = "200M"',
                                           f'resync_rate = "{RESYNC_RATE}"')
        if fixed != text:
            path.write_text(fixed)

    # --- the shell ----------------------------------------------------------------------------

    def sh(self, command: str, timeout_s: float = COMMAND_S) -> tuple[int, str]:
        """Run COMMAND in the walkthrough's bash; (exit status, stdout+stderr)."""
        assert self.shell.stdin is not None and self.shell.stdout is not None
        out = self.tmp / "last.out"
        self.shell.stdin.write(f"{{ {self.to_test(command)}\n}} </dev/null >{out} 2>&1; "
                               f"echo {SENTINEL}$?\n")
        self.shell.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.shell.stdout.readline()
            if line.startswith(SENTINEL):
                rc = int(line[len(SENTINEL):])
                break
            if not line and self.shell.poll() is not None:
                raise AssertionError(f"the walkthrough's shell exited: {command}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{command}: still running after {timeout_s:g} s")
        self.fix_config()
        return rc, self.to_readme(out.read_text(errors="replace"))

    def start(self, n: int, command: str) -> Terminal:
        assert n not in self.terminals or not alive(self.terminals[n].proc_pid), \
            f"terminal {n} still runs {self.terminals[n].command!r}: the README must stop it " \
            f"first (<!-- walkthrough: ctrl-c {n} -->)"
        out = self.tmp / f"terminal-{n}-{len(os.listdir(self.tmp))}.out"
        out.write_text("")  # the child opens it after the shell has answered
        rc, pid = self.sh(f"{command.split('#')[0].rstrip()} >>{out} 2>&1 & echo $!")
        assert rc == 0, pid
        t = Terminal(command, int(pid.strip().splitlines()[-1]), out)
        self.terminals[n] = t
        if re.match(r"rblock (up|serve)\b", command):
            deadline = time.monotonic() + READY_S
            while "ready" not in out.read_text(errors="replace").splitlines():
                assert alive(t.proc_pid), f"terminal {n}: {command} exited:\n{out.read_text()}"
                assert time.monotonic() < deadline, f"terminal {n}: {command} not ready"
                time.sleep(0.05)
        else:
            deadline = time.monotonic() + 1.5  # a stream: until it prints, or a moment
            while not out.read_text(errors="replace") and time.monotonic() < deadline:
                time.sleep(0.05)
        return t

    def ctrl_c(self, n: int) -> None:
        t = self.terminals.get(n)
        assert t is not None, f"Ctrl-C in terminal {n}, but nothing was started there"
        if alive(t.proc_pid):
            os.kill(t.proc_pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_S
        while alive(t.proc_pid):
            assert time.monotonic() < deadline, f"terminal {n}: {t.command} ignored Ctrl-C"
            time.sleep(0.05)
        rc, _ = self.sh(f"wait {t.proc_pid}; echo $?")
        status = int(_.strip().splitlines()[-1]) if _.strip() else rc
        assert status == 0, f"terminal {n}: {t.command} exited {status} after Ctrl-C:\n" \
                            f"{t.out.read_text()[-3000:]}"

    def stop_all(self) -> None:
        for t in self.terminals.values():
            if alive(t.proc_pid):
                os.kill(t.proc_pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for t in self.terminals.values():
            while alive(t.proc_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(t.proc_pid):
                os.kill(t.proc_pid, signal.SIGKILL)
        if self.shell.poll() is None:
            self.shell.kill()
            self.shell.wait()


def alive(pid: int) -> bool:
    """PID runs and is not a zombie (our shell reaps its children only at `wait`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def blocks(text: str) -> list[Block]:
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = MARK.match(lines[i])
        if not m:
            i += 1
            continue
        opts = (m.group("opts") or "").split()
        j = i + 1
        if j < len(lines) and lines[j].startswith("```"):
            lang = lines[j][3:].strip()
            end = j + 1
            while not lines[end].startswith("```"):
                end += 1
            out.append(Block(j + 2, lang, opts, "\n".join(lines[j + 1:end]) + "\n"))
            i = end + 1
        else:
            assert opts and opts[0] == "ctrl-c", f"README.md:{i + 1}: a walkthrough marker " \
                                                 "without a block must be ctrl-c N..."
            out.append(Block(i + 1, "ctrl-c", opts[1:], ""))
            i = j
    return out


def statements(text: str) -> list[str]:
    """Shell statements: lines joined until bash finds them complete (continuations, loops)."""
    out, cur = [], ""
    for line in text.splitlines():
        cur += line + "\n"
        if line.rstrip().endswith("\\"):
            continue
        ok = subprocess.run(["bash", "-n"], input=cur, capture_output=True, text=True)
        if ok.returncode == 0:
            if cur.strip() and not cur.strip().startswith("#"):
                out.append(cur.rstrip("\n"))
            cur = ""
    assert not cur.strip(), f"incomplete shell text: {cur}"
    return out


def console_steps(text: str) -> list[tuple[str, list[str]]]:
    """(command, expected lines) per `$ ` line of a console block."""
    steps: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"console text before any command: {line!r}"
        cmd = line[2:]
        while cmd.rstrip().endswith("\\"):
            i += 1
            cmd += "\n" + lines[i]
        i += 1
        expected = []
        while i < len(lines) and not lines[i].startswith("$ "):
            expected.append(lines[i])
            i += 1
        steps.append((cmd, expected))
    return steps


def bare(command: str) -> str:
    """COMMAND without its comment and extra blanks."""
    return " ".join(command.split("#")[0].split())


def terminal_of(command: str) -> int | None:
    m = re.search(r"#\s*terminal (\d+)", command)
    return int(m.group(1)) if m else None


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, repl in VOLATILE:
            line = pattern.sub(repl, line)
        out.append(line.rstrip())
    return out


def matches(expected: list[str], actual: list[str], loose: bool = False) -> bool:
    """EXPECTED (with `...` lines) against ACTUAL; LOOSE: other lines may come between."""
    exp, act = normalise(expected), normalise(actual)
    if loose:
        it = iter(act)
        return all(any(e == a for a in it) for e in exp if e != "...")
    memo: dict[tuple[int, int], bool] = {}

    def m(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(exp):
                r = j == len(act)
            elif exp[i] == "...":
                r = m(i + 1, j) or (j < len(act) and m(i, j + 1))
            else:
                r = j < len(act) and exp[i] == act[j] and m(i + 1, j + 1)
            memo[(i, j)] = r
        return memo[(i, j)]

    return m(0, 0)


def own_error(command: str, expected: list[str]) -> bool | None:
    """The README shows the command's own error line (`rblock: ...`): it must fail. None: the
    command prints its status itself (`; echo "exit $?"`), which the output then shows."""
    if "$?" in command:
        return None
    prog = command.split()[0]
    return any(line.startswith(f"{prog}: ") for line in expected)


def check_toml(run: Run, b: Block) -> None:
    from hvctl.config import load

    kind, name = b.opts[0], b.opts[1]
    target = run.tmp / "r0" / name
    path = target if kind == "append" else target.with_name(f"check-{name}")
    if kind == "append-check":
        shutil.copy(target, path)
    with path.open("a") as f:
        f.write("\n" + b.text)
    load(path)  # ConfigError: the snippet cannot be appended as written
    if kind == "append-check":
        path.unlink()


def run_console(run: Run, b: Block) -> None:
    for cmd, expected in console_steps(b.text):
        where = f"README.md:{b.line}: $ {cmd}"
        n = terminal_of(cmd)
        if n is not None:
            t = run.terminals.get(n)
            if t is None or not alive(t.proc_pid) or bare(t.command) != bare(cmd):
                t = run.start(n, cmd)
            deadline = time.monotonic() + (3.0 if run.record else SETTLE_S)
            while True:
                got = run.to_readme(t.out.read_text(errors="replace")).splitlines()
                if matches(expected, got, loose=True):
                    break
                if time.monotonic() > deadline:
                    if run.record:
                        print(f"--- {where} MISMATCH", end="")
                        break
                    raise AssertionError(f"{where}: terminal {n} shows\n" + "\n".join(got) +
                                         "\n--- the README expects, in order:\n" +
                                         "\n".join(expected))
                time.sleep(0.1)
            if run.record:
                print(f"--- {where} (terminal {n})\n" + "\n".join(got))
            continue
        settle_s = (3.0 if run.record else SETTLE_S) if READ_ONLY.match(cmd) else 0.0
        deadline = time.monotonic() + settle_s
        while True:
            rc, out = run.sh(cmd)
            ok = matches(expected, out.splitlines())
            if ok or run.record and time.monotonic() > deadline:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{where}: printed\n{out}--- the README shows:\n" +
                                     "\n".join(expected))
            time.sleep(0.2)
        if run.record:
            print(f"--- {where} {'' if ok else 'MISMATCH '}(exit {rc})\n{out}", end="")
            continue
        refusal = own_error(cmd, expected)
        if refusal:
            assert rc == 1, f"{where}: a refusal must exit 1, not {rc}"
        elif refusal is not None:
            assert rc == 0, f"{where}: exit {rc}:\n{out}"


@pytest.mark.skipif(not all(shutil.which(t) for t in ("openssl", "qemu-io", "qemu-img",
                                                        "nbdinfo")),
                    reason="openssl, qemu-utils and libnbd-bin are needed (make test installs "
                           "them)")
def test_readme_walkthrough(tmp_path: Path) -> None:
    started = time.monotonic()
    found = blocks(README.read_text())
    assert len(found) > 20, "the README lost its walkthrough markers"
    env = {k: v for k, v in os.environ.items() if k not in ("RBLOCK_CONFIG", "HVCTL_CONFIG")}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not p.endswith("/.venv/bin"))
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr in the order a terminal shows them
    shell = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env=env, bufsize=1)
    run = Run(tmp_path, dict(zip(README_PORTS, free_ports(len(README_PORTS)), strict=True)),
              shell, record=bool(os.environ.get("WALKTHROUGH_RECORD")))
    try:
        for b in found:
            if b.lang == "ctrl-c":
                for n in b.opts:
                    run.ctrl_c(int(n))
            elif b.lang == "sh":
                for stmt in statements(b.text):
                    n = terminal_of(stmt.splitlines()[-1])
                    if n is not None:
                        run.start(n, stmt)
                        continue
                    rc, out = run.sh(stmt)
                    assert rc == 0, f"README.md:{b.line}: {stmt}\nexit {rc}:\n{out}"
            elif b.lang == "console":
                run_console(run, b)
            elif b.lang == "toml":
                check_toml(run, b)
            else:
                raise AssertionError(f"README.md:{b.line}: a walkthrough block in {b.lang}")
    finally:
        run.stop_all()
    print(f"walkthrough: {len(found)} blocks in {time.monotonic() - started:.1f} s")


def test_the_comparison_itself() -> None:
    """What may differ between the README's lines and a run, and what may not."""
    assert matches(["a", "...", "c"], ["a", "b", "b", "c"])
    assert matches(["a", "...", "c"], ["a", "c"])
    assert not matches(["a", "c"], ["a", "b", "c"])
    assert not matches(["r0: demoted"], ["r0: promoted"])
    assert matches(["x", "z"], ["w", "x", "y", "z"], loose=True)
    assert not matches(["z", "x"], ["x", "y", "z"], loose=True)
    assert matches(["1: 2026-12-03 07:12:40 saved"], ["1: 2027-01-01 23:59:59 saved"])
    assert matches(["2026-12-04T19:58:35.331+00:00 r0 exists"],
                   ["2026-12-05T01:02:03.004+01:00 r0 exists"])
    assert matches(["  beta connection:Connecting (refused by the peer, for 3s) role:Unknown"],
                   ["  beta connection:Connecting (refused by the peer, for 11s) role:Unknown"])
    assert matches(["out-of-sync:171.5MiB done:33.0% rate:211.6MiB/s eta:1s sent:9B"],
                   ["out-of-sync:89.5MiB done:65.0% rate:49.3MiB/s eta:2s sent:27516B"])
    assert not matches(["out-of-sync:1.0MiB sent:0B"], ["out-of-sync:2.0MiB sent:0B"])
    assert not matches(["r0 role:Secondary disk:UpToDate size:256.0MiB"],
                       ["r0 role:Secondary disk:UpToDate size:255.0MiB"])
    assert own_error("rblock primary $A r0", ["rblock: cannot promote r0"])
    assert own_error("rblock primary $A r0; echo \"exit $?\"", ["rblock: no"]) is None
    assert statements("for n in a b; do\n  echo $n\ndone\nx \\\n  y\n# note\n") == \
        ["for n in a b; do\n  echo $n\ndone", "x \\\n  y"]
