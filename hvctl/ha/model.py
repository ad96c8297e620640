"""What the HA planner reads and writes: observations, guest specs, requests and records.

Plain frozen values, no I/O: the agents build them from etcd and their node, the simulator
builds them from its simulated world, and `hvctl/ha/keys.py` turns them into etcd values.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class State(enum.Enum):
    """An HA guest's state, Proxmox's names."""

    STOPPED = "stopped"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    RELOCATE = "relocate"  # being stopped on its node, to start on `target`
    FENCE = "fence"  # its node is lost; waiting until no copy there can write
    RECOVERY = "recovery"  # its node is fenced; looking for a node to run it
    FREEZE = "freeze"  # its node's agent stopped cleanly: left as it is
    ERROR = "error"  # gave up (max_restart/max_relocate); a new request clears it


class Want(enum.Enum):
    """The assignment to the agent of the record's node."""

    RUN = "run"  # keep it running there (start it if it is not)
    STOP = "stop"  # stop it there (ACPI, then destroy) and make its disks Secondary
    KEEP = "keep"  # hands off: neither start nor stop it; report what it is


class HaMode(enum.Enum):
    STARTED = "started"
    STOPPED = "stopped"
    DISABLED = "disabled"  # not managed by HA


@dataclass(frozen=True)
class ResourceObs:
    role: str  # Primary, Secondary
    disk: str  # UpToDate, Outdated, Inconsistent, ...


@dataclass(frozen=True)
class NodeReport:
    """What one node's agent publishes (bound to its lease: gone when the lease is)."""

    node: str
    guests: Mapping[str, str] = field(default_factory=dict)  # guest -> libvirt state
    resources: Mapping[str, ResourceObs] = field(default_factory=dict)
    done: Mapping[str, int] = field(default_factory=dict)  # guest -> last seq carried out
    failed: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # guest -> (seq, why)

    def active(self, guest: str) -> bool:
        return self.guests.get(guest, "stopped") not in ("stopped", "undefined")


@dataclass(frozen=True)
class Observed:
    now: float  # unix time
    reports: Mapping[str, NodeReport]  # the nodes whose agent holds a lease
    frozen: frozenset[str] = frozenset()  # agents stopped cleanly
    maintenance: frozenset[str] = frozenset()
    primary: Mapping[str, str] = field(default_factory=dict)  # resource -> node with the key
    outdated: Mapping[str, frozenset[str]] = field(default_factory=dict)  # resource -> nodes
    lost_since: Mapping[str, float] = field(default_factory=dict)  # node -> seen gone at


@dataclass(frozen=True)
class GuestSpec:
    name: str
    disks: tuple[str, ...]
    ha: HaMode
    nodes: tuple[str, ...]  # nodes with libvirt and a disk of every resource, file order
    prefer: tuple[str, ...] = ()
    max_restart: int = 1
    max_relocate: int = 1


@dataclass(frozen=True)
class Request:
    """What `hvctl guest start|stop|move` asked for; `seq` grows with every request."""

    state: HaMode  # STARTED or STOPPED
    node: str | None = None  # move/start target
    seq: int = 0


@dataclass(frozen=True)
class Record:
    """The leader's state of one HA guest, and the assignment the agents carry out."""

    state: State
    node: str | None  # where it runs, is to run, or last ran
    want: Want
    seq: int = 0  # grows with every new assignment
    restarts: int = 0
    relocations: int = 0
    not_before: float = 0.0  # unix time: the assignment waits until then (backoff)
    target: str | None = None  # RELOCATE: where it starts once stopped
    request_seq: int = 0  # the last Request taken
    reason: str = ""
    since: float = 0.0  # unix time of the last state change


@dataclass(frozen=True)
class Decision:
    guest: str
    rule: str
    before: State
    after: State
    node: str | None
    text: str
    time: float
