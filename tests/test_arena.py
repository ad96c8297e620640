"""The receive arena (rblock/arena.py): messages come out intact whatever the receive sizes,
and large messages are not copied from one arena into the next."""

from __future__ import annotations

import random

import pytest

from rblock import arena as arena_mod
from rblock.arena import Arena

HEADER_BYTES = 8  # the stream's messages: a u64 length, then that many bytes


def _message(rng: random.Random, payload_bytes: int) -> bytes:
    return payload_bytes.to_bytes(HEADER_BYTES, "big") + rng.randbytes(payload_bytes)


def _feed(stream: bytes, receive_sizes: list[int], rng: random.Random) -> list[bytes]:
    """Receive STREAM into an arena as a BufferedProtocol would (at most the writable
    region per receive), parse messages in place as the NBD server and the peer link do,
    and return the payloads, copied out once complete."""
    a = Arena()
    out: list[bytes] = []
    held: list[memoryview] = []  # payload views still in use (writes in flight)
    pos = 0
    while pos < len(stream):
        w = a.writable()
        n = min(len(w), rng.choice(receive_sizes), len(stream) - pos)
        w[:n] = stream[pos:pos + n]
        a.received(n)
        pos += n
        message_bytes = 0
        while a.pending() >= HEADER_BYTES:
            length = int.from_bytes(a.buf[a.start:a.start + HEADER_BYTES], "big")
            message_bytes = HEADER_BYTES + length
            if message_bytes > a.pending():
                break
            a.take(HEADER_BYTES)
            view = a.take(length)
            out.append(bytes(view))
            held.append(view)
            del held[:-8]
            message_bytes = 0
        a.reserve(message_bytes)
    return out


@pytest.fixture
def copied(monkeypatch) -> list[int]:
    """Bytes each arena move copied."""
    moves: list[int] = []
    original = Arena._move

    def counting_move(self, size_bytes, limit_bytes=None):
        moves.append(self.pending())
        original(self, size_bytes, limit_bytes)

    monkeypatch.setattr(Arena, "_move", counting_move)
    return moves


@pytest.mark.parametrize("seed", range(4))
def test_large_messages_are_not_copied_between_arenas(copied, seed):
    """1 MiB messages in receives of 64 KiB up to several MiB (a socket with a full receive
    buffer hands over a whole message, or more, at once): only the first message, which
    begins in the initial small arena, is moved."""
    rng = random.Random(seed)
    messages = [_message(rng, 1 << 20) for _ in range(40)]
    got = _feed(b"".join(messages), [64 * 1024, 200_000, (1 << 20) + HEADER_BYTES, 3 << 20],
                rng)
    assert got == [m[HEADER_BYTES:] for m in messages]
    large_copies = [n for n in copied if n >= arena_mod.ARENA_SPACE_MIN_BYTES]
    assert len(large_copies) <= 1, f"large messages copied between arenas: {copied}"


@pytest.mark.parametrize("seed", range(4))
def test_mixed_message_sizes_come_out_intact(copied, seed):
    rng = random.Random(100 + seed)
    sizes = [rng.choice([0, 1, 4096, 65535, 65536, 300_000, 1 << 20]) for _ in range(120)]
    messages = [_message(rng, n) for n in sizes]
    got = _feed(b"".join(messages), [1, 7, 4096, 65536, 1 << 20, 4 << 20], rng)
    assert got == [m[HEADER_BYTES:] for m in messages]
