"""What a `jax.profiler` trace says about where device time went: per device timeline (a GPU stream, an XLA:CPU
worker thread), how many events ran, how much of the traced span they kept it busy (the union of their intervals,
so nested or overlapping events count once), and the events that took the most time.

A decode step that keeps its stream busy only a small share of the span is bound by launches and host work, not by
its kernels; one that is busy throughout is bound by the kernels listed first.

Usage: python benchmarks/trace_summary.py TRACE_DIR [--top N] [--per N]  (TRACE_DIR is `jax.profiler.trace`'s
log_dir, traced with `create_perfetto_trace=True`; the newest perfetto_trace.json.gz under it is read.)
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HOST_THREADS_SKIPPED = ("python",)  # the Python thread's events are host calls that contain the device work


@dataclass
class Timeline:
    """The complete ('X') events of one thread of one traced process, in microseconds."""
    process: str
    thread: str
    intervals: list[tuple[float, float]] = field(default_factory=list)
    by_name: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, start: float, duration: float) -> None:
        self.intervals.append((start, start + duration))
        self.by_name[name].append(duration)

    @property
    def events(self) -> int:
        return len(self.intervals)

    @property
    def span(self) -> float:
        return max(end for _, end in self.intervals) - min(start for start, _ in self.intervals)

    @property
    def busy(self) -> float:
        """Time covered by at least one event (the union of the intervals)."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.intervals):
            if end <= reach:
                continue
            total += end - max(start, reach)
            reach = end
        return total

    def top(self, n: int) -> list[tuple[str, int, float]]:
        """(name, count, total microseconds) of the `n` names with the most total time."""
        rows = [(name, len(durations), sum(durations)) for name, durations in self.by_name.items()]
        return sorted(rows, key=lambda row: -row[2])[:n]


def newest_trace(trace_dir: Path) -> Path:
    traces = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir} (trace with create_perfetto_trace=True)")
    return traces[-1]


def timelines(events: list[dict]) -> list[Timeline]:
    """The device timelines of a trace: every thread of each '/device:...' process; without any (XLA:CPU runs on
    host threads), every host thread but the Python one."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    found: dict[tuple, Timeline] = {}
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        key = (event["pid"], event.get("tid"))
        if key not in found:
            found[key] = Timeline(processes.get(key[0], str(key[0])), threads.get(key, str(key[1])))
        found[key].add(event.get("name", "?"), float(event["ts"]), float(event["dur"]))
    device = [t for t in found.values() if t.process.startswith("/device:")]
    return device or [t for t in found.values() if not t.thread.startswith(HOST_THREADS_SKIPPED)]


def summarize(trace_dir: Path, top: int = 12, per: int | None = None) -> list[str]:
    """Printable lines: per device timeline (most busy first), its events, busy time, span and busy share, then its
    `top` events by total time; with `per` (e.g. generated tokens), events and busy time per unit too."""
    path = newest_trace(trace_dir)
    with gzip.open(path, "rt") as handle:
        data = json.load(handle)
    events = data["traceEvents"] if isinstance(data, dict) else data
    lines = [f"trace {path}"]
    for timeline in sorted(timelines(events), key=lambda t: -t.busy):
        busy, span = timeline.busy, timeline.span
        line = (f"{timeline.process} | {timeline.thread}: {timeline.events} events, busy {busy / 1e3:.2f} ms of "
                f"{span / 1e3:.2f} ms ({busy / span if span else 0.0:.0%})")
        if per:
            line += f"; per unit: {timeline.events / per:.1f} events, {busy / per:.1f} us busy"
        lines.append(line)
        for name, count, total in timeline.top(top):
            lines.append(f"    {total / 1e3:9.3f} ms {count:7d}x {total / count:9.2f} us  {name[:110]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--top", type=int, default=12, help="events listed per timeline, by total time")
    parser.add_argument("--per", type=int, default=None, help="also report events and busy time per this many units")
    args = parser.parse_args()
    print("\n".join(summarize(args.trace_dir, args.top, args.per)))


if __name__ == "__main__":
    main()
