#!/usr/bin/env python3
"""Benchmark `rblock serve` against qemu-nbd and nbdkit file with fio's nbd engine.

Every server gets a fresh sparse image of the same size and is started fresh for each
(job, repetition, server) run, then stopped by PID. Servers alternate inside each
repetition so slow drift of a shared machine hits all of them alike. The table shows
medians over repetitions and the IOPS ratio to qemu-nbd (median of per-repetition ratios).

    .venv/bin/python benchmarks/run.py [--quick] [--repeat N] [--servers a,b] [--jobs x,y]
                                       [--base-tree DIR]

--quick is the smoke test `make test` runs (tests/test_bench_quick.py): every server and
every job, QUICK_RUNTIME_S per run on a QUICK_SIZE image, the prefill through the measured
server instance; it must produce every row, its figures mean little.

With --base-tree, every rblock server also runs from DIR (another checkout of the project,
say `git worktree add /tmp/base HEAD~1`) as a twin named NAME-base, alternating with the
others: a before/after comparison of a change in one run.

Standard library only; see benchmarks/README.md.
"""

import argparse
import atexit
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # tools/, when run as a script
from tools import etcd_local  # noqa: E402

HOST = "127.0.0.1"
EXPORT_NAME = "bench"
DEFAULT_RUNTIME_S = 10
QUICK_RUNTIME_S = 0.3
DEFAULT_SIZE = "1G"
QUICK_SIZE = "32M"
SERVER_READY_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 5.0
PROBE_INTERVAL_S = 0.1
CLUSTER_POLL_INTERVAL_S = 0.05  # status of a starting cluster (one local HTTP GET)
FIO_GRACE_S = 120
FIO_RUNTIME_MIN_S = 0.1
QEMU_NBD_MAX_CLIENTS = 8
LOG_TAIL_LINES = 15
FIO_ERROR_CHARS = 800
BASELINE_SERVER = "qemu-nbd"
TARGET_RATIO = 1.0
TARGET_JOBS = ("randwrite-4k-qd16", "write-1m-qd8")  # rblock serve >= qemu-nbd (issue 1)
# Issue 13: rblock serve >= nbdkit file on these (when nbdkit ran), paired per repetition.
NBDKIT_SERVER = "nbdkit"
NBDKIT_TARGET_JOBS = ("randwrite-4k-qd1", "randwrite-4k-qd16", "write-1m-qd8")
PREFILL_BLOCK_SIZE = "1M"
PREFILL_IODEPTH = 8
BYTES_PER_MB = 1_000_000
NS_PER_US = 1_000
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
REQUIRED_TOOLS = ("fio", "nbdinfo")
SERVER_TOOLS = {"qemu-nbd": "qemu-nbd", "nbdkit": "nbdkit", "nbdkit-python": "nbdkit"}
# nbdkit's python plugin running this file: what a Python developer would write first.
NBDKIT_PYTHON_PLUGIN = Path(__file__).resolve().parent / "nbdkit_file_plugin.py"
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Job:
    """One fio workload; `section` is the key of its figures in fio's JSON."""

    name: str
    rw: str
    block_size: str
    iodepth: int
    section: str
    needs_prefill: bool = False


JOBS = (
    Job("randwrite-4k-qd1", "randwrite", "4k", 1, "write"),
    Job("randwrite-4k-qd16", "randwrite", "4k", 16, "write"),
    Job("randread-4k-qd16", "randread", "4k", 16, "read", needs_prefill=True),
    Job("write-1m-qd8", "write", "1M", 8, "write"),
)
JOBS_BY_NAME = {job.name: job for job in JOBS}
# rblock-c / rblock-a: a two-node replicated resource (protocol C / A) on loopback, measured
# through the primary's NBD export; compared with "rblock" (rblock serve, no replication).
# rblock-c-netns: rblock-c with each node in a network namespace of its own (NetHosts,
# tools/netns_hosts.py), the peer link over a real veth pair and bridge (MTU 1500), fio in
# alpha's namespace dialing alpha's NBD export on that namespace's loopback.
# rblock-c-fenced: rblock-c with fencing = "etcd" (a one-member etcd started for it): the
# steady-state cost of fencing, which touches etcd only on state changes. Not run by default.
# NAME-nopoll: rblock serve / rblock-c with the busy poll before sleeping off (serve
# --idle-poll-us 0, idle_poll_us = 0 on both nodes; rblock/aio.py IdlePoller). Not default.
SERVERS = ("rblock", "qemu-nbd", "nbdkit", "nbdkit-python", "rblock-c", "rblock-a",
           "rblock-c-netns", "rblock-c-fenced", "rblock-nopoll", "rblock-c-nopoll")
