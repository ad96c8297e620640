"""Hostile clients on the network ports: what a stranger can make a daemon spend, and whether
the daemon says who it was.

Replication port (before authentication): announced frame sizes are capped, connections not
authenticated yet are capped per listener, garbage is logged with the sender's address.
NBD port: idle connections cost a small handshake buffer, not a receive arena; connections
are capped per server; a handshake that does not finish is dropped. Peer links: a silent peer
is dropped exactly peer_timeout_s after it last sent something.

Memory bounds are asserted on the daemon's RSS (/proc/PID/status VmRSS) with wide margins:
they are correctness properties (bounded memory), not measurements.
"""

from __future__ import annotations

import asyncio
import resource
import selectors
import shutil
import socket
import ssl
import struct
import time

import pytest

from rblock.nbd.server import CONNECTIONS_MAX, Export, ExportCatalog, NBDServer
from rblock.replica import wire
from rblock.replica.link import ADMISSIONS_MAX, PeerLink
from rblock.store.volume import FileVolume
from tests.cluster import Cluster
from tests.conftest import make_image
from tests.nbdwire import Raw, address, wait_for_log

MIB = 1024 * 1024
CLOSE_WAIT_S = 3.0  # under AUTH_TIMEOUT_S (5 s): a drop must come from the check, not that
FRAME_MAGIC = 0x52424C31  # "RBL1", written out: the test must not share the codec's constant
HEADER = struct.Struct(">IHHIQQQ")  # magic, type, flags, payload length, id, offset, aux
TYPE_HELLO = 1


def rss_bytes(pid: int) -> int:
    """Resident set size of process PID (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def local_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def wait_all_closed(socks: list[socket.socket], timeout_s: float) -> list[socket.socket]:
    """Wait until the server has closed each of SOCKS (EOF or reset); returns those still open
    after TIMEOUT_S. Bytes the server sends first are read and dropped."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    deadline = time.monotonic() + timeout_s
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(s)
                open_.discard(s)
    sel.close()
    return list(open_)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5.0)


# --- replication port ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One `rblock up` node (alpha), its peer never started: strangers are all it talks to."""
    c = Cluster(tmp_path_factory.mktemp("hardening"))
    c.create_md("alpha")
    c.up("alpha")
    yield c
    c.stop_all()


def repl_port(c: Cluster) -> int:
    return c.ports["alpha"]["replication"]


def test_preauth_frame_over_the_limit_is_dropped_without_allocating(node):
    """20 strangers announce a 32 MiB HELLO: each is dropped as soon as its header is in (before
    the link reserves a buffer for it), the log names each one's address, and the daemon's RSS
    barely moves (before: 66 MiB per connection, 1.3 GB for 20, kept after they closed)."""
    c = node
    pid = c.procs["alpha"].pid
    rss_before = rss_bytes(pid)
    header = HEADER.pack(FRAME_MAGIC, TYPE_HELLO, 0, 32 * MIB, 0, 0, 0)
    rss_peak = rss_before
    addresses = []
    # Two waves of 10, under ADMISSIONS_MAX: every connection is dropped by the frame check.
    assert ADMISSIONS_MAX >= 10
    for _wave in range(2):
        socks = [connect(repl_port(c)) for _ in range(10)]
        for s in socks:
            s.sendall(header + b"x" * 1000)  # the start of the promised payload
            addresses.append(local_address(s))
        rss_peak = max(rss_peak, rss_bytes(pid))
        still_open = wait_all_closed(socks, CLOSE_WAIT_S)
        rss_peak = max(rss_peak, rss_bytes(pid))
        for s in socks:
            s.close()
        assert not still_open, (f"{len(still_open)} connections announcing a 32 MiB frame "
                                f"were not dropped in {CLOSE_WAIT_S}s")
    log = wait_for_log(lambda: c.log("alpha"), addresses[-1])
    for addr in addresses:
        lines = [ln for ln in log.splitlines() if addr in ln]
        assert any("33554432-byte payload" in ln for ln in lines), (addr, lines)
    assert rss_peak - rss_before < 50 * MIB, (
        f"RSS grew {(rss_peak - rss_before) / MIB:.0f} MiB for 20 connections announcing "
        f"32 MiB frames")
    time.sleep(0.2)
    rss_after = rss_bytes(pid)
    assert rss_after - rss_before < 50 * MIB, (
        f"RSS is {(rss_after - rss_before) / MIB:.0f} MiB above where it was, after the "
        f"connections closed")


