"""Man pages and bash completion for `rblock` and `hvctl`, generated from the argparse parsers
that `--help` prints (`rblock.cli.build_parser`, `hvctl.cli.build_parser`).

    python -m tools.cli_docs OUTDIR   # OUTDIR/man1/{rblock,hvctl}.1, OUTDIR/completions/{rblock,hvctl}

Theory of operation: there is one definition of each command line, the parser its CLI module
builds; this file only renders it. argparse-manpage turns the parser into a page (every
subcommand, nested ones too, with its usage, description and options); shtab turns it into a
bash completion function (`_shtab_rblock`, `_shtab_hvctl`: subcommands, options, choices). A
new subcommand or option therefore shows up in the page and the completion at the next
`make deb`, and a test (tests/test_package.py) checks that every one of them does.

What this file adds is what a parser cannot know: the page's FILES and SEE ALSO sections
(where the Debian package puts things), and which arguments complete as file names. It
changes the freshly built parser objects it renders (group titles and order, `complete`
hints), never the definitions in the CLI modules.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

TOOLS = ("rblock", "hvctl")
MANUAL_TITLE = "rblock and hvctl"
MAN_SECTION = 1
# The requests argparse-manpage and this file emit; any other line that starts with "." or
# "'" is text (a help such as "... and this key") that groff would take for a request.
MAN_REQUESTS = frozenset(("TH", "SH", "SS", "TP", "RS", "RE", "B", "I", "BR", "IR", "nf", "fi",
                          "UR", "UE", "PP", "IP"))
# Arguments whose values are paths complete as file names (shtab's FILE); by metavar.
FILE_METAVARS = ("FILE", "PATH", "IMAGE")

SUMMARY = {
    "rblock": "replicated block devices over NBD (DRBD's job, in userspace)",
    "hvctl": "run KVM guests on rblock disks through libvirt, with HA",
}

# Packaging facts (tools/build_deb.py and contrib/systemd/): groff text per section.
FILES = {
    "rblock": r"""
.TP
.I /etc/rblock/cluster.toml
The cluster file: resources, nodes, fencing (the default \fB\-\-config\fR).
.TP
.I /etc/default/rblock
Settings of the systemd units: \fBRBLOCK_CONFIG\fR, \fBRBLOCK_UP_OPTS\fR (e.g.
\fB\-\-node\fR \fINAME\fR when the host's name is not its node name).
.TP
.I /run/rblock/
Run directory for Unix control sockets (\fBcontrol = "unix:/run/rblock/NAME.sock"\fR).
.TP
.I /lib/systemd/system/rblock.service
\fBrblock up\fR for this host's node.
.TP
.I /usr/share/doc/rblock/README.md
The walkthrough: two nodes, status, roles, split brain, TLS, fencing.
""",
    "hvctl": r"""
.TP
.I /etc/rblock/cluster.toml
The cluster file, with the \fB[hvctl]\fR and \fB[guest.NAME]\fR tables (the default
\fB\-\-config\fR).
.TP
.I /etc/default/rblock
Settings of the systemd units: \fBRBLOCK_CONFIG\fR, \fBHVCTL_AGENT_OPTS\fR,
\fBHVCTL_WEB_LISTEN\fR, \fBHVCTL_WEB_TLS\fR.
.TP
.I /lib/systemd/system/hvctl-agent.service
The HA agent of this host.
.TP
.I /lib/systemd/system/hvctl-web.service
The web page and REST API, on every host.
.TP
.I /usr/share/doc/rblock/README.md
Guests, HA, the web page.
""",
}
SEE_ALSO = {
    "rblock": ".BR hvctl (1),\n.BR nbdinfo (1),\n.BR systemctl (1)",
    "hvctl": ".BR rblock (1),\n.BR virsh (1),\n.BR systemctl (1)",
}


def build_parser(tool: str) -> argparse.ArgumentParser:
    """A fresh parser of TOOL, from its CLI module (the definition --help prints)."""
    if tool == "rblock":
        from rblock.cli import build_parser as build
    elif tool == "hvctl":
        from hvctl.cli import build_parser as build
    else:
        raise ValueError(f"unknown tool {tool!r}; tools: {', '.join(TOOLS)}")
    parser = build()
    assert parser.prog == tool, (parser.prog, tool)
    return parser


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (subcommand path, parser) of PARSER, itself first: (("guest", "start"), p)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias names the same parser again
                    seen.add(id(sub))
                    yield from walk(sub, (*path, name))


def manpage(tool: str, version: str, date: str | None = None) -> str:
    """TOOL's man page (groff -man), rendered by argparse-manpage from its parser."""
    from argparse_manpage.manpage import Manpage

    parser = build_parser(tool)
    for _path, p in walk(parser):
        for group in p._action_groups:
            if any(isinstance(a, argparse._SubParsersAction) for a in group._group_actions):
                group.title = "commands"  # argparse's "positional arguments"
    # OPTIONS before COMMANDS (the subcommands' group last), as man pages have them; the
    # SYNOPSIS says COMMAND, the COMMANDS section lists them (not a brace list too wide to fill)
    parser._action_groups.sort(key=lambda g: g.title == "commands")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = "COMMAND"
    page = Manpage(parser, format="single-commands-section", _data={
        "project_name": "rblock", "version": version, "manual_title": MANUAL_TITLE,
        "manual_section": MAN_SECTION, "description": SUMMARY[tool],
        **({"date": date} if date else {}),  # else SOURCE_DATE_EPOCH's, else today
    })
    page.add_section("files", "=", FILES[tool].strip())
    page.add_section("see also", "=", SEE_ALSO[tool])
    # argparse-manpage puts the parser's epilog under COMMENTS: NOTES is man-pages(7)'s name
    text = str(page).replace("\n.SH COMMENTS\n", "\n.SH NOTES\n")
    return "".join(_text_line(line) for line in text.splitlines(keepends=True))


def _text_line(line: str) -> str:
    """LINE, with a leading "." or "'" made literal (\\&) unless it starts a request."""
    if line[:1] == "'" or (line[:1] == "." and line[1:].split(" ", 1)[0].strip()
                           not in MAN_REQUESTS):
        return "\\&" + line
    return line


def completion(tool: str) -> str:
    """TOOL's bash completion script (function _shtab_TOOL), rendered by shtab."""
    import shtab

    parser = build_parser(tool)
    for _path, p in walk(parser):
        for action in p._actions:
            if action.metavar in FILE_METAVARS:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return shtab.complete(parser, shell="bash")


def write_all(out: Path, version: str, date: str | None = None) -> list[Path]:
    """OUT/man1/TOOL.1 and OUT/completions/TOOL for both tools; returns the paths."""
    written = []
    for tool in TOOLS:
        for path, text in ((out / f"man{MAN_SECTION}" / f"{tool}.{MAN_SECTION}",
                            manpage(tool, version, date)),
                           (out / "completions" / tool, completion(tool))):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.cli_docs",
                                 description="man pages and bash completion from the parsers")
    ap.add_argument("out", type=Path, help="directory: man1/ and completions/ go in it")
    ap.add_argument("--version", default=None, help="the version the pages name "
                    "(default: pyproject.toml's)")
    args = ap.parse_args(argv)
    version = args.version or project_version()
    t0 = time.monotonic()
    for path in write_all(args.out, version):
        print(path)
    print(f"done in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


def project_version() -> str:
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["version"]


if __name__ == "__main__":
    raise SystemExit(main())
