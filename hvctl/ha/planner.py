"""The HA planner: `plan(observed, specs, requests, records) -> Plan`. Pure: no I/O, no await.

Theory of operation
-------------------
One agent at a time is the leader (an etcd election, hvctl/ha/agent.py). Every round it
reads what the agents report, the fencing keys of rblock and the requests of `hvctl guest
start|stop|move`, and calls `plan`. For every HA guest, `classify` turns the observations
into ONE event (the first that applies, in this order):

    NODE_FROZEN / NODE_FENCED / NODE_LOST   the guest's node has no agent lease: stopped
                     cleanly (frozen: left alone until the agent is back, as Proxmox's
                     freeze), or lost with every resource of the guest released
                     (no rblock primary key held there: nothing there can write: fenced), or
                     lost with a key still held (a copy there may still run and write)
    REQUEST          a new `hvctl guest start|stop|move`
    FAILED           the node's agent failed the current assignment
    WANT_STOP / WANT_START   the desired state (request, else the config's `ha`) differs
    MAINTENANCE      the guest runs on a node in maintenance
    RUNNING / NOT_RUNNING    the node carried out the current assignment; what it sees now
    WAITING          nothing new

and `TABLE[(state, event)]` names the rule that makes the new record. A (state, event) pair
the table does not list is a bug, raised as such, never a rule that runs in any state. Every
record change is a `Decision` that carries the rule's name and a sentence for `hvctl ha log`.

The record is also the assignment: `node` + `want` (RUN, STOP, KEEP) + `seq`. The agent of
that node carries it out and reports `done[guest] = seq` (or `failed`); a guest runs only
where a record says RUN. The safety rules:

- new-node-only-when-old-is-done: a record moves to another node only once the old node
  carried out STOP (reported the guest not running, its disks Secondary), or is fenced
  (lost, and rblock's primary key of every disk of the guest is gone: the lease of the
  rblock node there ran out, so a copy that lingers cannot complete a write).
- keep-while-unsure: a lost node's guest is FENCE with want KEEP: if its agent comes back
  (an agent restart), it adopts the guest running there, and if the guest is gone there it
  is recovered; it is never started there again by an old RUN.
- up-to-date-only: recovery and placement pick only nodes whose agent is online, not in
  maintenance, with every disk of the guest UpToDate and not recorded Outdated in etcd, and
  no other node holding its primary key; `prefer` orders them, then the fewest guests.
- preferred-first: a start (not a recovery) waits up to PREFERRED_WAIT_S for a preferred
  node whose agent the leader has not seen yet (a booting cluster).
- no-failback: a guest recovered elsewhere stays there when its old node returns (a
  flapping link causes no ping-pong). Restarts on the same node are bounded by
  `max_restart`, with an exponential backoff; then `max_relocate` other nodes are tried;
  then the state is ERROR until a new request.

The agent of each node decides what to do with its own guests from the records
(hvctl/ha/local.py), including self-fencing when it cannot renew its lease.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from hvctl.ha.model import (
    Decision,
    GuestSpec,
    HaMode,
    Observed,
    Record,
    Request,
    State,
    Want,
)

BACKOFF_BASE_S = 2.0  # the first restart after a failure waits this long, then doubles
BACKOFF_MAX_S = 60.0
# A start (not a recovery) waits this long for a preferred node whose agent is not online
# yet, e.g. while a cluster boots and the agents come up one by one.
PREFERRED_WAIT_S = 15.0
UPTODATE = "UpToDate"

ON_NODE = frozenset({State.STARTING, State.STARTED, State.STOPPING, State.RELOCATE,
                     State.FENCE, State.RECOVERY, State.FREEZE})


class Ev(enum.Enum):
    NODE_LOST = "node-lost"
    NODE_FENCED = "node-fenced"
    NODE_FROZEN = "node-frozen"
    REQUEST = "request"
    FAILED = "failed"
    WANT_STOP = "want-stop"
    WANT_START = "want-start"
    MAINTENANCE = "maintenance"
    RUNNING = "running"
    NOT_RUNNING = "not-running"
    WAITING = "waiting"


class PlannerBug(AssertionError):
    """An event the table does not list for a state."""


@dataclass(frozen=True)
class Plan:
    records: dict[str, Record]  # every HA guest's record after this round
    changed: dict[str, Record]  # those that differ from the input
    removed: list[str]  # records of guests no longer HA-managed
    decisions: list[Decision]


@dataclass
class _Ctx:
    rec: Record
    spec: GuestSpec
    obs: Observed
    req: Request
    load: dict[str, int]  # node -> guests assigned RUN there (placement spreads them)

    @property
    def want_running(self) -> bool:
        return self.req.state is HaMode.STARTED

    def lost_text(self) -> str:
        node = self.rec.node
        since = self.obs.lost_since.get(node or "")
        when = f" (lease expired {clock(since)})" if since else ""
        return f"{node} lost{when}"


Rule = Callable[[_Ctx], tuple[Record, str]]


def clock(t: float) -> str:
    lt = time.localtime(t)
    return time.strftime("%H:%M:%S", lt) + f".{int(t * 10) % 10}"


def backoff_s(restarts: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, restarts - 1))


# --- placement ----------------------------------------------------------------------------------

def refusal(spec: GuestSpec, node: str, obs: Observed, holder_ok: str | None = None) -> str:
    """Why NODE cannot run SPEC's guest now ("" if it can). HOLDER_OK: a node that may hold
    the primary keys meanwhile (the node a relocation stops it on first)."""
    if node not in spec.nodes:
        return f"{node} has no libvirt or no disk of {', '.join(spec.disks)}"
    report = obs.reports.get(node)
    if report is None:
        return f"{node}'s agent is {'stopped' if node in obs.frozen else 'not online'}"
    if node in obs.maintenance:
        return f"{node} is in maintenance"
    for r in spec.disks:
        res = report.resources.get(r)
        if res is None:
            return f"{r} not reported by {node} (is its rblock node up?)"
        if node in obs.outdated.get(r, frozenset()):
            return f"{r} on {node} is recorded Outdated in etcd"
        if res.disk != UPTODATE:
            return f"{r} on {node} is {res.disk}"
        holder = obs.primary.get(r)
        if holder is not None and holder not in (node, holder_ok):
            return f"{r} is Primary on {holder}"
    return ""


def place(ctx: _Ctx, exclude: tuple[str, ...] = (), only: str | None = None,
          holder_ok: str | None = None) -> tuple[str | None, str]:
    """The node to run the guest on and why, or (None, why not)."""
    spec, obs = ctx.spec, ctx.obs
    nodes = [only] if only is not None else [n for n in spec.nodes if n not in exclude]
    refused: list[str] = []
    ok: list[str] = []
    for n in nodes:
        why = refusal(spec, n, obs, holder_ok)
        (refused.append(why) if why else ok.append(n))
    if not ok:
        return None, "; ".join(refused) or "no node can run it"

    def rank(n: str) -> tuple[int, int, int]:
        pref = spec.prefer.index(n) if n in spec.prefer else len(spec.prefer)
        return pref, ctx.load.get(n, 0), spec.nodes.index(n)

    best = min(ok, key=rank)
    disks = ", ".join(spec.disks)
    return best, f"{disks} UpToDate on {best}, not outdated"


# --- the rules ----------------------------------------------------------------------------------

def _assign(ctx: _Ctx, state: State, node: str | None, want: Want, reason: str,
            **kw: object) -> Record:
    rec = ctx.rec
    new_assignment = (node, want) != (rec.node, rec.want) or kw.pop("again", False)
    return replace(rec, state=state, node=node, want=want,
                   seq=rec.seq + 1 if new_assignment else rec.seq, reason=reason,
                   since=ctx.obs.now if state is not rec.state else rec.since, **kw)


def hold(ctx: _Ctx) -> tuple[Record, str]:
    return ctx.rec, ""


def start(ctx: _Ctx, only: str | None = None) -> tuple[Record, str]:
    obs = ctx.obs
    if only is None:
        for n in ctx.spec.prefer:
            since = obs.lost_since.get(n)
            if n not in obs.reports and since is not None and \
                    obs.now - since < PREFERRED_WAIT_S and n not in obs.frozen:
                text = (f"waiting up to {PREFERRED_WAIT_S:g} s for {n}'s agent (preferred) "
                        "before starting elsewhere")
                return replace(ctx.rec, reason=text), ("" if text == ctx.rec.reason
                                                       else text)
            if n in obs.reports:
                break
    node, why = place(ctx, only=only)
    if node is None:
        text = f"cannot start: {why}"
        return replace(ctx.rec, reason=text), ("" if text == ctx.rec.reason else text)
    text = f"starting on {node} ({why})"
    return _assign(ctx, State.STARTING, node, Want.RUN, text, restarts=0, relocations=0,
                   not_before=0.0, target=None), text


def take_request(ctx: _Ctx) -> tuple[Record, str]:
    rec, req = ctx.rec, ctx.req
    ctx.rec = rec = replace(rec, request_seq=req.seq)
    if req.state is HaMode.STOPPED:
        if rec.want is Want.RUN or rec.state in (State.STARTED, State.STARTING,
                                                 State.RELOCATE):
            text = f"stop requested; stopping on {rec.node}"
            return _assign(ctx, State.STOPPING, rec.node, Want.STOP, text, target=None), text
        text = "stop requested; it is not running"
        return _assign(ctx, State.STOPPED, rec.node, Want.STOP, text, restarts=0,
                       relocations=0), text
    if rec.state in (State.STARTED, State.STARTING) and rec.node is not None:
        if req.node is None or req.node == rec.node:
            return replace(rec, reason=f"start requested; it runs on {rec.node}"), ""
        return relocate(ctx, req.node, "move requested")
    if rec.state in (State.STOPPING, State.RELOCATE) and rec.node is not None:
        if req.node is None or req.node == rec.node:
            text = f"start requested; keeping it on {rec.node}"
            return _assign(ctx, State.STARTING, rec.node, Want.RUN, text, target=None), text
        return relocate(ctx, req.node, "move requested")
    return start(ctx, only=req.node)


def relocate(ctx: _Ctx, to: str | None, why: str) -> tuple[Record, str]:
    rec = ctx.rec
    if to is None:
        node, how = place(ctx, exclude=(rec.node or "",), holder_ok=rec.node)
    else:
        node, how = place(ctx, only=to, holder_ok=rec.node)
        if node == rec.node:
            node, how = None, f"it already runs on {to}"
    if node is None:
        text = f"{why}, but no node can take it: {how}"
        return replace(rec, reason=text), (text if text != rec.reason else "")
    text = f"{why}; stopping on {rec.node} to start on {node} ({how})"
    return _assign(ctx, State.RELOCATE, rec.node, Want.STOP, text, target=node), text


def maintenance(ctx: _Ctx) -> tuple[Record, str]:
    return relocate(ctx, None, f"{ctx.rec.node} is in maintenance")


def relocated(ctx: _Ctx) -> tuple[Record, str]:
    """Stopped on the old node (its disks Secondary): start on the target."""
    rec = ctx.rec
    node, why = place(ctx, only=rec.target)
    if node is None:
        text = f"stopped on {rec.node}; cannot start on {rec.target}: {why}; starting back"
        node2, why2 = place(ctx)
        if node2 is None:
            text = f"stopped on {rec.node}; no node can run it: {why2}"
            return _assign(ctx, State.STOPPED, rec.node, Want.STOP, text, target=None), text
        return _assign(ctx, State.STARTING, node2, Want.RUN, text, target=None), text
    text = f"stopped on {rec.node}; starting on {node} ({why})"
    return _assign(ctx, State.STARTING, node, Want.RUN, text, target=None), text


def started(ctx: _Ctx) -> tuple[Record, str]:
    rec = ctx.rec
    text = f"running on {rec.node}"
    return replace(rec, state=State.STARTED, restarts=0, reason=text, not_before=0.0,
                   since=ctx.obs.now), text


def stopped(ctx: _Ctx) -> tuple[Record, str]:
    text = f"stopped on {ctx.rec.node}"
    return replace(ctx.rec, state=State.STOPPED, reason=text, since=ctx.obs.now), text


def stop(ctx: _Ctx) -> tuple[Record, str]:
    rec = ctx.rec
    text = f"desired state stopped; stopping on {rec.node}"
    return _assign(ctx, State.STOPPING, rec.node, Want.STOP, text, target=None), text


def stray(ctx: _Ctx) -> tuple[Record, str]:
    """Running on its node although it should be stopped (started by hand?): stop it."""
    rec = ctx.rec
    text = f"runs on {rec.node} but its desired state is stopped; stopping it"
    return _assign(ctx, State.STOPPING, rec.node, Want.STOP, text, again=True), text


def failed(ctx: _Ctx) -> tuple[Record, str]:
    """Start failed, or the guest stopped by itself: restart (bounded, with backoff), then
    another node (bounded), then ERROR."""
    rec, spec, obs = ctx.rec, ctx.spec, ctx.obs
    report = obs.reports.get(rec.node or "")
    why = ""
    if report is not None and (f := report.failed.get(spec.name)) is not None and \
            f[0] == rec.seq:
        why = f[1]
    what = f"start on {rec.node} failed: {why}" if why else f"not running on {rec.node}"
    if rec.restarts < spec.max_restart:
        n = rec.restarts + 1
        wait = backoff_s(n)
        text = f"{what}; restart {n} of {spec.max_restart} in {wait:g} s"
        return _assign(ctx, State.STARTING, rec.node, Want.RUN, text, again=True,
                       restarts=n, not_before=obs.now + wait), text
    if rec.relocations < spec.max_relocate:
        node, how = place(ctx, exclude=(rec.node or "",))
        if node is not None:
            n = rec.relocations + 1
            text = (f"{what}; max_restart {spec.max_restart} reached; relocation {n} of "
                    f"{spec.max_relocate}: starting on {node} ({how})")
            # The old node first stops what is left (its disks go Secondary): RELOCATE.
            return _assign(ctx, State.RELOCATE, rec.node, Want.STOP, text, target=node,
                           restarts=0, relocations=n), text
        what += f"; no other node can run it ({how})"
    text = (f"{what}; max_restart {spec.max_restart} and max_relocate {spec.max_relocate} "
            f"reached: error (a new 'hvctl guest start' tries again)")
    return _assign(ctx, State.ERROR, rec.node, Want.STOP, text), text


def stop_failed(ctx: _Ctx) -> tuple[Record, str]:
    rec = ctx.rec
    report = ctx.obs.reports.get(rec.node or "")
    f = report.failed.get(ctx.spec.name) if report else None
    text = f"stop on {rec.node} failed: {f[1] if f else '?'}; error"
    return _assign(ctx, State.ERROR, rec.node, Want.KEEP, text), text


def fence(ctx: _Ctx) -> tuple[Record, str]:
    rec = ctx.rec
    held = [r for r in ctx.spec.disks if ctx.obs.primary.get(r) == rec.node]
    text = (f"{ctx.lost_text()}; {', '.join(held)} still Primary there under a live rblock "
            f"lease: a copy may run; waiting for it to run out (or for {rec.node}'s agent)")
    if rec.state is State.FENCE and rec.reason == text:
        return rec, ""
    return _assign(ctx, State.FENCE, rec.node, Want.KEEP, text), text


def recover(ctx: _Ctx) -> tuple[Record, str]:
    """The node is fenced (or came back without the guest): run it elsewhere."""
    rec = ctx.rec
    gone = ctx.lost_text() if rec.node not in ctx.obs.reports else \
        f"{rec.node} is back without it"
    if not ctx.want_running:
        text = f"{gone}; desired state stopped: stopped"
        return _assign(ctx, State.STOPPED, rec.node, Want.STOP, text, target=None), text
    node, why = place(ctx)
    if node is None:
        text = f"{gone}; cannot recover: {why}"
        if rec.state is State.RECOVERY and rec.reason == text:
            return rec, ""
        return _assign(ctx, State.RECOVERY, rec.node, Want.KEEP, text), text
    text = f"{gone}; {why}; recovering on {node}"
    return _assign(ctx, State.STARTING, node, Want.RUN, text, target=None, restarts=0,
                   not_before=0.0), text


def freeze(ctx: _Ctx) -> tuple[Record, str]:
    rec = ctx.rec
    text = f"{rec.node}'s agent stopped cleanly: frozen (left as it is) until it is back"
    if rec.state is State.FREEZE:
        return rec, ""
    return replace(rec, state=State.FREEZE, reason=text, since=ctx.obs.now), text


def thaw(ctx: _Ctx) -> tuple[Record, str]:
    """FREEZE/FENCE/RECOVERY and the node's agent reports the guest running: adopt it."""
    rec = ctx.rec
    text = f"{rec.node}'s agent is back and {ctx.spec.name} runs there: adopted"
    return _assign(ctx, State.STARTED, rec.node, Want.RUN, text), text