DEFAULT_SERVERS = SERVERS[:7]
REPLICATED = {"rblock-c": "C", "rblock-a": "A", "rblock-c-netns": "C", "rblock-c-fenced": "C"}
NOPOLL_SUFFIX = "-nopoll"
NETNS_SERVERS = ("rblock-c-netns",)
REPLICATED_BASELINE = "rblock"
# Issue 13: protocol C >= qemu-nbd (an unreplicated server) in every repetition on these;
# its IOPS ratio to rblock serve is shown beside.
REPLICATED_TARGET_RATIO = 1.0
REPLICATED_TARGET_JOBS = ("randwrite-4k-qd16", "write-1m-qd8")
# ... and at QD1, fio's mean latency (submission to completion: the round trip; its clat
# percentiles are not one for this engine at QD1) at most rblock serve's plus one loopback
# round trip plus this.
QD1_LATENCY_JOB = "randwrite-4k-qd1"
QD1_LATENCY_MARGIN_US = 20.0
CLUSTER_READY_TIMEOUT_S = 120.0
BASE_SUFFIX = "-base"  # a server run from --base-tree
base_tree: Path | None = None  # --base-tree, set by main()
JOB_NAME_WIDTH = max(len(job.name) for job in JOBS)


def kind_of(server: str) -> str:
    """The server NAME-base is a twin of: NAME (run from another tree); for NAME-nopoll
    (NAME without the idle poll), NAME."""
    return server.removesuffix(BASE_SUFFIX).removesuffix(NOPOLL_SUFFIX)


def polls(server: str) -> bool:
    """False for NAME-nopoll: rblock with the busy poll before sleeping turned off."""
    return not server.removesuffix(BASE_SUFFIX).endswith(NOPOLL_SUFFIX)


def tree_of(server: str) -> Path:
    """The checkout whose rblock SERVER runs."""
    if server.endswith(BASE_SUFFIX):
        assert base_tree is not None, "twins exist only with --base-tree"
        return base_tree
    return REPO_ROOT


def tree_env(server: str) -> dict[str, str]:
    """The environment of SERVER's rblock processes: its tree first on the module path."""
    return {**os.environ, "PYTHONPATH": str(tree_of(server))}


@dataclass
class RunResult:
    job: str
    server: str
    repetition: int
    iops: float = 0.0
    bw_bytes: float = 0.0
    clat_p50_ns: float = 0.0
    clat_p99_ns: float = 0.0
    lat_mean_ns: float = 0.0  # fio's lat: submission to completion, mean
    duration_s: float = 0.0
    fio_command: str = ""
    error: str | None = None
    warning: str | None = None


@dataclass
class Summary:
    job: str
    server: str
    runs_ok: int
    iops: float
    bw_bytes: float
    clat_p50_ns: float
    clat_p99_ns: float
    ratio_to_baseline: float | None
    ratio_to_serve: float | None = None  # replicated servers: IOPS / rblock serve's
    serve_p50_ns: float | None = None
    ratio_to_base: float | None = None  # with --base-tree: IOPS / its NAME-base twin's
    lat_mean_ns: float = 0.0
    serve_lat_ns: float | None = None  # replicated servers: rblock serve's lat_mean_ns
    ratio_to_nbdkit: float | None = None  # IOPS / nbdkit's, paired per repetition
    min_ratio_to_baseline: float | None = None  # the lowest per-repetition ratio


@dataclass
class RunningServer:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    uri: str
    client_prefix: list[str] = field(default_factory=list)  # run clients (fio) through this


class BenchError(Exception):
    """A server or fio failed; the message says which and why."""


# --------------------------------------------------------------------------- options


