"""`rblock up`: one node's daemon. Wiring only: config, resources, listeners, signals.

A node serves, for every resource it holds a disk for:
- NBD on its `nbd` address, export name = resource name, only while the resource is Primary
  here (a client of a Secondary is refused with a message naming the primary);
- the peer link on its `replication` address; of the two nodes of a resource, the one whose
  name sorts first dials (with backoff), the other accepts; for a resource with `tls = true`
  both ends run it in TLS with the node's `tls_cert`/`tls_key`, checking the peer against
  `tls_ca` (rblock/replica/link.py);
- the control API on its `control` address (rblock/control_server.py), used by the CLI and
  hvctl through rblock/control_client.py.

Why the peer is not connected, for `rblock status`: the dialer tells the resource when a dial
fails (unreachable within DIAL_TIMEOUT_S, or a TLS handshake refused), its links tell it when
they fail before they are up (rblock/replica/link.py), and a connection the listener refused
before it named its resource is put on the Connecting resources whose peer's replication host
is the address it came from.

`adjust()` (`rblock adjust`) reads the config file again and applies to the running resources
what config.RUNTIME_KEYS lists; what else differs from the file is reported as needing a
restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from rblock import tls_files
from rblock.aio import configure_idle_poll
from rblock.config import (
    RUNTIME_KEYS,
    SECRET_HIDDEN,
    ClusterConfig,
    NodeConfig,
    ResourceConfig,
    config_warnings,
    effective,
    load,
)
from rblock.control_server import EventBus, start_control
from rblock.fencer import Fencer
from rblock.nbd import proto as p
from rblock.nbd.handshake import ExportRefused
from rblock.nbd.server import Export, ExportCatalog, NBDServer
from rblock.nbd.stats import RequestStats
from rblock.replica.effects import Event, ResourceError
from rblock.replica.link import (
    AUTH_TIMEOUT_S,
    FAIL_TLS,
    FAIL_UNREACHABLE,
    LinkRefused,
    PeerLink,
    PeerListener,
    PeerTLS,
    TLSFilesError,
    describe_tls_error,
)
from rblock.replica.resource import RUNTIME_FIELDS, Resource
from rblock.replica.state import Conn, Role
from rblock.replica.wire import LinkError
from rblock.store.metadata import Metadata, MetadataError
from rblock.store.victim import snapshot_dir
from rblock.store.volume import FileVolume, create_image
from rblock.units import format_hostport

log = logging.getLogger("rblock.node")

DIAL_BACKOFF_FIRST_S = 0.1
# A dial to a machine that drops the packets (down, or a firewall) gives up after this and
# says so in status, instead of waiting for the kernel's SYN retries (about two minutes).
DIAL_TIMEOUT_S = 10.0
DEFAULT_PING_INTERVAL_S = 1.0
DEFAULT_PEER_TIMEOUT_S = 4.0
EXIT_FAILED, EXIT_CONFIG = 1, 2  # rblock/cli.py's exit codes
_LOOPBACK = ("localhost", "ip6-localhost", "::1")
# ResourceConfig field -> the config key `rblock adjust` names (RUNTIME_KEYS are keys).
_FIELD_KEYS = {"resync_rate_bytes_per_s": "resync_rate"}


class NodeError(Exception):
    """A problem the user can fix; the message says what and how. `exit_code` follows
    rblock/cli.py: 2 when the config (or a file it names) is wrong, 1 when the node could
    not do it here (a port taken, a disk in use, no metadata yet)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def create_md(cfg: ClusterConfig, node_name: str, resources: list[str], force: bool) -> list[str]:
    """Initialise metadata (and a sparse backing file if it is missing) for each resource."""
    node = cfg.node(node_name)
    names = resources or [r.name for r in cfg.resources_of(node_name)]
    done = []
    for name in names:
        res = cfg.resource(name)
        if name not in node.disks:
            raise NodeError(f"node {node_name} has no disk for resource {name}; add "
                            f"[node.{node_name}.disk] {name} = \"PATH\" to {cfg.path}")
        disk = node.disks[name]
        if not disk.exists():
            disk.parent.mkdir(parents=True, exist_ok=True)
            create_image(str(disk), res.size_bytes)
            log.info("created %s (%d bytes, sparse)", disk, res.size_bytes)
        elif disk.is_file() and disk.stat().st_size < res.size_bytes:
            raise NodeError(f"disk {disk} is {disk.stat().st_size} bytes, smaller than "
                            f"resource {name} ({res.size_bytes}); grow it or shrink the resource")
        meta = Metadata.create(str(node.metas[name]), node_name, name, res.size_bytes,
                               force=force)
        meta.close()
        done.append(f"{name}: metadata in {node.metas[name]}, data on {disk}")
    return done


