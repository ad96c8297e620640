"""Stopping a child process by PID, shared by the demo and the test harnesses."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_by_pid(proc: subprocess.Popen, sig: int, timeout_s: float) -> tuple[int, bool]:
    """Send SIG to PROC (unless it has exited) and wait up to TIMEOUT_S; past that, SIGKILL
    it and wait again. Returns (exit status, whether SIGKILL was needed)."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        return proc.wait(timeout_s), False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(), True