def test_preauth_frame_over_the_limit_that_came_whole_is_dropped(node):
    """A 100 KiB HELLO sent in one piece (it may arrive whole, within one receive, and then
    never be 'announced' while incomplete) is refused by the same limit."""
    c = node
    payload = b" " * (100 * 1024)
    frame = b"".join(bytes(b) for b in wire.encode(wire.Frame(wire.T.HELLO, payload=payload)))
    with connect(repl_port(c)) as s:
        s.sendall(frame)
        assert not wait_all_closed([s], CLOSE_WAIT_S), "a 100 KiB HELLO was not refused"
        addr = local_address(s)
    log = wait_for_log(lambda: c.log("alpha"), addr)
    lines = [ln for ln in log.splitlines() if addr in ln]
    assert any("102400-byte payload" in ln for ln in lines), lines


def test_garbage_is_logged_with_the_remote_address(node):
    """Bad magic and a bad CRC drop the connection; the log line names who sent it (the link
    has no peer name yet)."""
    c = node
    bad_crc = b"".join(bytes(b) for b in wire.encode_json(wire.T.HELLO, {"node": "x"}))
    bad_crc = bad_crc[:-1] + bytes([bad_crc[-1] ^ 0xFF])
    for data, needle in ((b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 40, "bad frame magic"),
                         (bad_crc, "CRC-32C mismatch")):
        with connect(repl_port(c)) as s:
            s.sendall(data)
            assert not wait_all_closed([s], CLOSE_WAIT_S), f"{needle}: not dropped"
            addr = local_address(s)
        log = wait_for_log(lambda: c.log("alpha"), addr)
        lines = [ln for ln in log.splitlines() if needle in ln]
        assert lines and any(addr in ln for ln in lines), (
            f"no '{needle}' line names {addr}: {lines}")


def test_preauth_connections_are_capped_on_the_plain_listener(node):
    """ADMISSIONS_MAX silent connections fill the listener's admission slots: one more is closed
    at once (with its address in the log), and a slot frees as soon as one of them closes."""
    c = node
    idle = [connect(repl_port(c)) for _ in range(ADMISSIONS_MAX)]
    try:
        time.sleep(0.3)  # let the daemon accept them all (it accepts in order)
        with connect(repl_port(c)) as extra:
            assert not wait_all_closed([extra], CLOSE_WAIT_S), (
                f"connection {ADMISSIONS_MAX + 1} was admitted with {ADMISSIONS_MAX} "
                f"unauthenticated ones open")
            addr = local_address(extra)
        log = wait_for_log(lambda: c.log("alpha"), addr)
        assert any("ADMISSIONS_MAX" in ln for ln in log.splitlines() if addr in ln), addr
        gone = idle.pop()
        gone_addr = local_address(gone)
        gone.close()
        wait_for_log(lambda: c.log("alpha"), gone_addr)  # the daemon saw it close
        # Admitted now: garbage reaches a link, which logs why it closes.
        with connect(repl_port(c)) as s:
            s.sendall(b"\0" * 64)
            assert not wait_all_closed([s], CLOSE_WAIT_S)
            addr = local_address(s)
        log = wait_for_log(lambda: c.log("alpha"), f"from {addr} closing")
        assert f"from {addr} closing: bad frame magic" in log, log[-2000:]
    finally:
        for s in idle:
            s.close()


