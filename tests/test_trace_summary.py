"""benchmarks/trace_summary.py: busy time is the union of a timeline's events (checked against a microsecond grid),
device timelines are chosen over host ones, and a real XLA:CPU trace of a jitted program is read."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from trace_summary import summarize, timelines  # noqa: E402


def write_trace(directory: Path, events: list[dict]) -> Path:
    path = directory / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as handle:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, handle)
    return path


def meta(pid, name, tid=None):
    event = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name", "args": {"name": name}}
    return event if tid is None else {**event, "tid": tid}


def test_busy_time_is_the_union_of_overlapping_and_nested_events(tmp_path):
    rng = np.random.default_rng(0)
    starts = rng.integers(0, 900, size=60)
    durations = rng.integers(1, 40, size=60)
    kernels = [{"ph": "X", "pid": 2, "tid": 7, "ts": int(s), "dur": int(d), "name": f"fusion.{i % 3}"}
               for i, (s, d) in enumerate(zip(starts, durations))]
    host = [{"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 5000, "name": "generate_tokens"}]
    events = [meta(1, "/host:CPU"), meta(1, "python", 1), meta(2, "/device:GPU:0"), meta(2, "Stream #7", 7),
              *host, *kernels, {"ph": "i", "pid": 2, "tid": 7, "ts": 3, "name": "marker"}]
    write_trace(tmp_path, events)

    grid = np.zeros(1000, bool)
    for s, d in zip(starts, durations):
        grid[s:s + d] = True
    found = timelines(events)
    assert [(t.process, t.thread) for t in found] == [("/device:GPU:0", "Stream #7")]  # the host is left out
    timeline = found[0]
    assert timeline.events == 60
    assert timeline.busy == grid.sum()
    assert timeline.span == max(starts + durations) - min(starts)
    totals = {f"fusion.{k}": int(durations[np.arange(60) % 3 == k].sum()) for k in range(3)}
    assert [(name, total) for name, _, total in timeline.top(3)] == sorted(totals.items(), key=lambda kv: -kv[1])

    lines = summarize(tmp_path, top=2, per=10)
    assert "Stream #7: 60 events" in lines[1] and f"{grid.sum() / 10:.1f} us busy" in lines[1]
    assert len(lines) == 4


def test_without_device_processes_host_threads_but_python_are_the_timelines():
    events = [meta(1, "/host:CPU"), meta(1, "python", 1), meta(1, "tf_XLAEigen/1", 2),
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 10, "name": "call"},
              {"ph": "X", "pid": 1, "tid": 2, "ts": 2, "dur": 3, "name": "dot_fusion"}]
    assert [t.thread for t in timelines(events)] == ["tf_XLAEigen/1"]


def test_a_real_xla_cpu_trace_is_summarised(tmp_path):
    import jax
    import jax.numpy as jnp

    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((256, 256))
    step(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            step(x).block_until_ready()
    lines = summarize(tmp_path)
    assert lines[0].startswith("trace ") and len(lines) > 2
    stats = [line for line in lines[1:] if not line.startswith(" ")]
    assert stats and all(" events, busy " in line for line in stats)
