"""The peer link sends a pass's frames in groups (LINK_FLUSH_FRAMES) and a run of write
acks once it holds ACK_RUN_FLUSH_SEQS seqs, not all at the end of the pass: checked on a
real socket pair, by what the other end can read before the loop pass ends."""

import asyncio
import socket

from rblock.replica import wire
from rblock.replica.link import ACK_RUN_FLUSH_SEQS, LINK_FLUSH_FRAMES, PeerLink
from rblock.replica.wire import T


def frames_readable(sock: socket.socket) -> list[wire.Frame]:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    frames, pos = [], 0
    while (got := wire.decode(data, pos, len(data))) is not None:
        frame, pos = got
        frames.append(frame)
    assert pos == len(data)
    return frames


async def linked_pair() -> tuple[PeerLink, socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    _, link = await loop.connect_accepted_socket(
        lambda: PeerLink("alpha", dialer=False, ping_interval_s=60, peer_timeout_s=120),
        sock=ours)
    return link, theirs


def test_a_pass_of_frames_leaves_in_groups() -> None:
    async def main() -> None:
        link, theirs = await linked_pair()
        count = 2 * LINK_FLUSH_FRAMES + 1
        for seq in range(1, count + 1):  # one pass: no await between the sends
            link.send_frame(T.DATA, 0, seq, 4096 * seq, 1, b"x" * 4096)
        early = frames_readable(theirs)
        assert [f.id for f in early] == list(range(1, 2 * LINK_FLUSH_FRAMES + 1))
        await asyncio.sleep(0)  # the pass ends: the rest goes
        await asyncio.sleep(0)
        late = frames_readable(theirs)
        assert [f.id for f in late] == [count]
        link.close("test over")
        theirs.close()
    asyncio.run(main())


def test_a_run_of_acks_leaves_once_it_is_long_enough() -> None:
    async def main() -> None:
        link, theirs = await linked_pair()
        for seq in range(1, ACK_RUN_FLUSH_SEQS + 2):
            link.send_write_ack(seq)
        early = frames_readable(theirs)
        assert [(f.type, f.id, f.aux) for f in early] == [(T.WRITE_ACK, 1, ACK_RUN_FLUSH_SEQS)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        late = frames_readable(theirs)
        assert [(f.type, f.id, f.aux or 1) for f in late] == [
            (T.WRITE_ACK, ACK_RUN_FLUSH_SEQS + 1, 1)]
        link.close("test over")
        theirs.close()
    asyncio.run(main())
