"""Merge the shutdown trace files of all processes into one timeline and name what never finished.

``tpserve trace DIR`` reads every ``DIR/*.log`` written by ``shutdown_trace``, prints one line per
event, writes a self-contained HTML swimlane chart (inline SVG, no dependency) and a verdict per
process. Why a verdict: a hung shutdown leaves several processes' logs, and the question is always
which process stopped where; the last phase it reached, plus any stack dump its watchdog left,
answers it.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import html
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tpserve.shutdown_trace import COLUMNS, MAGIC

# (component, phase) pairs that mean a process's shutdown finished; extend in place.
TERMINAL_PHASES: set[tuple[str, str]] = {("proxy", "exit"), ("worker", "exit")}
DUMP_COMPONENT, DUMP_PHASE = "faulthandler", "stack dump"

_UNESCAPE = {"t": "\t", "n": "\n", "r": "\r"}


@dataclass(frozen=True)
class Event:
    """One trace line, or a stack dump (``dump`` set) placed right after the line it followed."""

    wall: float
    mono: float
    host: str
    pid: int
    rank: str
    tid: int
    thread: str
    component: str
    phase: str
    fields: dict[str, str]
    source: str
    dump: str | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.pid}"

    @property
    def proc(self) -> tuple[str, int]:
        return self.host, self.pid


@dataclass
class Verdict:
    """How far one process's shutdown got."""

    host: str
    pid: int
    rank: str
    finished: bool
    last: Event
    dumps: list[Event]

    @property
    def where(self) -> str:
        return f"{self.host}:{self.pid}"


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m[1], m[1]), s)


