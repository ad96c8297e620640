"""The host's watchdog as the agent's backstop (Patroni and Proxmox do the same).

Opening the device arms it: unless it is written to ("petted") within its timeout, the
hardware (or the kernel's softdog) resets the host. The agent pets it every PET_INTERVAL_S
from its own task while its lease is valid, or once no HA guest is active on the host (a
self-fence that worked): so the host is reset when the agent hangs or dies with guests
running, or when a self-fence could not kill a guest, and never merely because etcd is
away. The timeout is set to the lease's TTL minus the self-fence margin, so a reset lands
when a self-fence would have. A clean stop writes the magic close character "V", which
disarms the drivers that allow it (nowayout off).

Not exercised against a real device here: this machine has no /dev/watchdog, and softdog
would reset the test machine itself. The unit test drives it on a plain file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

log = logging.getLogger("hvctl.watchdog")

WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)
DEFAULT_DEVICE = "/dev/watchdog"
PET_INTERVAL_S = 0.5


def device_for(setting: str) -> str | None:
    """The device path for the [hvctl] watchdog setting: "auto" (DEFAULT_DEVICE if it
    exists), "off", or a path."""
    if setting == "off":
        return None
    if setting == "auto":
        return DEFAULT_DEVICE if os.path.exists(DEFAULT_DEVICE) else None
    return setting


class Watchdog:
    def __init__(self, path: str, timeout_s: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY)  # armed from here on
        try:
            fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, struct.pack("i", max(1, timeout_s)))
            log.info("watchdog %s armed, timeout %d s", path, timeout_s)
        except OSError as e:
            log.warning("watchdog %s armed, but its timeout could not be set to %d s (%s): "
                        "it keeps its own", path, timeout_s, e.strerror)

    def pet(self) -> None:
        os.write(self.fd, b"\0")

    def close(self) -> None:
        """Disarm (the magic close) and close."""
        try:
            os.write(self.fd, b"V")
        finally:
            os.close(self.fd)
        log.info("watchdog %s disarmed", self.path)
