"""Parsing sizes and addresses given on the command line or in config files."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """'256M', '1G', '1GiB', '4096' -> bytes (binary multiples, as qemu-img and DRBD use)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"size '{text}' is not a number with an optional K/M/G/T suffix")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'127.0.0.1:10809', '[::1]:10809', 'host', ':10809' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        port_n = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"address '{text}': port '{port}' is not a number") from None
    if not 0 <= port_n <= 65535:
        raise ValueError(f"address '{text}': port {port_n} is out of range")
    return host or "127.0.0.1", port_n


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
