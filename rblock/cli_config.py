"""`rblock config show` and `rblock adjust`.

`config show` prints what this node runs with (rblock.config.effective: defaults filled in,
paths absolute, secrets hidden), as TOML with the file's keys (DRBD's `drbdadm dump`), or
JSON. The resource's nodes and the role of each node table are comments, so the text parses
as TOML.

`adjust` asks the running node to read its file again (POST /v1/adjust): it applies the
settings config.RUNTIME_KEYS lists and names the others that differ, which take a restart.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rblock.config import (
    EXAMPLE_SECRET,
    RUNTIME_KEYS,
    ClusterConfig,
    config_warnings,
    effective,
    format_size,
)

_SIZE_KEYS = ("size", "resync_rate")  # bytes in the JSON; "256M" in the text


def show(cfg: ClusterConfig, node: str, as_json: bool) -> str:
    view = effective(cfg, node)
    warnings = config_warnings(cfg, node)
    if as_json:
        return json.dumps({**view, "warnings": warnings}, indent=2)
    out = [f"# rblock config show: what node {node} runs with, from {cfg.path}",
           "# (defaults filled in, paths absolute, secrets hidden; this node's resources, the "
           "node and its peers)"]
    out += [f"# WARNING: {w}" for w in warnings]
    if view["cluster"] is not None:
        out += ["", "[cluster]"]
        out += [f"{k} = {_toml(v)}" for k, v in view["cluster"].items() if v is not None]
    if not view["resources"]:
        out += ["", f"# node {node} holds no resource (a witness)"]
    for name, t in view["resources"].items():
        out += ["", f"[resource.{name}]", f"# on nodes {', '.join(t['nodes'])}"]
        for k, v in t.items():
            if k == "nodes":
                continue
            line = f"{k} = {_toml(format_size(v) if k in _SIZE_KEYS else v)}"
            if k == "secret" and cfg.resources[name].secret == EXAMPLE_SECRET:
                line += f'  # WARNING: "{EXAMPLE_SECRET}", the example\'s'
            out.append(line)
    for name, t in view["nodes"].items():
        role = "this node" if name == node else "a peer (its addresses, as this node uses them)"
        out += ["", f"[node.{name}]  # {role}"]
        out += [f"{k} = {_toml(v)}" for k, v in t.items() if not isinstance(v, dict)]
        for sub in ("disk", "meta"):
            if t.get(sub):
                out += ["", f"[node.{name}.{sub}]"]
                out += [f"{r} = {_toml(p)}" for r, p in t[sub].items()]
    return "\n".join(out)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string (JSON's escapes are TOML's)


def format_adjust(result: dict) -> list[str]:
    """`rblock adjust`'s report, one line per setting."""
    lines = []
    for e in result["applied"]:
        lines.append(f"{e['key']}: {_change(e)}: applied, {e['when']}")
    for e in result["restart"]:
        lines.append(f"{e['key']}: {_change(e)}: not applied, takes a restart of the node "
                     f"(stop 'rblock up' and start it again)")
    return lines


def _change(e: dict) -> str:
    if e["key"].endswith(".secret"):
        return "changed"  # both sides are hidden
    return f"{_value(e['key'], e['old'])} -> {_value(e['key'], e['new'])}"


def _value(key: str, v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and key.rsplit(".", 1)[-1] in _SIZE_KEYS:
        return format_size(v) + ("/s" if key.endswith("resync_rate") else "")
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def run_adjust(result: dict, as_json: bool, cli_config: str) -> int:
    """Print the node's answer; 0 if something was applied, 1 if nothing was."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for line in format_adjust(result):
            print(line)
    if str(result["config"]) != cli_config:
        print(f"rblock: note: the node reads {result['config']}, not {cli_config}",
              file=sys.stderr)
    if result["applied"]:
        return 0
    if result["restart"]:
        print(f"rblock: nothing applied: what differs in {result['config']} takes a restart "
              f"of the node (run-time settings: {', '.join(RUNTIME_KEYS)})", file=sys.stderr)
    else:
        print(f"rblock: the node already runs with {result['config']} as it is; nothing done",
              file=sys.stderr)
    return 1