def thaw_stopped(ctx: _Ctx) -> tuple[Record, str]:
    """FREEZE and the node's agent is back without the guest running: start it again."""
    if not ctx.want_running:
        return stopped(ctx)
    rec = ctx.rec
    text = f"{rec.node}'s agent is back and {ctx.spec.name} is not running there: restarting"
    return _assign(ctx, State.STARTING, rec.node, Want.RUN, text), text


def clear_error(ctx: _Ctx) -> tuple[Record, str]:
    ctx.rec = replace(ctx.rec, state=State.STOPPED, restarts=0, relocations=0)
    return take_request(ctx)


# --- the table ----------------------------------------------------------------------------------

_NODE_GONE: dict[Ev, Rule] = {Ev.NODE_LOST: fence, Ev.NODE_FENCED: recover,
                              Ev.NODE_FROZEN: freeze}

TABLE: dict[tuple[State, Ev], Rule] = {
    # STOPPED: nothing runs; its node does not matter.
    (State.STOPPED, Ev.REQUEST): take_request,
    (State.STOPPED, Ev.WANT_START): start,
    (State.STOPPED, Ev.FAILED): hold,  # an old stop failed; the guest is stopped now
    (State.STOPPED, Ev.RUNNING): stray,
    (State.STOPPED, Ev.NOT_RUNNING): hold,
    (State.STOPPED, Ev.WAITING): hold,

    (State.STARTING, Ev.REQUEST): take_request,
    (State.STARTING, Ev.FAILED): failed,
    (State.STARTING, Ev.WANT_STOP): stop,
    (State.STARTING, Ev.RUNNING): started,
    (State.STARTING, Ev.NOT_RUNNING): failed,
    (State.STARTING, Ev.WAITING): hold,

    (State.STARTED, Ev.REQUEST): take_request,
    (State.STARTED, Ev.FAILED): failed,
    (State.STARTED, Ev.WANT_STOP): stop,
    (State.STARTED, Ev.MAINTENANCE): maintenance,
    (State.STARTED, Ev.RUNNING): hold,
    (State.STARTED, Ev.NOT_RUNNING): failed,
    (State.STARTED, Ev.WAITING): hold,

    (State.STOPPING, Ev.REQUEST): take_request,
    (State.STOPPING, Ev.FAILED): stop_failed,
    (State.STOPPING, Ev.RUNNING): hold,  # the agent is still at it
    (State.STOPPING, Ev.NOT_RUNNING): stopped,
    (State.STOPPING, Ev.WAITING): hold,

    (State.RELOCATE, Ev.REQUEST): take_request,
    (State.RELOCATE, Ev.FAILED): stop_failed,
    (State.RELOCATE, Ev.WANT_STOP): stop,
    (State.RELOCATE, Ev.RUNNING): hold,
    (State.RELOCATE, Ev.NOT_RUNNING): relocated,
    (State.RELOCATE, Ev.WAITING): hold,

    # FENCE, FREEZE: want KEEP; once the node's agent is back, what it sees settles them.
    (State.FENCE, Ev.RUNNING): thaw,
    (State.FENCE, Ev.NOT_RUNNING): recover,
    (State.FREEZE, Ev.RUNNING): thaw,
    (State.FREEZE, Ev.NOT_RUNNING): thaw_stopped,

    (State.RECOVERY, Ev.REQUEST): take_request,
    (State.RECOVERY, Ev.RUNNING): thaw,
    (State.RECOVERY, Ev.NOT_RUNNING): recover,

    (State.ERROR, Ev.REQUEST): clear_error,
    (State.ERROR, Ev.FAILED): hold,
    (State.ERROR, Ev.RUNNING): hold,
    (State.ERROR, Ev.NOT_RUNNING): hold,
    (State.ERROR, Ev.WAITING): hold,
    **{(s, e): rule for s in ON_NODE for e, rule in _NODE_GONE.items()},
}