def parse_size(text: str) -> int:
    """'1G' -> 1073741824 (binary suffixes K, M, G, T; an optional trailing 'B'/'iB')."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in SIZE_SUFFIXES else ""
    number = value[: len(value) - len(suffix)]
    try:
        size_bytes = int(float(number) * SIZE_SUFFIXES[suffix])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from exc
    if size_bytes <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size_bytes


def parse_subset(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or text!r}; choose from {','.join(choices)}"
            )
        return [name for name in choices if name in names]

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="fio (ioengine=nbd) comparison of rblock serve, qemu-nbd and nbdkit file",
    )
    parser.add_argument("--runtime-s", type=float, default=None,
                        help=f"seconds per fio run (default {DEFAULT_RUNTIME_S}, "
                             f"{QUICK_RUNTIME_S} with --quick)")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions per job (default 1)")
    parser.add_argument("--size", type=parse_size, default=None,
                        help=f"image size, e.g. 512M, 1G (default {DEFAULT_SIZE}, "
                             f"{QUICK_SIZE} with --quick)")
    parser.add_argument("--jobs", type=parse_subset([job.name for job in JOBS]),
                        default=[job.name for job in JOBS],
                        help="comma-separated subset of: " + ",".join(JOBS_BY_NAME))
    parser.add_argument("--servers", type=parse_subset(SERVERS), default=list(DEFAULT_SERVERS),
                        help="comma-separated subset of: " + ",".join(SERVERS))
    parser.add_argument("--json", type=Path, metavar="OUT",
                        help="also write machine info, raw runs and summary as JSON")
    parser.add_argument("--workdir", type=Path,
                        help="where images and server logs go (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_RUNTIME_S} s per run, {QUICK_SIZE} images, "
                             f"prefill through the measured server")
    parser.add_argument("--base-tree", type=Path, metavar="DIR",
                        help="also run each rblock server from this checkout (NAME-base), "
                             "for a before/after comparison")
    args = parser.parse_args(argv)
    if args.base_tree is not None:
        args.base_tree = args.base_tree.resolve()
        if not (args.base_tree / "rblock" / "__main__.py").is_file():
            parser.error(f"--base-tree {args.base_tree}: no rblock/__main__.py there; give a "
                         f"checkout of this project (git worktree add DIR COMMIT)")
        args.servers = [twin for s in args.servers
                        for twin in ([s, s + BASE_SUFFIX] if s.startswith("rblock") else [s])]
    if args.runtime_s is None:
        args.runtime_s = QUICK_RUNTIME_S if args.quick else DEFAULT_RUNTIME_S
    if args.size is None:
        args.size = parse_size(QUICK_SIZE if args.quick else DEFAULT_SIZE)
    if args.runtime_s < FIO_RUNTIME_MIN_S or args.repeat < 1:
        parser.error(f"--runtime-s must be >= {FIO_RUNTIME_MIN_S}, --repeat >= 1")
    return args


# --------------------------------------------------------------------------- machine


def first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unavailable"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / (1 << 30)
    return 0.0


def machine_info() -> dict[str, str]:
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{memory_gib():.0f} GiB",
        "kernel": platform.release(),
        "loadavg": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "python": platform.python_version(),
        "fio": first_line(["fio", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "rblock": git_describe(REPO_ROOT),
        **({"rblock-base": git_describe(base_tree)} if base_tree is not None else {}),
    }


def git_describe(tree: Path) -> str:
    """The commit TREE is checked out at (with -dirty if it has changes)."""
    if not (tree / ".git").exists():
        return "unknown (not a git checkout)"
    return first_line(["git", "-C", str(tree), "describe", "--always", "--dirty"])


def print_header(info: dict[str, str], args: argparse.Namespace, workdir: Path) -> None:
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}, "
          f"kernel {info['kernel']}, loadavg {info['loadavg']}")
    print(f"tools:   {info['fio']}; {info['qemu-nbd']}; {info['nbdkit']}; "
          f"python {info['python']}; rblock git {info['rblock']}"
          + (f"; *{BASE_SUFFIX} from {base_tree} git {info['rblock-base']}"
             if base_tree is not None else ""))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"setup:   image {args.size} bytes (fresh sparse file per run), "
          f"runtime {args.runtime_s} s, repeat {args.repeat}, workdir {workdir}")
    print(f"fio:     {shlex.join(fio_command(JOBS_BY_NAME[args.jobs[0]], 'URI', args))}")
    print(flush=True)


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_command(server: str, image: Path, port: int) -> list[str]:
    if kind_of(server) == "rblock":
        return [sys.executable, "-m", "rblock", "serve", str(image),
                "--listen", f"{HOST}:{port}", "--export", EXPORT_NAME,
                *([] if polls(server) else ["--idle-poll-us", "0"])]
    if server == "qemu-nbd":
        # Foreground child so we know its PID; -t persistent, -e several clients.
        return ["qemu-nbd", "-f", "raw", "-t", "-e", str(QEMU_NBD_MAX_CLIENTS),
                "-b", HOST, "-p", str(port), "-x", EXPORT_NAME, str(image)]
    if server == "nbdkit":
        return ["nbdkit", "-f", "-i", HOST, "-p", str(port), "-e", EXPORT_NAME,
                "file", str(image)]
    if server == "nbdkit-python":
        return ["nbdkit", "-f", "-i", HOST, "-p", str(port), "-e", EXPORT_NAME,
                "python", str(NBDKIT_PYTHON_PLUGIN), f"file={image}"]
    raise ValueError(f"unknown server {server!r}")


def log_tail(log_path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = log_path.read_text(errors="replace").strip().splitlines()
        if lines:
            return "\n    ".join(["server log tail:", *lines[-LOG_TAIL_LINES:]])
    return "(server log empty)"


def probe_size(uri: str, prefix: Sequence[str] = ()) -> int | None:
    """The export size if an NBD handshake with `uri` succeeds, else None."""
    try:
        done = subprocess.run([*prefix, "nbdinfo", "--size", uri], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    try:
        return int(done.stdout.strip())
    except ValueError:
        return None


def wait_until_serving(server: RunningServer, size_bytes: int) -> None:
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"{server.name} exited with status {server.process.returncode} "
                             f"before serving\n    {log_tail(server.log_path)}")
        size = probe_size(server.uri, server.client_prefix)
        if size is not None:
            if size != size_bytes:
                raise BenchError(f"{server.name} reports size {size}, expected {size_bytes}")
            return
        time.sleep(PROBE_INTERVAL_S)
    raise BenchError(f"{server.name} not serving {server.uri} after {SERVER_READY_TIMEOUT_S} s"
                     f"\n    {log_tail(server.log_path)}")


def stop_server(server: RunningServer) -> None:
    """SIGTERM by PID, wait, then SIGKILL if it lingers."""
    process = server.process
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"  warning: {server.name} (pid {process.pid}) ignored SIGTERM; killing",
              file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


CLUSTER_NODES = ("alpha", "beta")


def cluster_config(directory: Path, protocol: str, size_bytes: int,
                   etcd: str = "", hosts: dict[str, str] | None = None,
                   idle_poll_us: int | None = None) -> Path:
    """HOSTS: node -> the address of its replication and control endpoints (its network
    namespace's); by default every endpoint is on HOST. NBD is always on the loopback (of
    the node's namespace): the client runs beside the primary, as QEMU does. IDLE_POLL_US:
    the nodes' idle_poll_us, if not their default."""
    ports = [free_port() for _ in range(3 * len(CLUSTER_NODES))]
    text = (f'[cluster]\netcd = ["{etcd}"]\n\n' if etcd else "")
    text += (f'[resource.{EXPORT_NAME}]\nsize = {size_bytes}\nprotocol = "{protocol}"\n'
            f'secret = "bench"\nresync_rate = "4G"\n')
    for i, node in enumerate(CLUSTER_NODES):
        rp, cp, np_ = ports[3 * i:3 * i + 3]
        address = (hosts or {}).get(node, HOST)
        text += (f'[node.{node}]\nreplication = "{address}:{rp}"\n'
                 f'control = "{address}:{cp}"\nnbd = "{HOST}:{np_}"\n'
                 + (f"idle_poll_us = {idle_poll_us}\n" if idle_poll_us is not None else "")
                 + f'[node.{node}.disk]\n{EXPORT_NAME} = "{node}.img"\n')
    path = directory / "cluster.toml"
    path.write_text(text)
    return path


def node_address(config: Path, node: str, key: str) -> tuple[str, int]:
    """(host, port) of NODE's KEY ("control", "nbd", ...) in the cluster file."""
    host, _, port = tomllib.loads(config.read_text())["node"][node][key].rpartition(":")
    return host, int(port)


def cluster_status(config: Path, node: str) -> dict:
    """The resource's entry of NODE's GET /v1/status (what `rblock status --json` prints),
    asked directly: a CLI process per poll costs 0.2-0.5 s of a starting cluster's time."""
    host, port = node_address(config, node, "control")
    url = f"http://{host}:{port}/v1/status"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as answer:
            return json.loads(answer.read())["resources"][0]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"GET {url}: {exc}") from exc


