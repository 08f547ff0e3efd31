"""Running `forgetjax study` in a subprocess for the study tests, to completion or killed when a condition holds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run_study(config: Path, *extra, kill_when=None):
    """The finished process (stdout/stderr captured), or None after SIGKILL once `kill_when()` is true."""
    cmd = [sys.executable, "-m", "forgetjax.cli", "study", str(config), "--no-report", *extra]
    if kill_when is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1500)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None and not kill_when():
        time.sleep(0.2)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return None