class Node:
    def __init__(self, cfg: ClusterConfig, name: str):
        self.cfg = cfg
        self.name = name
        self.me: NodeConfig = cfg.node(name)
        self.resources: dict[str, Resource] = {}
        self.events = EventBus()
        self.nbd: NBDServer | None = None
        self.tls: PeerTLS | None = None  # set when one of this node's resources has tls = true
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.fencer: Fencer | None = None  # the etcd lease and transactions (fencing = "etcd")

    # --- wiring -----------------------------------------------------------------------------

    def _load_tls(self) -> PeerTLS | None:
        if not any(r.tls for r in self.cfg.resources_of(self.name)):
            return None  # TLS files, if any, stay unread: no resource here uses them
        files = self.me.tls
        assert files is not None, "config.load checks that every node of a TLS resource has them"
        try:
            tls_files.check(files.cert, files.key, files.ca)  # each file, in words
        except tls_files.TLSFileError as e:
            raise NodeError(f"{self.cfg.path}: node.{self.name}.tls_{e.which}: {e}",
                            EXIT_CONFIG) from None
        try:
            return PeerTLS.load(files.cert, files.key, files.ca)  # and a handshake with itself
        except TLSFilesError as e:
            raise NodeError(f"{self.cfg.path}: node.{self.name}.{e.key}: {e}",
                            EXIT_CONFIG) from None

    def _open_resources(self) -> None:
        for res in self.cfg.resources_of(self.name):
            disk = self.me.disks[res.name]
            meta_path = self.me.metas[res.name]
            if not os.path.exists(meta_path):
                raise NodeError(f"no metadata for {res.name} on {self.name} ({meta_path}); run "
                                f"'rblock create-md --config {self.cfg.path} --node {self.name} "
                                f"{res.name}' first")
            volume, meta = self._open_disk(res, disk, meta_path)
            peer = self.cfg.peers(res.name, self.name)[0]
            if res.fencing == "none":
                log.warning("%s: fencing = \"none\": if the link breaks while both nodes "
                            "live, both can be promoted and write; acknowledged writes can be "
                            "lost at failover (README, Fencing)", res.name)
            r = Resource(self.name, res, peer.name, volume, meta, self._emit,
                         fencer=self.fencer.run if self.fencer is not None else None,
                         open_disk=lambda res=res, disk=disk, mp=meta_path:
                         self._reopen_disk(res, disk, mp),
                         open_meta=lambda res=res, mp=meta_path: Metadata.open(
                             str(mp), self.name, res.name, res.size_bytes,
                             al_extents_max=res.al_extents))
            r.nbd_clients = lambda n=res.name: self.nbd_clients(n)
            r.dials = self.name < peer.name  # the rule of _dial_loop's caller in run()
            r.disk_path = Path(disk)
            r.snapshot_dir = snapshot_dir(Path(disk), Path(meta_path))
            if self.fencer is not None:
                r.lease_info = self._lease_info
            self.resources[res.name] = r

    def _on_lease(self, valid: bool) -> None:
        for r in self.resources.values():
            if r.core.fence is not None:
                r.core.lease_changed(valid)

    def _lease_info(self) -> dict:
        f = self.fencer
        assert f is not None
        left = f.deadline - asyncio.get_running_loop().time()
        return {"lease_id": f"{f.lease:x}" if f.lease else None,
                "lease_until": (time.strftime("%H:%M:%S", time.localtime(time.time() + left))
                                if f.lease_valid() else None),
                "lease_left_s": round(left, 1) if f.lease_valid() else None,
                "etcd_error": f.last_error or None}

    def _open_disk(self, res: ResourceConfig, disk: Path, meta_path: Path
                   ) -> tuple[FileVolume, Metadata]:
        """A resource's metadata, then its backing disk, each checked; raises NodeError."""
        try:
            meta = Metadata.open(str(meta_path), self.name, res.name, res.size_bytes,
                                 al_extents_max=res.al_extents)
        except MetadataError as e:
            raise NodeError(str(e)) from None
        try:
            size = _disk_size(disk)
            if size < res.size_bytes:
                raise NodeError(f"disk {disk} of {res.name} is {size} bytes, smaller than the "
                                f"resource ({res.size_bytes} bytes); grow the disk or shrink "
                                f"size in [resource.{res.name}]")
            volume = FileVolume(str(disk))
        except OSError as e:
            meta.close()
            raise NodeError(f"cannot open disk {disk} of {res.name}: {e.strerror}") from None
        except NodeError:
            meta.close()
            raise
        return volume, meta

    def _reopen_disk(self, res: ResourceConfig, disk: Path, meta_path: Path
                     ) -> tuple[FileVolume, Metadata]:
        """`rblock attach`: the disk and metadata opened again; refusals as ResourceError."""
        try:
            return self._open_disk(res, disk, meta_path)
        except NodeError as e:
            raise ResourceError(f"cannot attach {res.name} on {self.name}: {e}") from None

    def _emit(self, ev: Event) -> None:
        level = logging.WARNING if ev.what in ("split-brain",) else logging.INFO
        if ev.what not in ("decision",):
            log.log(level, "%s: %s %s -> %s%s", ev.resource, ev.what, ev.old, ev.new,
                    f" ({ev.detail})" if ev.detail else "")
        self.events.publish(ev.to_json())

    def nbd_clients(self, export: str) -> int:
        if self.nbd is None:
            return 0
        return sum(1 for c in self.nbd.connections if c.export_name == export)

    def request_stats(self, export: str) -> RequestStats | None:
        """What the NBD requests of EXPORT did (None before the NBD server exists)."""
        if self.nbd is None:
            return None
        return self.nbd.catalog.exports[export].stats

    def drop_nbd_clients(self, export: str) -> None:
        if self.nbd is not None:
            for c in list(self.nbd.connections):
                if c.export_name == export:
                    c.abort("resource demoted with --force")

    def _gate(self, export: str) -> None:
        r = self.resources[export]
        if r.role is Role.PRIMARY:
            return
        if r.peer_role is Role.PRIMARY:
            peer = self.cfg.node(r.peer_node)
            raise ExportRefused(
                f"resource {export} is Secondary on {self.name}; its primary is {r.peer_node} "
                f"(nbd://{format_hostport(peer.nbd.host, peer.nbd.port)}/{export})",
                p.REP_ERR_POLICY)
        raise ExportRefused(f"resource {export} is Secondary on {self.name} and no connected "
                            f"node is Primary; run 'rblock primary {export}' on the node that "
                            f"should serve it", p.REP_ERR_POLICY)

    def nbd_uri(self, export: str) -> str:
        return f"nbd://{format_hostport(self.me.nbd.host, self.me.nbd.port)}/{export}"

    # --- peer links ---------------------------------------------------------------------------

    def _route(self, link: PeerLink, hello: dict) -> tuple[Resource, str, str]:
        """Acceptor side: which resource an incoming link is for, checked against the config."""
        name, peer = str(hello["resource"]), str(hello["node"])
        r = self.resources.get(name)
        if r is None:
            raise LinkError(f"resource {name} is not configured on {self.name}")
        if peer != r.peer_node:
            raise LinkError(f"node {peer} does not hold resource {name}; its peer is "
                            f"{r.peer_node}")
        if r.conn is Conn.STANDALONE:
            raise LinkError(f"resource {name} is StandAlone on {self.name}; run "
                            f"'rblock connect {name}' there")
        why = ""
        if r.cfg.tls and link.tls_version is None:
            why = (f"resource {name} has tls = true on {self.name}, but {peer} connected "
                   f"without TLS; set tls = true in [resource.{name}] on {peer} too (with "
                   f"tls_cert, tls_key and tls_ca under [node.{peer}])")
        elif not r.cfg.tls and link.tls_version is not None:
            why = (f"{peer} connected with TLS, but resource {name} has tls off on "
                   f"{self.name}; give both nodes the same tls setting for {name}")
        if why:
            r.note_connect_failure(FAIL_TLS, why)
            link.unrouted_failure = None  # told the resource itself
            raise LinkRefused(why, FAIL_TLS)
        link.ping_interval_s = r.cfg.ping_interval_s
        link.peer_timeout_s = r.cfg.peer_timeout_s
        return r, r.cfg.secret, peer

    async def _dial_loop(self, r: Resource) -> None:
        """Keep a link to the peer: connect, wait while it lasts, back off and retry."""
        peer = self.cfg.node(r.peer_node)
        loop = asyncio.get_running_loop()
        backoff_s = DIAL_BACKOFF_FIRST_S
        tls = self.tls if r.cfg.tls else None
        assert tls is not None or not r.cfg.tls, "run() loads the contexts of a TLS resource"
        last_failure = ""  # a TLS failure is logged when it changes, not at every retry
        while not self._stopping:
            if r.conn is Conn.STANDALONE or (r.link is not None and r.link.up):
                link = r.link
                if link is not None and link.up:
                    await link.closed
                else:  # StandAlone: until `rblock connect`
                    r.connect_requested.clear()
                    if r.conn is Conn.STANDALONE:
                        await r.connect_requested.wait()
                continue
            link = PeerLink(self.name, dialer=True, ping_interval_s=r.cfg.ping_interval_s,
                            peer_timeout_s=r.cfg.peer_timeout_s, owner=r, secret=r.cfg.secret,
                            resource=r.name, expect_node=r.peer_node)
            try:
                if tls is None:
                    dial = loop.create_connection(lambda link=link: link, peer.replication.host,
                                                  peer.replication.port)
                else:
                    dial = loop.create_connection(lambda link=link: link, peer.replication.host,
                                                  peer.replication.port, ssl=tls.client,
                                                  ssl_handshake_timeout=AUTH_TIMEOUT_S)
                await asyncio.wait_for(dial, DIAL_TIMEOUT_S)
            except OSError as e:  # TimeoutError included
                # Refused or unreachable: the peer is not up yet, retried quietly (status
                # says it). Anything else with TLS on failed in the handshake, and the user
                # needs to know why.
                if tls is not None and _handshake_failure(e):
                    why = describe_tls_error(e, tls.ca)
                    r.note_connect_failure(FAIL_TLS, f"TLS handshake with {r.peer_node} "
                                                     f"({peer.replication}) failed: {why}")
                    if why != last_failure:
                        log.error("link %s dial to %s (%s): TLS handshake failed: %s", r.name,
                                  r.peer_node, peer.replication, why)
                        last_failure = why
                else:
                    r.note_connect_failure(FAIL_UNREACHABLE,
                                           _dial_failure(r.peer_node, str(peer.replication), e))
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, r.cfg.connect_retry_max_s)
                continue
            last_failure = ""
            await link.closed
            if link.was_up:
                backoff_s = DIAL_BACKOFF_FIRST_S  # a working link broke: retry quickly
            if not self._stopping:
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, r.cfg.connect_retry_max_s)

    # --- run ---------------------------------------------------------------------------------

    async def run(self) -> int:
        configure_idle_poll(self.me.idle_poll_us * 1000)  # before any NBD client or link
        self.tls = self._load_tls()
        if self.cfg.etcd is not None and any(r.fencing == "etcd"
                                             for r in self.cfg.resources_of(self.name)):
            self.fencer = Fencer(self.cfg.etcd, self.name, self._on_lease)
        self._open_resources()
        try:
            for r in self.resources.values():
                await r.start()
            catalog = ExportCatalog(gate=self._gate)
            for name, r in self.resources.items():
                catalog.add(Export(name, r))
            self.nbd = NBDServer(catalog)
            await self._listen("NBD", self.me.nbd, self.nbd.listen_tcp)
            loop = asyncio.get_running_loop()
            repl = self.me.replication
            for warning in config_warnings(self.cfg, self.name):
                log.warning("%s", warning)

            def new_link() -> PeerLink:
                return PeerLink(self.name, dialer=False, ping_interval_s=DEFAULT_PING_INTERVAL_S,
                                peer_timeout_s=DEFAULT_PEER_TIMEOUT_S, route=self._route)

            repl_server = PeerListener(new_link, self.tls)
            repl_server.on_failure = self._unrouted_failure
            try:
                await repl_server.start(repl.host, repl.port)
            except OSError as e:
                raise NodeError(f"cannot listen for peers on {repl}: {e.strerror}") from None
            control = await start_control(self)
            if self.fencer is not None:
                await self.fencer.start()
            for r in self.resources.values():
                if self.name < r.peer_node:
                    task = loop.create_task(self._dial_loop(r))
                    task.add_done_callback(lambda t, name=r.name: _dialer_ended(t, name))
                    self._tasks.append(task)
            stop = asyncio.Event()

            def on_signal(sig: signal.Signals) -> None:
                # SIGHUP too (a closed terminal, or a reload the daemon does not have): a
                # clean stop, logged, rather than Python's default of dying mid-write.
                log.info("node %s: %s received", self.name, sig.name)
                stop.set()

            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, on_signal, sig)
            log.info("node %s up: %d resource(s), NBD on %s, peers on %s, control on %s",
                     self.name, len(self.resources), self.me.nbd, repl, self.me.control)
            print("ready", flush=True)
            await stop.wait()
            log.info("node %s stopping", self.name)
            self._stopping = True
            await self.nbd.shutdown()
            repl_server.close()
            for t in self._tasks:
                t.cancel()
            self.events.close()
            await control.cleanup()
        finally:
            for r in self.resources.values():
                await r.close()
            if self.fencer is not None:
                await self.fencer.close()  # after: no resource is Primary any more
        log.info("node %s stopped cleanly", self.name)
        return 0

    def _unrouted_failure(self, remote_host: str, kind: str, reason: str) -> None:
        """An incoming connection failed before it named its resource: shown on the
        Connecting resources whose peer is at that address (their dialer, most likely)."""
        for r in self.resources.values():
            peer_host = self.cfg.node(r.peer_node).replication.host
            if r.conn is Conn.CONNECTING and _same_host(remote_host, peer_host):
                r.note_connect_failure(kind, f"{reason} (a connection from {remote_host})")

    # --- rblock adjust -------------------------------------------------------------------------

    @property
    def config_path(self) -> str:
        return str(self.cfg.path)

    def running_config(self) -> ClusterConfig:
        """The config the node runs with: the file it started from, with what `adjust`
        applied since."""
        resources = dict(self.cfg.resources)
        resources.update({name: r.cfg for name, r in self.resources.items()})
        return dataclasses.replace(self.cfg, resources=resources)

    async def adjust(self) -> dict[str, Any]:
        """Read the config file again; apply what RUNTIME_KEYS lists; say what else differs.

            {"config": PATH, "applied": [{"key", "old", "new", "when"}],
             "restart": [{"key", "old", "new"}]}

        Keys are the file's ("resource.r0.resync_rate"); secrets show as SECRET_HIDDEN.
        Raises ConfigError (nothing applied) if the file does not load or lacks this node."""
        loop = asyncio.get_running_loop()
        new = await loop.run_in_executor(None, load, self.cfg.path)
        new.node(self.name)
        old_tables = _tables(effective(self.running_config(), self.name, hide_secrets=False))
        new_tables = _tables(effective(new, self.name, hide_secrets=False))
        applied, restart = [], []
        for table in _in_order(old_tables, new_tables):
            before_t, after_t = old_tables.get(table), new_tables.get(table)
            if before_t is None or after_t is None:  # a whole table came or went
                restart.append({"key": table, "old": "absent" if before_t is None else "set",
                                "new": "absent" if after_t is None else "set"})
                continue
            for key in _in_order(before_t, after_t):
                before, after = before_t.get(key), after_t.get(key)
                if before == after:
                    continue
                shown = [SECRET_HIDDEN if key == "secret" else v for v in (before, after)]
                entry = {"key": f"{table}.{key}", "old": shown[0], "new": shown[1]}
                if table.startswith("resources.") and key in RUNTIME_KEYS:
                    entry["when"] = RUNTIME_KEYS[key]
                    applied.append(entry)
                else:
                    restart.append(entry)
        for name, r in self.resources.items():
            if name not in new.resources or name not in new.nodes[self.name].disks:
                continue
            fresh = new.resources[name]
            changes = {f: getattr(fresh, f) for f in RUNTIME_FIELDS
                       if getattr(fresh, f) != getattr(r.cfg, f)}
            if changes:
                r.apply_settings(dataclasses.replace(r.cfg, **changes))
                log.info("%s: adjust applied %s", name, ", ".join(
                    _FIELD_KEYS.get(f, f) for f in changes))
        for e in restart:
            log.info("adjust: %s differs in %s; it takes a restart of the node",
                     e["key"].replace("resources.", "resource.").replace("nodes.", "node."),
                     self.cfg.path)
        for e in applied + restart:
            e["key"] = _file_key(e["key"])
        return {"config": str(self.cfg.path), "applied": applied, "restart": restart}

    async def _listen(self, what: str, addr, listen) -> None:
        try:
            await listen(addr.host, addr.port)
        except OSError as e:
            raise NodeError(f"cannot listen for {what} on {addr}: {e.strerror}") from None