def test_preauth_connections_are_capped_on_the_tls_listener(tmp_path):
    """With TLS on, a connection keeps its admission slot after its TLS handshake, until it
    authenticates (before: the slot was free again once the handshake was done, so any number
    of strangers with a certificate could sit in HELLO); a failed TLS handshake frees it."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed (make test installs it)")
    from tests.test_replication_tls import make_ca, make_cert

    make_ca(tmp_path, "ca")
    files = {n: make_cert(tmp_path, n, "ca") for n in ("alpha", "beta")}
    c = Cluster(tmp_path / "c", tls=files)
    try:
        c.create_md("alpha")
        c.up("alpha")
        port = repl_port(c)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(files["beta"].ca)
        ctx.load_cert_chain(files["beta"].cert, files["beta"].key)
        held = []
        try:
            for _ in range(ADMISSIONS_MAX):
                s = ctx.wrap_socket(connect(port))  # then silent, in HELLO
                held.append(s)
            # In TLS 1.3 the client is done before the server has checked its certificate:
            # give the server a moment to finish its side of the handshakes.
            time.sleep(0.3)
            with connect(port) as extra:
                assert not wait_all_closed([extra], CLOSE_WAIT_S), (
                    f"connection {ADMISSIONS_MAX + 1} was admitted with {ADMISSIONS_MAX} "
                    f"TLS connections not authenticated")
                addr = local_address(extra)
            log = wait_for_log(lambda: c.log("alpha"), addr)
            assert any("ADMISSIONS_MAX" in ln for ln in log.splitlines() if addr in ln), addr
            gone = held.pop()
            gone_addr = local_address(gone)
            gone.close()
            wait_for_log(lambda: c.log("alpha"), gone_addr)
            # A failed TLS handshake (no client certificate) must give its slot back.
            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.check_hostname = False
            no_cert.verify_mode = ssl.CERT_NONE
            for _ in range(3):
                with connect(port) as raw:
                    try:
                        with no_cert.wrap_socket(raw) as t:
                            t.recv(1)  # TLS 1.3: the server's refusal shows up here
                    except (ssl.SSLError, OSError):
                        pass
            deadline = time.monotonic() + CLOSE_WAIT_S
            while c.log("alpha").count("TLS handshake failed") < 3:
                assert time.monotonic() < deadline, c.log("alpha")[-2000:]
                time.sleep(0.05)
            with connect(port) as s:
                s.sendall(b"\0" * 64)
                assert not wait_all_closed([s], CLOSE_WAIT_S)
                addr = local_address(s)
            log = wait_for_log(lambda: c.log("alpha"), f"from {addr} closing")
            assert f"from {addr} closing: bad frame magic" in log, log[-2000:]
        finally:
            for s in held:
                s.close()
    finally:
        c.stop_all()


# --- peer link liveness (in process) -----------------------------------------------------------

PING_INTERVAL_S = 0.5
PEER_TIMEOUT_S = 1.1  # not a multiple of the interval: the old grid check was up to 0.4 s late


class _Owner:
    size_bytes = MIB

    def __init__(self) -> None:
        self.is_up = asyncio.Event()
        self.is_down = asyncio.Event()
        self.down_at = 0.0
        self.reason = ""

    def link_up(self, link: PeerLink) -> None:
        self.is_up.set()

    def link_frame(self, link: PeerLink, frame: wire.Frame) -> None:
        pass

    def link_down(self, link: PeerLink, reason: str) -> None:
        self.down_at = time.monotonic()
        self.reason = reason
        self.is_down.set()


async def _silent_peer_scenario(pause_s: float = 0.0) -> tuple[float, float, str]:
    """Two links through an in-process relay; once both are up, the relay drops everything
    (a partition). Returns (when the acceptor dropped, when the relay last passed it bytes,
    the reason). PAUSE_S: first, the acceptor stops reading that long (its apply queue
    full), the relay still passing everything; the link must stay up through it."""
    loop = asyncio.get_running_loop()
    a_sock, a_relay = socket.socketpair()
    b_sock, b_relay = socket.socketpair()
    for s in (a_sock, a_relay, b_sock, b_relay):
        s.setblocking(False)
    owner_a, owner_b = _Owner(), _Owner()
    a = PeerLink("alpha", dialer=False, ping_interval_s=PING_INTERVAL_S,
                 peer_timeout_s=PEER_TIMEOUT_S, route=lambda link, hello: (owner_a, "s", "beta"))
    # The dialer never pings (and never times out) within the test: what the acceptor
    # receives after the handshake is only the PONGs to its own PINGs, right after each one.
    b = PeerLink("beta", dialer=True, ping_interval_s=3600.0, peer_timeout_s=7200.0,
                 owner=owner_b, secret="s", resource="r0", expect_node="alpha")
    state = {"cut": False, "last_to_a": 0.0}

    async def relay(src: socket.socket, dst: socket.socket) -> None:
        while data := await loop.sock_recv(src, 65536):
            if state["cut"]:
                continue
            if dst is a_relay:
                state["last_to_a"] = time.monotonic()
            await loop.sock_sendall(dst, data)

    relays = [loop.create_task(relay(a_relay, b_relay)), loop.create_task(relay(b_relay, a_relay))]
    try:
        await loop.connect_accepted_socket(lambda: a, a_sock)
        await loop.connect_accepted_socket(lambda: b, b_sock)
        await asyncio.wait_for(asyncio.gather(owner_a.is_up.wait(), owner_b.is_up.wait()), 5.0)
        await asyncio.sleep(2.2 * PING_INTERVAL_S)  # a couple of PINGs and PONGs
        if pause_s:
            a.pause()
            await asyncio.sleep(pause_s)
            assert not owner_a.is_down.is_set(), f"dropped while paused: {owner_a.reason}"
            a.resume()
            await asyncio.sleep(2.2 * PING_INTERVAL_S)
            assert not owner_a.is_down.is_set(), f"dropped after resume: {owner_a.reason}"
        state["cut"] = True
        await asyncio.wait_for(owner_a.is_down.wait(), PEER_TIMEOUT_S + 3 * PING_INTERVAL_S)
        return owner_a.down_at, state["last_to_a"], owner_a.reason
    finally:
        a.abort("test over")
        b.abort("test over")
        for t in relays:
            t.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        for s in (a_relay, b_relay):
            s.close()


def _run(coro):
    try:
        import uvloop  # the daemon's loop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def test_silent_peer_is_dropped_at_the_timeout_not_on_the_ping_grid():
    """Dropped no earlier than peer_timeout_s after the last byte came in, and well before the
    next ping tick could have noticed it (before: up to one ping interval late)."""
    down_at, last_rx_at, reason = _run(_silent_peer_scenario())
    silent_s = down_at - last_rx_at
    assert reason.startswith("peer silent"), reason
    assert silent_s >= PEER_TIMEOUT_S, f"dropped after {silent_s:.3f}s of silence"
    assert silent_s < PEER_TIMEOUT_S + PING_INTERVAL_S / 2, (
        f"dropped after {silent_s:.3f}s of silence, peer_timeout_s is {PEER_TIMEOUT_S}")


def test_a_node_that_stops_reading_does_not_call_its_peer_silent():
    """Reading paused for twice peer_timeout_s (backpressure from a slow disk): the peer's
    frames wait in the socket, the link stays up, and once reading resumes, a real silence is
    still caught at the timeout."""
    down_at, last_rx_at, reason = _run(_silent_peer_scenario(pause_s=2 * PEER_TIMEOUT_S))
    assert reason.startswith("peer silent"), reason
    assert down_at - last_rx_at >= PEER_TIMEOUT_S


# --- NBD port ------------------------------------------------------------------------------------

IDLE_CONNECTIONS = 2000
CONNECT_BATCH = 50
GREETING_BYTES = 18


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise this process's open-file soft limit to WANT (a server started now inherits it);
    returns the old limits, to restore."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-file hard limit {hard} is under the {want} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return soft, hard


def greeted_or_closed(socks: list[socket.socket], timeout_s: float) -> tuple[int, int]:
    """Read each socket until it has the whole NBD greeting or is closed by the server; returns
    (greeted, closed)."""
    sel = selectors.DefaultSelector()
    got = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = b""
    greeted = closed = 0
    deadline = time.monotonic() + timeout_s
    while got and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            try:
                data = s.recv(64)
            except ConnectionResetError:
                data = b""
            except BlockingIOError:
                continue
            if not data:
                closed += 1
            elif len(got[s] + data) >= GREETING_BYTES:
                greeted += 1
            else:
                got[s] += data
                continue
            sel.unregister(s)
            del got[s]
    sel.close()
    return greeted, closed


def test_idle_nbd_connections_cost_little_and_are_capped(rblock_serve, tmp_path):
    """2000 connections that never get past the greeting: the server keeps CONNECTIONS_MAX
    of them at a small cost each (before: a 256 KiB arena each, 520 MB), closes the rest at
    accept with their address in the log, and keeps serving a client already connected."""
    limits = raise_nofile(2 * IDLE_CONNECTIONS + 256)
    socks: list[socket.socket] = []
    try:
        img = make_image(tmp_path / "d.img", 16 * MIB)
        server = rblock_serve(img)
        pid = server.pid
        with Raw(server.uri) as client:
            client.start()
            client.go("d")
            assert client.read(0, 4096) == b"\0" * 4096
            rss_before = rss_bytes(pid)
            _host, port = address(server.uri)
            greeted = closed = 0
            for _ in range(IDLE_CONNECTIONS // CONNECT_BATCH):
                # In batches: a burst of 2000 would overflow the listen backlog, and a dropped
                # SYN is retried after 1 s.
                batch = [connect(port) for _ in range(CONNECT_BATCH)]
                socks.extend(batch)
                g, c = greeted_or_closed(batch, 20.0)
                greeted, closed = greeted + g, closed + c
            rss_during = rss_bytes(pid)
            kept = min(CONNECTIONS_MAX - 1, IDLE_CONNECTIONS)  # the client is one
            assert (greeted, closed) == (kept, IDLE_CONNECTIONS - kept)
            assert rss_during - rss_before < 100 * MIB, (
                f"RSS grew {(rss_during - rss_before) / MIB:.0f} MiB for {kept} idle "
                f"connections")
            assert client.read(4096, 4096) == b"\0" * 4096  # still served
            log = server.log()
            refused = [ln for ln in log.splitlines() if "refused" in ln and "conn from" in ln]
            assert len(refused) == IDLE_CONNECTIONS - kept, refused[:3]
            assert any(local_address(s) in refused[-1] for s in socks), refused[-1]
            for s in socks:
                s.close()
            socks = []
        # Slots come back once the idle connections are gone: a new client is served.
        deadline = time.monotonic() + 10.0
        while True:
            with Raw(server.uri) as again:
                try:
                    again.start()
                    again.go("d")
                    assert again.read(0, 512) == b"\0" * 512
                    break
                except (EOFError, ConnectionResetError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        time.sleep(0.2)
        rss_after = rss_bytes(pid)
        assert rss_after - rss_before < 50 * MIB, (
            f"RSS is {(rss_after - rss_before) / MIB:.0f} MiB above where it was, after the "
            f"idle connections closed")
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


HANDSHAKE_TIMEOUT_TEST_S = 0.5


async def _stalled_handshakes(image_path: str) -> list[tuple[str, float, bool]]:
    """An in-process server with a short handshake timeout and two stalled clients: one sends
    nothing at all, one sends its flags and half an option header. Returns per client (its
    address, seconds until the server closed it, closed at all)."""
    vol = FileVolume(image_path)
    catalog = ExportCatalog()
    catalog.add(Export("d", vol))
    server = NBDServer(catalog, handshake_timeout_s=HANDSHAKE_TIMEOUT_TEST_S)
    host, port = await server.listen_tcp("127.0.0.1", 0)

    async def client(first: bytes) -> tuple[str, float, bool]:
        reader, writer = await asyncio.open_connection(host, port)
        t0 = time.monotonic()
        addr = local_address(writer.get_extra_info("socket"))
        if first:
            await reader.readexactly(GREETING_BYTES)
            writer.write(first)
        try:
            while await asyncio.wait_for(reader.read(4096), HANDSHAKE_TIMEOUT_TEST_S + 3.0):
                pass
            closed = True
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
        writer.close()
        return addr, time.monotonic() - t0, closed

    try:
        partial_option = struct.pack(">I", 3) + struct.pack(">Q", 0x49484156454F5054)[:6]
        return list(await asyncio.gather(client(b""), client(partial_option)))
    finally:
        await server.shutdown()
        await vol.close()


def test_handshake_timeout_drops_silent_and_partial_clients(tmp_path, caplog):
    img = make_image(tmp_path / "d.img", MIB)
    caplog.set_level("INFO", logger="rblock.nbd")
    results = _run(_stalled_handshakes(str(img)))
    for addr, after_s, closed in results:
        assert closed, f"client {addr} still connected {after_s:.1f}s into its handshake"
        assert after_s >= HANDSHAKE_TIMEOUT_TEST_S * 0.9, f"{addr} dropped after {after_s:.2f}s"
        lines = [r.getMessage() for r in caplog.records if addr in r.getMessage()]
        assert any("handshake not finished" in ln for ln in lines), lines