def _parse_wall(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def parse_line(line: str, source: str = "") -> Event | None:
    """The event of one trace line, or None for any other line (a stack dump, noise)."""
    cols = line.split("\t")
    if len(cols) < len(COLUMNS) or cols[0] != MAGIC:
        return None
    try:
        wall, mono, pid, tid = _parse_wall(cols[1]), float(cols[2]), int(cols[4]), int(cols[6])
    except ValueError:
        return None
    fields = {}
    for kv in cols[len(COLUMNS) :]:
        key, _, value = kv.partition("=")
        fields[_unescape(key)] = _unescape(value)
    host, rank, thread, component, phase = (_unescape(cols[i]) for i in (3, 5, 7, 8, 9))
    return Event(wall, mono, host, pid, rank, tid, thread, component, phase, fields, source)


def _dump_event(lines: list[str], anchor: Event) -> Event:
    text = "\n".join(lines).strip("\n")
    fields = {"lines": str(text.count("\n") + 1)}
    return dataclasses.replace(anchor, component=DUMP_COMPONENT, phase=DUMP_PHASE, fields=fields, dump=text)


def _file_anchor(path: Path) -> Event:
    """Stand-in identity for a file holding a dump but no trace line: ``<host>.<pid>.log``."""
    host, _, pid = path.stem.rpartition(".")
    if not pid.isdigit():
        host, pid = path.stem, "0"
    return Event(path.stat().st_mtime, 0.0, host, int(pid), "-", 0, "?", "", "", {}, str(path))


def _parse_file(path: Path) -> list[Event]:
    events: list[Event] = []
    pending: list[str] = []  # non-trace lines since the last trace line: a stack dump
    for raw in path.read_bytes().split(b"\n"):
        line = raw.decode("utf-8", "replace").rstrip("\r")
        event = parse_line(line, str(path))
        if event is None:
            if line.strip() or pending:
                pending.append(line)
            continue
        if pending:
            events.append(_dump_event(pending, events[-1] if events else event))
            pending = []
        events.append(event)
    if pending:
        events.append(_dump_event(pending, events[-1] if events else _file_anchor(path)))
    return events


def load(directory: str | os.PathLike[str]) -> list[Event]:
    """Every event (stack dumps included) of every ``*.log`` in ``directory``, in file order."""
    events: list[Event] = []
    for path in sorted(Path(directory).glob("*.log")):
        if path.is_file():
            events.extend(_parse_file(path))
    return events


def merge(events: Iterable[Event]) -> list[Event]:
    """One timeline: each process's events in monotonic order (immune to wall clock steps),
    interleaved across processes by wall time."""
    by_proc: dict[tuple[str, int], list[Event]] = {}
    for event in events:
        by_proc.setdefault(event.proc, []).append(event)
    runs = [sorted(run, key=lambda e: e.mono) for run in by_proc.values()]
    return list(heapq.merge(*runs, key=lambda e: e.wall))


def _rank_key(rank: str) -> tuple[int, int, str]:
    return (0, -1, rank) if rank == "-" else (1, int(rank), rank) if rank.isdigit() else (2, 0, rank)


def verdicts(events: list[Event]) -> list[Verdict]:
    """Per process, proxy first then by rank: finished (a ``TERMINAL_PHASES`` event) or not."""
    out: dict[tuple[str, int], Verdict] = {}
    for event in events:
        v = out.get(event.proc)
        if v is None:
            v = out[event.proc] = Verdict(event.host, event.pid, event.rank, False, event, [])
        if event.rank != "-":
            v.rank = event.rank
        if event.dump is not None:
            v.dumps.append(event)
            continue
        if v.last.dump is not None or not v.finished:
            v.last = event
        v.finished = v.finished or (event.component, event.phase) in TERMINAL_PHASES
    return sorted(out.values(), key=lambda v: (_rank_key(v.rank), v.host, v.pid))


def _ms(event: Event, t0: float) -> float:
    return (event.wall - t0) * 1e3


def _fields_text(event: Event) -> str:
    return " ".join(f"{k}={v}" for k, v in event.fields.items())


def _verdict_line(v: Verdict, t0: float) -> str:
    last = v.last
    if v.finished:  # the exit's fields say how (code=1 after a failed start, code=-15 for a SIGTERM)
        how = f" {_fields_text(last)}" if last.fields else ""
        return f"FINISHED {v.where} rank {v.rank}: {last.component}/{last.phase}{how} at +{_ms(last, t0):.1f} ms"
    return (
        f"UNFINISHED {v.where} rank {v.rank}: last phase {last.component}/{last.phase} "
        f"at +{_ms(last, t0):.1f} ms"
    )


def render_text(events: list[Event], results: list[Verdict]) -> str:
    """The terminal report: the timeline, the verdicts, then the stack dumps in full."""
    t0 = events[0].wall
    rows = [
        (
            f"+{_ms(e, t0):.3f}",
            e.where,
            e.rank,
            f"{e.thread}({e.tid})",
            e.component,
            e.phase,
            _fields_text(e) + (" (see stack dumps below)" if e.dump is not None else ""),
        )
        for e in events
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    start = datetime.fromtimestamp(t0, timezone.utc).isoformat(timespec="microseconds")
    out = [f"timeline: {len(events)} events from {len(results)} processes, ms since {start}"]
    for r in rows:
        out.append(
            "  ".join(
                [r[0].rjust(widths[0])]
                + [c.ljust(w) for c, w in zip(r[1:6], widths[1:], strict=True)]
                + [r[6]]
            ).rstrip()
        )
    out.append("")
    out.extend(_verdict_line(v, t0) for v in results)
    for v in results:
        for d in v.dumps:
            out.append("")
            out.append(f"stack dump from {v.where} rank {v.rank} at +{_ms(d, t0):.1f} ms ({d.source}):")
            out.extend(f"    {line}".rstrip() for line in (d.dump or "").split("\n"))
    return "\n".join(out)


_PALETTE = ("#1f77b4", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#ff7f0e")
_LABEL_W, _PLOT_W, _ROW_H, _HEAD_H, _TOP = 300, 1000, 22, 24, 34


def _tick_step(span_ms: float) -> float:
    raw = span_ms / 8
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _spans(events: list[Event]) -> list[tuple[Event, Event | None]]:
    """``<p> begin`` paired with the next ``<p> end`` on the same thread; None when it never ended."""
    open_: dict[tuple[tuple[str, int], int, str, str], list[Event]] = {}
    spans: list[tuple[Event, Event | None]] = []
    for e in events:
        base, _, kind = e.phase.rpartition(" ")
        key = (e.proc, e.tid, e.component, base)
        if kind == "begin":
            open_.setdefault(key, []).append(e)
        elif kind == "end" and open_.get(key):
            spans.append((open_[key].pop(), e))
    spans.extend((b, None) for stack in open_.values() for b in stack)
    return spans


def render_html(events: list[Event], results: list[Verdict]) -> str:
    """A self-contained swimlane chart: a lane per process, a row per thread, hover for details."""
    t0 = events[0].wall
    span_ms = max(_ms(events[-1], t0), 1.0)

    def x(ms: float) -> float:
        return _LABEL_W + ms / span_ms * _PLOT_W

    components = sorted({e.component for e in events if e.dump is None})
    color = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(components)}
    rows: dict[tuple[tuple[str, int], int], float] = {}
    svg: list[str] = []
    y = _TOP
    for v in results:
        state = "finished" if v.finished else "UNFINISHED"
        fill = "#e8f5e9" if v.finished else "#ffebee"
        names: dict[int, str] = {}
        for e in events:
            if e.proc == (v.host, v.pid):
                names.setdefault(e.tid, e.thread)
        threads = sorted(names.items())
        lane_h = _HEAD_H + _ROW_H * len(threads)
        title = html.escape(_verdict_line(v, t0))
        svg.append(
            f'<g class="lane"><title>{title}</title>'
            f'<rect x="0" y="{y}" width="{_LABEL_W + _PLOT_W + 20}" height="{lane_h}" fill="{fill}"/>'
            f'<text x="6" y="{y + 16}" class="lane">{html.escape(f"{v.where} rank {v.rank}")}: {state}</text></g>'
        )
        y += _HEAD_H
        for tid, name in threads:
            rows[((v.host, v.pid), tid)] = y + _ROW_H / 2
            label = f"{name} ({tid})"
            short = label if len(label) <= 38 else label[:37] + "…"
            svg.append(
                f'<text x="18" y="{y + 15}"><title>{html.escape(label)}</title>{html.escape(short)}</text>'
                f'<line x1="{_LABEL_W}" x2="{_LABEL_W + _PLOT_W}" y1="{y + _ROW_H / 2}" y2="{y + _ROW_H / 2}" '
                'stroke="#ccc"/>'
            )
            y += _ROW_H
        y += 6
    for begin, end in _spans(events):
        cy = rows[(begin.proc, begin.tid)]
        x0, x1 = x(_ms(begin, t0)), x(_ms(end, t0) if end else span_ms)
        label = begin.phase.rpartition(" ")[0]
        tip = f"{begin.component}/{label}: " + (
            f"{end.fields.get('duration_ms', '?')} ms" if end else "began, never ended"
        )
        style = (
            f'fill="{color[begin.component]}" fill-opacity="0.3"'
            if end
            else 'fill="#d32f2f" fill-opacity="0.25"'
        )
        svg.append(
            f'<rect x="{x0:.1f}" y="{cy - 7}" width="{max(x1 - x0, 1):.1f}" height="14" {style}>'
            f"<title>{html.escape(tip)}</title></rect>"
        )
    for e in events:
        cx, cy = x(_ms(e, t0)), rows[(e.proc, e.tid)]
        tip = html.escape(
            f"+{_ms(e, t0):.3f} ms {e.where} rank {e.rank} {e.thread}\n{e.component}/{e.phase} {_fields_text(e)}"
        )
        if e.dump is not None:
            shape = f'<path d="M{cx:.1f},{cy - 7} l6,12 h-12 z" fill="#b71c1c"><title>{tip}</title></path>'
        else:
            terminal = (e.component, e.phase) in TERMINAL_PHASES
            fill = (
                "#2e7d32" if terminal else "#d32f2f" if e.phase.endswith(" OVERRUN") else color[e.component]
            )
            shape = f'<circle cx="{cx:.1f}" cy="{cy}" r="{6 if terminal else 4}" fill="{fill}"><title>{tip}</title></circle>'
        svg.append(shape)
    step = _tick_step(span_ms)
    ticks = [i * step for i in range(int(span_ms / step) + 1)]
    axis = "".join(
        f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{_TOP - 6}" y2="{y}" stroke="#eee"/>'
        f'<text x="{x(t):.1f}" y="{_TOP - 10}" text-anchor="middle">{t:g}</text>'
        for t in ticks
    )
    legend = " ".join(f'<span style="color:{color[c]}">&#9679; {html.escape(c)}</span>' for c in components)
    report = html.escape(render_text(events, results))
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>tpserve shutdown timeline</title><style>'
        "body{font:13px sans-serif;margin:16px} svg text{font:12px monospace} svg text.lane{font-weight:bold}"
        "pre{font:12px monospace;background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>"
        f"<h2>tpserve shutdown timeline</h2><p>time in ms from the first event; {legend}; "
        '<span style="color:#d32f2f">&#9679; OVERRUN / never ended</span> '
        '<span style="color:#2e7d32">&#9679; terminal phase</span> '
        '<span style="color:#b71c1c">&#9650; stack dump</span></p>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_LABEL_W + _PLOT_W + 20}" height="{y + 10}">'
        f"{axis}{''.join(svg)}</svg><h3>Report</h3><pre>{report}</pre></body></html>"
    )


def run(
    directory: str | os.PathLike[str], html_out: str | os.PathLike[str] | None = None, write_html: bool = True
) -> int:
    """Report on ``directory``: 0 when every process finished, 1 when one did not, 2 for no traces.
    The HTML goes to ``html_out``, by default ``directory/timeline.html``."""
    events = merge(load(directory))
    if not events:
        print(f"no trace files in {directory}", file=sys.stderr)
        return 2
    results = verdicts(events)
    print(render_text(events, results))
    if write_html:
        path = Path(html_out) if html_out is not None else Path(directory) / "timeline.html"
        path.write_text(render_html(events, results), encoding="utf-8")
        print(f"\nswimlane chart: {path}")
    return 0 if all(v.finished for v in results) else 1


def main(argv: list[str] | None = None) -> int:
    """``tpserve trace DIR [--html PATH | --no-html]``."""
    parser = argparse.ArgumentParser(
        prog="tpserve trace",
        description="Merge shutdown trace files into one timeline; name what never finished.",
    )
    parser.add_argument("dir", help="the TPSERVE_SHUTDOWN_TRACE_DIR of the run")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--html", metavar="PATH", help="where to write the swimlane chart (default DIR/timeline.html)"
    )
    group.add_argument("--no-html", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    return run(args.dir, html_out=args.html, write_html=not args.no_html)