def _dialer_ended(task: asyncio.Task, resource: str) -> None:
    """A dial loop ends only when the node stops; anything else is a bug, logged."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s: the peer dialer failed; the node no longer dials its peer", resource,
                  exc_info=task.exception())


def _disk_size(path: Path) -> int:
    """Bytes in a file or block device (a block device's stat size is 0)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _dial_failure(peer: str, addr: str, e: OSError) -> str:
    """A failed dial in words: 'cannot connect to beta at 127.0.0.1:7791: connection
    refused (is rblock up running there?)'."""
    if isinstance(e, TimeoutError):
        return (f"cannot connect to {peer} at {addr}: no answer in {DIAL_TIMEOUT_S:g}s (the "
                f"machine is down, or a firewall drops the packets)")
    if isinstance(e, socket.gaierror):
        return f"cannot connect to {peer}: its host in {addr} does not resolve ({e.strerror})"
    what = os.strerror(e.errno).lower() if e.errno else str(e)
    hint = " (is 'rblock up' running there?)" if e.errno == errno.ECONNREFUSED else ""
    return f"cannot connect to {peer} at {addr}: {what}{hint}"


def _same_host(a: str, b: str) -> bool:
    """Whether two hosts of addresses are the same machine, as far as one can tell without
    a name lookup (any loopback address is one machine)."""
    def loop(h: str) -> bool:
        return h.lower() in _LOOPBACK or h.startswith("127.") or h.startswith("::ffff:127.")
    return a.lower() == b.lower() or (loop(a) and loop(b))


def _tables(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """config.effective's view as tables: {"cluster": {...}, "resources.r0": {...},
    "nodes.alpha": {...}}, a node's disk and meta tables flattened into it ("disk.r0")."""
    out: dict[str, dict[str, Any]] = {}
    if view["cluster"] is not None:
        out["cluster"] = dict(view["cluster"])
    for group in ("resources", "nodes"):
        for name, t in view[group].items():
            flat: dict[str, Any] = {}
            for k, v in t.items():
                if isinstance(v, dict):
                    flat.update({f"{k}.{sub}": x for sub, x in v.items()})
                else:
                    flat[k] = v
            out[f"{group}.{name}"] = flat
    return out


def _in_order(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys of A, then those only B has, each once (the order the file shows them)."""
    return list(dict.fromkeys([*a, *b]))


def _file_key(key: str) -> str:
    """The effective view's key as the file spells it: resources.r0.x -> resource.r0.x."""
    head, _, rest = key.partition(".")
    return {"resources": "resource", "nodes": "node"}.get(head, head) + (f".{rest}" if rest
                                                                          else "")


def _handshake_failure(e: OSError) -> bool:
    """Whether a dial error came after TCP connected, from the TLS handshake."""
    return isinstance(e, (ssl.SSLError, ConnectionResetError, ConnectionAbortedError,
                          BrokenPipeError))