def classify(rec: Record, spec: GuestSpec, obs: Observed, req: Request) -> Ev:
    node = rec.node
    report = obs.reports.get(node) if node is not None else None
    if rec.state in ON_NODE and report is None:
        if node in obs.frozen:
            return Ev.NODE_FROZEN  # the operator stopped the agent: hands off until it is back
        released = not any(obs.primary.get(r) == node for r in spec.disks)
        return Ev.NODE_FENCED if released else Ev.NODE_LOST
    if rec.state in (State.FENCE, State.FREEZE):  # its agent is back: what does it see?
        return Ev.RUNNING if report.active(spec.name) else Ev.NOT_RUNNING
    if req.seq > rec.request_seq:
        return Ev.REQUEST
    if report is not None and rec.want is not Want.KEEP and \
            (f := report.failed.get(spec.name)) is not None and f[0] == rec.seq:
        return Ev.FAILED
    want_running = req.state is HaMode.STARTED
    if rec.state in (State.STARTING, State.STARTED, State.RELOCATE) and not want_running:
        return Ev.WANT_STOP
    if rec.state is State.STOPPED and want_running:
        return Ev.WANT_START
    if rec.state is State.STARTED and node in obs.maintenance:
        return Ev.MAINTENANCE
    if report is not None and (rec.want is Want.KEEP or
                               report.done.get(spec.name, 0) >= rec.seq):
        return Ev.RUNNING if report.active(spec.name) else Ev.NOT_RUNNING
    return Ev.WAITING