def promote(config: Path, node: str, force: bool) -> None:
    """POST /v1/resources/bench/primary to NODE: what `rblock primary bench [--force]`
    sends, without a CLI process (0.2 s) per cluster start."""
    host, port = node_address(config, node, "control")
    url = f"http://{host}:{port}/v1/resources/{EXPORT_NAME}/primary"
    request = urllib.request.Request(url, data=json.dumps({"force": force}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=SERVER_READY_TIMEOUT_S) as answer:
            json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        raise BenchError(f"{node}: primary {EXPORT_NAME} refused: "
                         f"{exc.read().decode(errors='replace')}") from exc
    except (OSError, ValueError) as exc:
        raise BenchError(f"POST {url}: {exc}") from exc


def create_metadata(config: Path, server: str) -> None:
    """`rblock create-md` for every node, at the same time."""
    procs = [subprocess.Popen([sys.executable, "-m", "rblock", "create-md", "--config",
                               str(config), "--node", node], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tree_of(server), env=tree_env(server))
             for node in CLUSTER_NODES]
    failures = []
    for node, proc in zip(CLUSTER_NODES, procs, strict=True):
        try:
            _, stderr = proc.communicate(timeout=SERVER_READY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"rblock create-md on {node} failed: {stderr.strip()}")
    if failures:
        raise BenchError("; ".join(failures))


# --------------------------------------------------------------------------- netns hosts

_net_hosts = None  # the NetHosts every rblock-c-netns run shares; started on first use


def net_hosts():
    """One network namespace per cluster node, on a bridge (tools/netns_hosts.py), made
    once per benchmark process and removed at its exit (stop_net_hosts, also atexit)."""
    global _net_hosts
    if _net_hosts is None:
        from tools.netns_hosts import NetHosts, NetHostsError, NetHostsUnavailable

        hosts = NetHosts(CLUSTER_NODES)
        try:
            hosts.start()
        except (NetHostsError, NetHostsUnavailable) as exc:
            raise BenchError(f"network namespaces: {exc}") from exc
        _net_hosts = hosts
        atexit.register(stop_net_hosts)
    return _net_hosts


def stop_net_hosts() -> None:
    global _net_hosts
    if _net_hosts is not None:
        hosts, _net_hosts = _net_hosts, None
        hosts.stop()


@contextlib.contextmanager
def serving_replicated(server: str, directory: Path, log_path: Path,
                       size_bytes: int) -> Iterator[RunningServer]:
    """A two-node cluster in DIRECTORY (created fresh if empty): both nodes up, alpha
    Primary, resync done; the primary's export is what fio measures."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "cluster.toml"
    fresh = not config.exists()
    net = net_hosts() if kind_of(server) in NETNS_SERVERS else None
    etcd = None
    if kind_of(server) == "rblock-c-fenced":
        etcd, etcd_url = start_etcd(directory, log_path)
    if fresh:
        config = cluster_config(directory, REPLICATED[kind_of(server)], size_bytes,
                                etcd_url if etcd is not None else "",
                                {n: net[n].address for n in CLUSTER_NODES} if net else None,
                                None if polls(server) else 0)
        create_metadata(config, server)
    procs = []
    for node in CLUSTER_NODES:
        argv = [sys.executable, "-m", "rblock", "up", "--config", str(config), "--node", node]
        if net is not None:
            procs.append(net[node].popen(argv, log_path, cwd=tree_of(server),
                                         env=tree_env(server)))
            continue
        with open(log_path, "ab") as log:
            procs.append(subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=tree_of(server), env=tree_env(server), start_new_session=True))
    _, port = node_address(config, "alpha", "nbd")
    running = RunningServer(server, procs[0], log_path, f"nbd://{HOST}:{port}/{EXPORT_NAME}",
                            net["alpha"].argv([]) if net is not None else [])
    peer = RunningServer(server, procs[1], log_path, "")
    try:
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
        promoted = False
        while True:
            if time.monotonic() > deadline:
                raise BenchError(f"{server}: cluster not in sync after "
                                 f"{CLUSTER_READY_TIMEOUT_S} s\n    {log_tail(log_path)}")
            for p in procs:
                if p.poll() is not None:
                    raise BenchError(f"{server}: a node exited with status {p.returncode}"
                                     f"\n    {log_tail(log_path)}")
            try:
                st = cluster_status(config, "alpha")
            except BenchError:
                time.sleep(CLUSTER_POLL_INTERVAL_S)
                continue
            peer_st = st["peers"][0]
            if not promoted and peer_st["connection"] == "Connected":
                promote(config, "alpha", force=fresh)
                promoted = True
            elif (promoted and peer_st["replication"] == "Established"
                  and peer_st["disk"] == "UpToDate"):
                break
            time.sleep(CLUSTER_POLL_INTERVAL_S)
        wait_until_serving(running, size_bytes)
        yield running
    finally:
        stop_server(running)
        stop_server(peer)
        if etcd is not None:
            stop_server(RunningServer("etcd", etcd, log_path, ""))


def start_etcd(directory: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A one-member etcd with its data in DIRECTORY; (process, client URL)."""
    argv, url = etcd_local.member_argv("bench", directory / "etcd")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    if etcd_local.wait_healthy(proc, url, SERVER_READY_TIMEOUT_S):
        return proc, url
    stop_server(RunningServer("etcd", proc, log_path, ""))
    raise BenchError(f"etcd not healthy after {SERVER_READY_TIMEOUT_S} s\n    "
                     f"{log_tail(log_path)}")


@contextlib.contextmanager
def serving(server: str, image: Path, log_path: Path, size_bytes: int) -> Iterator[RunningServer]:
    """Start `server` on `image`, wait until it answers, and always stop it afterwards."""
    if kind_of(server) in REPLICATED:
        with serving_replicated(server, image, log_path, size_bytes) as running:
            yield running
        return
    port = free_port()
    with open(log_path, "ab") as log:
        # Own session: Ctrl-C reaches only us, and we stop the server ourselves.
        process = subprocess.Popen(server_command(server, image, port), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tree_of(server),
                                   env=tree_env(server), start_new_session=True)
    running = RunningServer(server, process, log_path, f"nbd://{HOST}:{port}/{EXPORT_NAME}")
    try:
        wait_until_serving(running, size_bytes)
        yield running
    finally:
        stop_server(running)


# --------------------------------------------------------------------------- fio


def fio_command(job: Job, uri: str, args: argparse.Namespace) -> list[str]:
    return ["fio", f"--name={job.name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
            f"--bs={job.block_size}", f"--iodepth={job.iodepth}", f"--size={args.size}",
            "--time_based", f"--runtime={fio_runtime(args.runtime_s)}", "--output-format=json"]


def fio_runtime(runtime_s: float) -> str:
    """fio's --runtime: whole seconds as they are (10), else milliseconds (500ms)."""
    return str(int(runtime_s)) if runtime_s == int(runtime_s) else f"{round(runtime_s * 1000)}ms"


def prefill_command(uri: str, size_bytes: int) -> list[str]:
    """Write the whole export once (fio's default buffers are random, not zero)."""
    return ["fio", "--name=prefill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
            f"--bs={PREFILL_BLOCK_SIZE}", f"--iodepth={PREFILL_IODEPTH}", f"--size={size_bytes}",
            "--output-format=json"]


def run_fio(command: list[str], timeout_s: float) -> dict:
    """Run fio; return jobs[0] of its JSON (text before the first '{' line is dropped)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"fio timed out after {timeout_s:.0f} s") from exc
    lines = done.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("{")), None)
    if done.returncode != 0 or start is None:
        preamble = "\n".join(lines[:start]).strip()
        detail = (done.stderr.strip() or preamble or "no error text")[-FIO_ERROR_CHARS:]
        raise BenchError(f"fio exited with status {done.returncode}: {detail}")
    try:
        fio_job = json.loads("\n".join(lines[start:]))["jobs"][0]
    except (json.JSONDecodeError, KeyError, IndexError) as exc:
        raise BenchError(f"cannot parse fio JSON: {exc}") from exc
    if fio_job.get("error"):
        detail = done.stderr.strip()[-FIO_ERROR_CHARS:]
        raise BenchError(f"fio job error {fio_job['error']}: {detail}")
    return fio_job


def fill_result(result: RunResult, job: Job, fio_job: dict) -> None:
    section = fio_job[job.section]
    percentiles = section["clat_ns"].get("percentile", {})
    result.iops = float(section["iops"])
    result.bw_bytes = float(section["bw_bytes"])
    result.clat_p50_ns = float(percentiles.get("50.000000", 0.0))
    result.clat_p99_ns = float(percentiles.get("99.000000", 0.0))
    result.lat_mean_ns = float(section["lat_ns"]["mean"])
    if result.iops <= 0:
        raise BenchError(f"fio completed no {job.section}s")


# --------------------------------------------------------------------------- runs


def fresh_image(path: Path, size_bytes: int) -> None:
    remove_image(path)
    if path.suffix == ".cluster":
        return  # serving_replicated creates the disks and metadata
    with open(path, "wb") as image:
        image.truncate(size_bytes)


def remove_image(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_one(job: Job, server: str, repetition: int, args: argparse.Namespace,
            workdir: Path) -> RunResult:
    """Fresh image (prefilled through a first server instance if the job reads), fresh server."""
    result = RunResult(job.name, server, repetition)
    image = workdir / (f"{server}.cluster" if kind_of(server) in REPLICATED
                       else f"{server}.img")
    log_path = workdir / f"{job.name}.r{repetition}.{server}.log"
    fio_timeout_s = args.runtime_s + FIO_GRACE_S
    started = time.monotonic()
    try:
        fresh_image(image, args.size)
        if job.needs_prefill and not args.quick:
            with serving(server, image, log_path, args.size) as running:
                run_fio([*running.client_prefix, *prefill_command(running.uri, args.size)],
                        fio_timeout_s)
        with serving(server, image, log_path, args.size) as running:
            if job.needs_prefill and args.quick:  # one server start fewer
                run_fio([*running.client_prefix, *prefill_command(running.uri, args.size)],
                        fio_timeout_s)
            command = [*running.client_prefix, *fio_command(job, running.uri, args)]
            result.fio_command = shlex.join(command)
            fill_result(result, job, run_fio(command, fio_timeout_s))
            if running.process.poll() is not None:
                raise BenchError(f"{server} exited with status {running.process.returncode} "
                                 f"during fio\n    {log_tail(log_path)}")
    except BenchError as exc:
        result.error = str(exc)
    finally:
        remove_image(image)
        result.duration_s = time.monotonic() - started
    if not result.error and log_mentions_traceback(log_path):
        result.warning = f"{server} logged a traceback\n    {log_tail(log_path)}"
    return result


def log_mentions_traceback(log_path: Path) -> bool:
    with contextlib.suppress(OSError):
        return "Traceback" in log_path.read_text(errors="replace")
    return False


def server_order(servers: Sequence[str], repetition: int) -> list[str]:
    """Rotate the start position each repetition so no server always runs first, and run
    every other repetition backwards so no server always runs right after the same one (a
    run can leave work behind for the next: the page cache's writeback of its image)."""
    shift = repetition % len(servers)
    order = [*servers[shift:], *servers[:shift]]
    return order[::-1] if repetition % 2 else order


def describe(result: RunResult) -> str:
    if result.error:
        return f"FAILED: {result.error}"
    figures = (f"{result.iops:9.0f} IOPS {result.bw_bytes / BYTES_PER_MB:8.1f} MB/s "
               f"p50 {format_us(result.clat_p50_ns)} us p99 {format_us(result.clat_p99_ns)} us")
    return f"{figures}\n  warning: {result.warning}" if result.warning else figures


def run_all(args: argparse.Namespace, workdir: Path, results: list[RunResult]) -> None:
    total = len(args.jobs) * args.repeat * len(args.servers)
    for job_name in args.jobs:
        job = JOBS_BY_NAME[job_name]
        for repetition in range(args.repeat):
            for server in server_order(args.servers, repetition):
                print(f"[{len(results) + 1}/{total}] {job.name:{JOB_NAME_WIDTH}s} "
                      f"rep {repetition + 1} {server:8s} ", end="", flush=True)
                result = run_one(job, server, repetition, args, workdir)
                results.append(result)
                print(describe(result), flush=True)


# --------------------------------------------------------------------------- report


def paired_ratios(ok: list[RunResult], baseline: list[RunResult]) -> list[float]:
    """IOPS / baseline IOPS in the same repetition, per repetition."""
    base_by_rep = {result.repetition: result.iops for result in baseline}
    return [result.iops / base_by_rep[result.repetition]
            for result in ok if base_by_rep.get(result.repetition)]


def paired_ratio(ok: list[RunResult], baseline: list[RunResult]) -> float | None:
    """Median over repetitions of IOPS / baseline IOPS in the same repetition."""
    ratios = paired_ratios(ok, baseline)
    return statistics.median(ratios) if ratios else None


def summarize(results: list[RunResult], args: argparse.Namespace) -> list[Summary]:
    summaries = []
    for job_name in args.jobs:
        baseline = [r for r in results
                    if r.job == job_name and r.server == BASELINE_SERVER and not r.error]
        for server in args.servers:
            runs = [r for r in results if r.job == job_name and r.server == server]
            if not runs:
                continue
            ok = [r for r in runs if not r.error]
            twin = server[len(kind_of(server)):]  # "" or BASE_SUFFIX: compare like with like
            serve = [r for r in results if r.job == job_name
                     and r.server == REPLICATED_BASELINE + twin and not r.error]
            base = [r for r in results if r.job == job_name
                    and r.server == server + BASE_SUFFIX and not r.error]
            nbdkit = [r for r in results if r.job == job_name
                      and r.server == NBDKIT_SERVER and not r.error]
            to_baseline = paired_ratios(ok, baseline)
            summaries.append(Summary(
                job=job_name, server=server, runs_ok=len(ok),
                iops=median_of(ok, "iops"), bw_bytes=median_of(ok, "bw_bytes"),
                clat_p50_ns=median_of(ok, "clat_p50_ns"), clat_p99_ns=median_of(ok, "clat_p99_ns"),
                ratio_to_baseline=paired_ratio(ok, baseline),
                ratio_to_serve=(paired_ratio(ok, serve) if kind_of(server) in REPLICATED
                                else None),
                serve_p50_ns=median_of(serve, "clat_p50_ns") if serve else None,
                ratio_to_base=paired_ratio(ok, base) if base else None,
                lat_mean_ns=median_of(ok, "lat_mean_ns"),
                serve_lat_ns=median_of(serve, "lat_mean_ns") if serve else None,
                ratio_to_nbdkit=paired_ratio(ok, nbdkit) if nbdkit else None,
                min_ratio_to_baseline=min(to_baseline) if to_baseline else None,
            ))
    return summaries


def median_of(results: list[RunResult], attribute: str) -> float:
    values = [getattr(result, attribute) for result in results]
    return statistics.median(values) if values else 0.0


def format_us(value_ns: float) -> str:
    value_us = value_ns / NS_PER_US
    return f"{value_us:.1f}" if value_us < 100 else f"{value_us:.0f}"


def loopback_rtt_us(samples: int = 2000) -> float:
    """Median round trip of a 64-byte message over a loopback TCP connection (Python)."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(samples):
                t0 = time.perf_counter()
                client.sendall(b"x" * 64)
                server.recv(64)
                server.sendall(b"y" * 64)
                client.recv(64)
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def replicated_mark(summary: Summary, rtt_us: float) -> str:
    if summary.job == QD1_LATENCY_JOB and summary.serve_lat_ns:
        extra_us = (summary.lat_mean_ns - summary.serve_lat_ns) / NS_PER_US
        limit_us = rtt_us + QD1_LATENCY_MARGIN_US
        verdict = "PASS" if extra_us <= limit_us else "MISS"
        return f"{verdict} (lat {extra_us:+.0f} us <= {limit_us:.0f} us)"
    serve = "" if summary.ratio_to_serve is None else f"{summary.ratio_to_serve:.2f}x serve"
    if summary.job in REPLICATED_TARGET_JOBS and summary.min_ratio_to_baseline is not None \
            and summary.server.startswith("rblock-c") and not summary.server.startswith(
                "rblock-c-fenced"):
        low = summary.min_ratio_to_baseline
        verdict = "PASS" if low >= REPLICATED_TARGET_RATIO else "MISS"
        return (f"{verdict} (min {low:.2f}x {BASELINE_SERVER} >= {REPLICATED_TARGET_RATIO}x)"
                + (f"; {serve}" if serve else ""))
    return serve


def target_mark(summary: Summary, rtt_us: float = 0.0) -> str:
    mark = _target_mark(summary, rtt_us)
    if summary.ratio_to_base is None:
        return mark
    return f"{mark}; {summary.ratio_to_base:.2f}x base" if mark else \
        f"{summary.ratio_to_base:.2f}x base"


def _target_mark(summary: Summary, rtt_us: float) -> str:
    if kind_of(summary.server) in REPLICATED:
        return replicated_mark(summary, rtt_us)
    if kind_of(summary.server) != "rblock":
        return ""
    if summary.runs_ok == 0:
        return "MISS (no result)"
    if summary.ratio_to_nbdkit is not None and summary.job in NBDKIT_TARGET_JOBS:
        verdict = "PASS" if summary.ratio_to_nbdkit >= TARGET_RATIO else "MISS"
        return f"{verdict} ({summary.ratio_to_nbdkit:.2f}x {NBDKIT_SERVER} >= {TARGET_RATIO:.1f}x)"
    if summary.job not in TARGET_JOBS:
        return ""
    if summary.ratio_to_baseline is None:
        return "n/a"
    verdict = "PASS" if summary.ratio_to_baseline >= TARGET_RATIO else "MISS"
    return f"{verdict} (>= {TARGET_RATIO:.1f}x)"


def table_rows(summaries: list[Summary], repeat: int, rtt_us: float) -> list[list[str]]:
    rows = []
    for s in summaries:
        if s.runs_ok == 0:
            rows.append([s.job, s.server, "FAILED", "", "", "", "", "",
                         target_mark(s, rtt_us)])
            continue
        ratio = "n/a" if s.ratio_to_baseline is None else f"{s.ratio_to_baseline:.2f}x"
        runs = "" if s.runs_ok == repeat else f" ({s.runs_ok}/{repeat} ok)"
        rows.append([s.job, s.server + runs, f"{s.iops:.0f}", f"{s.bw_bytes / BYTES_PER_MB:.1f}",
                     format_us(s.lat_mean_ns), format_us(s.clat_p50_ns),
                     format_us(s.clat_p99_ns), ratio, target_mark(s, rtt_us)])
    return rows


def print_table(summaries: list[Summary], repeat: int, rtt_us: float) -> None:
    header = ["job", "server", "IOPS", "MB/s", "lat us", "p50 us", "p99 us",
              f"vs {BASELINE_SERVER}", "target"]
    rows = table_rows(summaries, repeat, rtt_us)
    if not rows:
        print("\nno runs completed")
        return
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left_aligned = {0, 1, 8}

    def line(cells: list[str]) -> str:
        padded = [cell.ljust(width) if i in left_aligned else cell.rjust(width)
                  for i, (cell, width) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded).rstrip()

    print(f"\nmedians over {repeat} repetition(s); lat = fio's mean latency (submission to "
          f"completion), p50/p99 = its completion latency (clat) percentiles; "
          f"MB/s = 10^6 bytes/s; loopback round trip {rtt_us:.0f} us")
    print(line(header))
    print(line(["-" * width for width in widths]))
    previous_job = None
    for row in rows:
        if previous_job is not None and row[0] != previous_job:
            print()
        previous_job = row[0]
        print(line(row))


def write_json(path: Path, info: dict[str, str], args: argparse.Namespace,
               results: list[RunResult], summaries: list[Summary]) -> None:
    document = {
        "machine": info,
        "command": shlex.join([sys.executable, *sys.argv]),
        "settings": {"runtime_s": args.runtime_s, "repeat": args.repeat,
                     "image_size_bytes": args.size, "jobs": args.jobs, "servers": args.servers,
                     "base_tree": str(base_tree) if base_tree is not None else None},
        "runs": [asdict(result) for result in results],
        "summary": [asdict(summary) for summary in summaries],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def missing_tools(servers: Sequence[str]) -> list[str]:
    """What SERVERS need and this machine lacks, each naming the fix."""
    tools = dict.fromkeys([*REQUIRED_TOOLS,
                           *(SERVER_TOOLS[s] for s in servers if s in SERVER_TOOLS)])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if "nbdkit-python" in servers and "nbdkit" not in missing and subprocess.run(
            ["nbdkit", "--dump-plugin", "python"], capture_output=True,
            timeout=PROBE_TIMEOUT_S, check=False).returncode != 0:
        missing.append("nbdkit's python plugin (Debian package nbdkit-plugin-python)")
    if any(kind_of(s) in NETNS_SERVERS for s in servers):
        from tools.netns_hosts import NetHostsUnavailable, check_requirements

        try:
            check_requirements()
        except NetHostsUnavailable as exc:
            missing.append(f"network namespaces for rblock-c-netns: {exc}")
    return missing


@contextlib.contextmanager
def work_directory(requested: Path | None) -> Iterator[Path]:
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        yield requested.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="rblock-bench-") as temporary:
        yield Path(temporary)


def main(argv: Sequence[str] | None = None) -> int:
    global base_tree
    args = parse_args(argv)
    base_tree = args.base_tree
    missing = missing_tools(args.servers)
    if missing:
        print(f"missing: {'; '.join(missing)} (run `make deps`)", file=sys.stderr)
        return EXIT_RUN_FAILED
    info = machine_info()
    results: list[RunResult] = []
    interrupted = False
    with work_directory(args.workdir) as workdir:
        print_header(info, args, workdir)
        try:
            run_all(args, workdir, results)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted; servers stopped; partial results follow", file=sys.stderr)
        finally:
            stop_net_hosts()
    summaries = summarize(results, args)
    print_table(summaries, args.repeat, loopback_rtt_us())
    if args.json:
        write_json(args.json, info, args, results, summaries)
        print(f"\nraw results: {args.json}")
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_RUN_FAILED if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