def initial(spec: GuestSpec, obs: Observed) -> Record:
    """A guest HA sees for the first time: adopt it where it runs, else stopped."""
    running = [n for n, r in sorted(obs.reports.items()) if r.active(spec.name)]
    if running:
        holders = [n for n in running if all(obs.primary.get(d) == n for d in spec.disks)]
        node = (holders or running)[0]
        return Record(State.STARTED, node, Want.RUN, seq=1, since=obs.now,
                      reason=f"found running on {node}: adopted")
    return Record(State.STOPPED, None, Want.STOP, seq=0, since=obs.now, reason="")


def desired(spec: GuestSpec, req: Request | None) -> Request:
    if req is not None:
        return req
    return Request(spec.ha if spec.ha is not HaMode.DISABLED else HaMode.STOPPED)


def plan(obs: Observed, specs: Mapping[str, GuestSpec], requests: Mapping[str, Request],
         records: Mapping[str, Record]) -> Plan:
    out: dict[str, Record] = {}
    changed: dict[str, Record] = {}
    decisions: list[Decision] = []
    load: dict[str, int] = {}
    for name, rec in records.items():
        if rec.want is Want.RUN and rec.node is not None and name in specs:
            load[rec.node] = load.get(rec.node, 0) + 1
    for name in sorted(specs):
        spec = specs[name]
        if spec.ha is HaMode.DISABLED:
            continue
        old = records.get(name)
        rec = old if old is not None else initial(spec, obs)
        req = desired(spec, requests.get(name))
        ev = classify(rec, spec, obs, req)
        try:
            rule = TABLE[(rec.state, ev)]
        except KeyError:
            raise PlannerBug(f"{name}: no rule for ({rec.state.value}, {ev.value})") from None
        ctx = _Ctx(rec, spec, obs, req, load)
        new, text = rule(ctx)
        if new.want is not rec.want or new.node != rec.node:
            if rec.want is Want.RUN and rec.node is not None:
                load[rec.node] = load.get(rec.node, 1) - 1
            if new.want is Want.RUN and new.node is not None:
                load[new.node] = load.get(new.node, 0) + 1
        out[name] = new
        if new != old:
            changed[name] = new
        if text:
            decisions.append(Decision(name, rule.__name__.replace("_", "-"), rec.state,
                                      new.state, new.node, text, obs.now))
    removed = [n for n in records if n not in out]
    return Plan(out, changed, removed, decisions)


def what_if(node: str, obs: Observed, specs: Mapping[str, GuestSpec],
            requests: Mapping[str, Request], records: Mapping[str, Record]) -> Plan:
    """What the leader would decide if NODE died now: its agent's lease and its rblock keys
    gone (so the answer is the plan once fencing is proven)."""
    dead = replace(obs, reports={n: r for n, r in obs.reports.items() if n != node},
                   frozen=obs.frozen - {node},
                   primary={r: n for r, n in obs.primary.items() if n != node},
                   lost_since={n: t for n, t in obs.lost_since.items() if n != node})
    return plan(dead, specs, requests, records)
