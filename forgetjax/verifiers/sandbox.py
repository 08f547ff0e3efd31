"""Run untrusted (model-generated) Python programs in a contained child process.

Nothing here ever executes the program in-process. Each call to `run_program` does the following.

Process and lifetime
  * The harness starts a small trusted launcher (`_LAUNCHER_SOURCE`, run by the harness's own interpreter
    with -I -S) in a new session, so it leads its own process group. It is started with `subprocess.Popen`
    and no `preexec_fn`, which keeps it safe to use from many threads. The launcher sets up the containment
    described below and then `execve`s the sandbox interpreter on the program. If any setup step fails, the
    launcher reports the failure on a private close-on-exec status pipe that the program never sees.
    The run then ends with status "unavailable" (fail closed), and the program does not run.
  * The harness enforces a hard wall-clock deadline. On timeout, on output overflow, or once the program has
    exited, it SIGKILLs the whole process group. As root it also SIGKILLs every process that runs under the
    run's private uid, repeating until none is left. That catches children that escaped the group with
    setsid(). PR_SET_PDEATHSIG kills the program if the harness thread that launched it dies.
  * stdout and stderr are read incrementally through non-blocking pipes. Each stream keeps at most
    `max_output_bytes`, and the run is killed as soon as either stream goes past that cap. stdin is fed
    incrementally too, so a large input cannot deadlock the harness.

Resource limits (setrlimit, inherited by every descendant)
  RLIMIT_CPU (soft = cpu_s, hard = cpu_s + 1), RLIMIT_AS = memory_mb, RLIMIT_FSIZE = disk_mb,
  RLIMIT_NPROC = max_processes, RLIMIT_NOFILE = 256, RLIMIT_CORE = 0.

Identity (root only, which is how this project runs)
  Each concurrent run leases a distinct unprivileged uid/gid, 61000 + slot, with no supplementary groups.
  The lease is an flock on a file in a root-only lock directory, so it is exclusive across threads and
  across processes. Leases rotate, so a uid that was just used is not reused at once. The uid need not
  exist in /etc/passwd. Because the uid is private, RLIMIT_NPROC limits this run alone (the kernel does not
  enforce that limit for root, and counts it per uid), and "kill every process of the uid" kills exactly
  this run. PR_SET_NO_NEW_PRIVS stops setuid binaries from giving privileges back.

Network
  The launcher calls unshare(CLONE_NEWNET). As a non-root user it calls CLONE_NEWUSER | CLONE_NEWNET instead.
  The new namespace holds only a loopback interface, and that interface is down. Connections to 127.0.0.1,
  to external addresses and to abstract unix sockets all fail. If the namespace cannot be created, the run
  is "unavailable", unless the caller passes allow_network=True. That flag skips the network namespace
  altogether, so the program then has the host's network.

Filesystem (root only)
  The launcher enters a private mount namespace (CLONE_NEWNS, with propagation set to private, so nothing
  leaks back to the host). It mounts empty tmpfs over the directories in `HIDDEN_PATHS` (/tmp, /var/tmp,
  /dev/shm, /run, /home, /root, /work). The harness's temp files, the repository and the data are therefore
  invisible to the program. The run's working directory is a fresh size-limited tmpfs (disk_mb, 4096 inodes,
  nosuid, nodev, noexec) owned by the run's uid. It sits at the path of the harness's fresh temp directory,
  which holds only main.py and is removed afterwards. Every other mount is then remounted read-only. Writing
  anywhere outside the working directory fails twice over: because of the unprivileged uid, and because of
  EROFS. Device nodes such as /dev/null stay usable.

Environment and interpreter
  The environment is built from scratch: PATH, LANG, LC_ALL, HOME and TMPDIR (both the working directory),
  PYTHONDONTWRITEBYTECODE, PYTHONIOENCODING, PYTHONHASHSEED=0 (deterministic set/dict order) and
  PYTHONNOUSERSITE. None of the parent's variables, secrets included, are passed on. The program runs as
  `python -s -S -B main.py`. That is equivalent to -I -S for this purpose: the environment is ours, so no
  foreign PYTHON* variable exists, and user and site directories are not added. -E is not used, because it
  would drop the hash seed. By default the interpreter is the first one that the unprivileged uid can
  execute (the harness's own interpreter, or else /usr/bin/python3). Only the stdlib is available.

Not contained
  As non-root, there is no uid change and no mount namespace: the filesystem is protected only by the
  user's own permissions, and RLIMIT_NPROC counts all of the user's processes. Processes of other users
  stay visible in /proc, but their environments are not (no PID namespace). World-writable unix-socket
  files outside the hidden directories can still be connected to. CPU time is limited per process, and
  the wall clock limits it overall.
"""

from __future__ import annotations

import dataclasses
import fcntl
import inspect
import itertools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

STATUSES = frozenset({"ok", "error", "timeout", "memory", "output_limit", "killed", "unavailable"})
SANDBOX_UID_BASE = 61000
SANDBOX_UID_SLOTS = 256
HIDDEN_PATHS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/home", "/root", "/work")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_OPEN_FILES = 256
LAUNCHER_FAILURE_EXIT = 125
_READ_CHUNK = 65536
_POLL_S = 0.02
_EXIT_GRACE_S = 0.1
_SWEEP_TIMEOUT_S = 5.0
_MEMORY_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"out of memory", b"std::bad_alloc")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot establish its isolation, so nothing was (or may be) run."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run. stdout/stderr are truncated to the output cap and decoded as UTF-8."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    reason: str
    uid: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_LAUNCHER_SOURCE = r'''
import ctypes, json, os, re, resource, sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
              "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    stage = "init"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
        libc.unshare.argtypes = (ctypes.c_int,)
        libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

        def check(ret, what):
            if ret != 0:
                err = ctypes.get_errno()
                raise OSError(err, what + ": " + os.strerror(err))

        def mount(source, target, fstype, flags, data=None):
            enc = lambda s: None if s is None else s.encode()
            check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), "mount " + target)

        stage = "namespaces"
        flags = 0
        if cfg["isolate_network"]:
            flags |= CLONE_NEWNET if cfg["root"] else (CLONE_NEWUSER | CLONE_NEWNET)
        if cfg["root"]:
            flags |= CLONE_NEWNS
        if flags:
            check(libc.unshare(flags), "unshare(0x%x)" % flags)

        workdir = cfg["workdir"]
        if cfg["root"]:
            stage = "filesystem"
            with open(os.path.join(workdir, "main.py"), "rb") as fh:
                program = fh.read()
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            hidden = [p for p in cfg["hidden_paths"] if os.path.isdir(p) and not os.path.islink(p)]
            for path in hidden:
                mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755,size=64k,nr_inodes=64")
            os.makedirs(workdir, mode=0o755, exist_ok=True)
            mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=700,uid=%d,gid=%d,size=%dm,nr_inodes=4096" % (cfg["uid"], cfg["gid"], cfg["disk_mb"]))
            fd = os.open(os.path.join(workdir, "main.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.write(fd, program)
            os.fchown(fd, cfg["uid"], cfg["gid"])
            os.close(fd)
            remount_read_only(mount, workdir, hidden)

        stage = "limits"
        for name, value in cfg["limits"]:
            resource.setrlimit(getattr(resource, name), tuple(value))

        stage = "credentials"
        if cfg["root"]:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
            if os.getuid() == 0 or os.geteuid() == 0:
                raise OSError("still root after setresuid")
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PDEATHSIG)")
        if os.getppid() != cfg["parent_pid"]:
            raise OSError("harness exited during setup")

        stage = "exec"
        os.chdir(workdir)
        os.umask(0o077)
        os.set_inheritable(status_fd, False)
        argv = [cfg["python"], "-s", "-S", "-B", "main.py"]
        os.execve(cfg["python"], argv, cfg["env"])
    except BaseException as exc:
        try:
            os.write(status_fd, ("%s: %r" % (stage, exc)).encode("utf-8", "replace")[:4000])
        finally:
            os._exit(125)


def unescape(path):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def remount_read_only(mount, workdir, hidden):
    top = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            top[unescape(fields[4])] = fields[5].split(",")
    for path, options in top.items():
        inside_hidden = any(path.startswith(h.rstrip("/") + "/") for h in hidden)
        if path == workdir or path.startswith(workdir + "/") or inside_hidden or "ro" in options:
            continue
        if not os.path.lexists(path):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in options:
            flags |= KEPT_FLAGS.get(option, 0)
        mount(None, path, None, flags)


main()
'''


def _is_root() -> bool:
    return os.geteuid() == 0


def _reachable_by_others(path: str) -> bool:
    """True if a uid with no owner/group rights can execute `path` (every directory searchable, file +x)."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return False
    if not (stat.S_ISREG(mode) and mode & stat.S_IXOTH and mode & stat.S_IROTH):
        return False
    parent = os.path.dirname(real)
    while True:
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _under(path: str, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def default_python() -> str:
    """The interpreter sandboxed programs run with: one the unprivileged uid can execute and not hidden."""
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"]
    if not _is_root():
        return sys.executable
    for candidate in candidates:
        if candidate and _reachable_by_others(candidate) and not _under(candidate, HIDDEN_PATHS):
            return os.path.realpath(candidate)
    raise SandboxUnavailable("no Python interpreter is executable by an unprivileged uid outside HIDDEN_PATHS")


def sandbox_env(workdir: str) -> dict[str, str]:
    """The complete environment a sandboxed program sees (nothing is inherited from the parent)."""
    return {
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONHASHSEED": "0",
        "PYTHONNOUSERSITE": "1",
    }


def _process_uids() -> list[tuple[int, int, str]]:
    """(pid, real uid, state letter) for every process currently visible in /proc."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                text = fh.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        try:
            rows.append((int(entry), int(fields["Uid"].split()[0]), fields["State"].split()[0]))
        except (KeyError, ValueError, IndexError):
            continue
    return rows


def live_processes_of_uid(uid: int) -> list[int]:
    """PIDs of non-zombie processes whose real uid is `uid` (zombies are dead and wait only to be reaped)."""
    return [pid for pid, puid, state in _process_uids() if puid == uid and state != "Z"]


def kill_uid(uid: int, timeout_s: float = _SWEEP_TIMEOUT_S) -> list[int]:
    """SIGKILL every live process of `uid` until none remains or the timeout passes. Returns survivors."""
    if uid < SANDBOX_UID_BASE:
        raise ValueError(f"uid={uid} is not a sandbox uid (>= {SANDBOX_UID_BASE})")
    deadline = time.monotonic() + timeout_s
    while True:
        pids = live_processes_of_uid(uid)
        if not pids or time.monotonic() >= deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


class _UidLease:
    """Exclusive use of one sandbox uid, across threads and processes, via flock on a root-only lock file."""

    _rotation = itertools.count(secrets.randbelow(SANDBOX_UID_SLOTS))

    def __init__(self, wait_s: float = 60.0):
        lock_dir = Path(tempfile.gettempdir()) / f"forgetjax-sandbox-uids-{os.geteuid()}"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(lock_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise SandboxUnavailable(f"uid lock directory {lock_dir} is not a private directory owned by us")
        deadline = time.monotonic() + wait_s
        while True:
            start = next(self._rotation)
            for offset in range(SANDBOX_UID_SLOTS):
                uid = SANDBOX_UID_BASE + (start + offset) % SANDBOX_UID_SLOTS
                fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if kill_uid(uid, timeout_s=0.5) or any(puid == uid for _, puid, _ in _process_uids()):
                    os.close(fd)
                    continue
                self.uid, self._fd = uid, fd
                return
            if time.monotonic() >= deadline:
                raise SandboxUnavailable(f"no free sandbox uid in {SANDBOX_UID_SLOTS} slots after {wait_s} s")
            time.sleep(0.05)

    def release(self) -> None:
        os.close(self._fd)


def _validate(source: str, stdin: str | None, timeout_s: float, cpu_s: float | None, memory_mb: int,
              max_output_bytes: int, max_processes: int, disk_mb: int) -> None:
    if not isinstance(source, str):
        raise TypeError(f"source must be str, got {type(source).__name__}")
    if stdin is not None and not isinstance(stdin, str):
        raise TypeError(f"stdin must be str or None, got {type(stdin).__name__}")
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    if cpu_s is not None and not (isinstance(cpu_s, (int, float)) and math.isfinite(cpu_s) and cpu_s > 0):
        raise ValueError(f"cpu_s must be None or a positive finite number, got {cpu_s!r}")
    for name, value, low in (("memory_mb", memory_mb, 32), ("max_output_bytes", max_output_bytes, 1),
                             ("max_processes", max_processes, 1), ("disk_mb", disk_mb, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _rlimits(cpu_s: float, memory_mb: int, disk_mb: int, max_processes: int) -> list[tuple[str, tuple[int, int]]]:
    cpu = max(1, math.ceil(cpu_s))
    return [
        ("RLIMIT_CORE", (0, 0)),
        ("RLIMIT_CPU", (cpu, cpu + 1)),
        ("RLIMIT_AS", (memory_mb * 2**20, memory_mb * 2**20)),
        ("RLIMIT_FSIZE", (disk_mb * 2**20, disk_mb * 2**20)),
        ("RLIMIT_NOFILE", (MAX_OPEN_FILES, MAX_OPEN_FILES)),
        ("RLIMIT_NPROC", (max_processes, max_processes)),
    ]


def _has_exited(pid: int) -> bool:
    """Whether `pid` has exited, without reaping it (so its pid and process group cannot be reused yet)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _read_status_pipe(fd: int, deadline: float) -> bytes | None:
    """Launcher setup report: b"" once exec succeeded (EOF), the error text on failure, None on timeout."""
    chunks = []
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not sel.select(timeout=remaining):
                continue
            data = os.read(fd, 4096)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


class _Capture:
    """Incremental pump of stdin/stdout/stderr with a per-stream byte cap."""

    def __init__(self, proc: subprocess.Popen, stdin_data: bytes, cap: int):
        self.cap = cap
        self.buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        self.out_fd, self.err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self.overflow = False
        self.proc = proc
        self.sel = selectors.DefaultSelector()
        for fd in self.buffers:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)
        self.stdin_fd = proc.stdin.fileno() if proc.stdin is not None else None
        self.pending = memoryview(stdin_data)
        if self.stdin_fd is not None:
            os.set_blocking(self.stdin_fd, False)
            if self.pending:
                self.sel.register(self.stdin_fd, selectors.EVENT_WRITE)
            else:
                self._close_stdin(proc)

    def _close_stdin(self, proc: subprocess.Popen) -> None:
        if self.stdin_fd is not None:
            try:
                self.sel.unregister(self.stdin_fd)
            except (KeyError, ValueError):
                pass
            try:
                proc.stdin.close()
            except OSError:
                pass
            self.stdin_fd = None

    @property
    def reading(self) -> bool:
        return any(fd in self.buffers for fd in self._registered())

    def _registered(self) -> list[int]:
        return [key.fd for key in self.sel.get_map().values()]

    def pump(self, timeout: float) -> None:
        """Wait up to `timeout` for I/O and service it; sets `overflow` when a stream passes the cap."""
        if not self._registered():
            time.sleep(timeout)
            return
        for key, _ in self.sel.select(timeout=timeout):
            if key.fd == self.stdin_fd:
                self._write_stdin()
                continue
            try:
                data = os.read(key.fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                self.sel.unregister(key.fd)
                continue
            buffer = self.buffers[key.fd]
            room = self.cap - len(buffer)
            buffer += data[:room]
            if len(data) > room:
                self.overflow = True
                return

    def _write_stdin(self) -> None:
        try:
            written = os.write(self.stdin_fd, self.pending[:_READ_CHUNK])
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            self._close_stdin(self.proc)
            return
        self.pending = self.pending[written:]
        if not self.pending:
            self._close_stdin(self.proc)

    def drain(self, timeout: float) -> None:
        """Read whatever the (now dead) writers left in the pipes, bounded by the cap and `timeout`."""
        deadline = time.monotonic() + timeout
        self._close_stdin(self.proc)
        while self.reading and not self.overflow and time.monotonic() < deadline:
            self.pump(min(_POLL_S, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self.sel.close()

    def text(self, fd: int) -> str:
        return bytes(self.buffers[fd]).decode("utf-8", errors="replace")


def _classify(returncode: int | None, stderr: bytes, cpu_limit: int) -> tuple[str, str]:
    """Status and reason for a run that ended on its own (not killed by the harness)."""
    if returncode == 0:
        return "ok", "exited with code 0"
    if returncode is None:
        return "killed", "exit status unknown"
    if returncode > 0:
        if any(marker in stderr[-4096:] for marker in _MEMORY_MARKERS):
            return "memory", f"exited with code {returncode} after running out of memory"
        return "error", f"exited with code {returncode}"
    sig = -returncode
    name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
    if sig == signal.SIGXCPU:
        return "timeout", f"CPU time limit ({cpu_limit} s) exceeded ({name})"
    if sig == signal.SIGXFSZ:
        return "killed", f"file size limit exceeded ({name})"
    if sig == signal.SIGKILL:
        return "killed", "killed by SIGKILL (CPU hard limit or the kernel's OOM killer)"
    return "killed", f"killed by {name}"


def run_program(source: str, *, stdin: str | None = None, timeout_s: float = 10.0, cpu_s: float | None = None,
                memory_mb: int = 1024, max_output_bytes: int = 1_000_000, max_processes: int = 16,
                python: str | None = None, allow_network: bool = False, disk_mb: int = 64) -> SandboxResult:
    """Run Python `source` in the sandbox described in the module docstring and report what happened.

    cpu_s defaults to timeout_s. disk_mb caps the working directory's tmpfs and every file (RLIMIT_FSIZE).
    When isolation cannot be set up, the result has status "unavailable" and the program does not run.
    """
    _validate(source, stdin, timeout_s, cpu_s, memory_mb, max_output_bytes, max_processes, disk_mb)
    root = _is_root()
    if python is None:
        python = default_python()
    elif not os.path.isabs(python):
        raise ValueError(f"python must be an absolute path, got {python!r}")
    elif root and _under(python, HIDDEN_PATHS):
        raise ValueError(f"python={python!r} lies under a path hidden from the sandbox ({HIDDEN_PATHS})")
    cpu_limit = max(1, math.ceil(cpu_s if cpu_s is not None else timeout_s))
    start = time.monotonic()
    lease = _UidLease() if root else None
    workdir = tempfile.mkdtemp(prefix="forgetjax-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as fh:
            fh.write(source)
        config = {
            "root": root,
            "isolate_network": not allow_network,
            "workdir": workdir,
            "hidden_paths": list(HIDDEN_PATHS),
            "uid": lease.uid if lease else os.getuid(),
            "gid": lease.uid if lease else os.getgid(),
            "disk_mb": disk_mb,
            "limits": _rlimits(cpu_limit, memory_mb, disk_mb, max_processes),
            "python": python,
            "env": sandbox_env(workdir),
            "parent_pid": os.getpid(),
        }
        return _launch_and_watch(config, stdin, timeout_s, max_output_bytes, cpu_limit, start, lease)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if lease is not None:
            lease.release()


def _launch_and_watch(config: dict[str, Any], stdin: str | None, timeout_s: float, cap: int, cpu_limit: int,
                      start: float, lease: _UidLease | None) -> SandboxResult:
    uid = lease.uid if lease else None
    status_r, status_w = os.pipe()
    config["status_fd"] = status_w
    deadline = start + timeout_s
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _LAUNCHER_SOURCE, json.dumps(config)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=config["env"], cwd="/", start_new_session=True, pass_fds=(status_w,), close_fds=True,
        )
    except OSError as exc:
        os.close(status_r)
        os.close(status_w)
        reason = f"cannot start launcher: {exc}"
        return SandboxResult("unavailable", None, "", "", time.monotonic() - start, reason, uid)
    os.close(status_w)
    capture = None
    outcome, reason = None, ""
    try:
        report = _read_status_pipe(status_r, deadline)
        if report is None:
            outcome, reason = "timeout", f"wall-clock limit ({timeout_s} s) hit during sandbox setup"
        elif report:
            detail = report.decode("utf-8", "replace")
            outcome, reason = "unavailable", f"sandbox setup failed, program not run: {detail}"
        else:
            capture = _Capture(proc, (stdin or "").encode("utf-8"), cap)
            outcome, reason = _watch(proc, capture, deadline, timeout_s, cap)
    finally:
        os.close(status_r)
        _kill_run(proc, uid)
        if capture is not None:
            capture.drain(timeout=0.5)
            capture.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        proc.wait()
        if uid is not None:
            kill_uid(uid)
    stdout = capture.text(capture.out_fd) if capture else ""
    stderr_bytes = bytes(capture.buffers[capture.err_fd]) if capture else b""
    if outcome is None:
        outcome, reason = _classify(proc.returncode, stderr_bytes, cpu_limit)
    return SandboxResult(outcome, proc.returncode, stdout, stderr_bytes.decode("utf-8", errors="replace"),
                         time.monotonic() - start, reason, uid)


def _watch(proc: subprocess.Popen, capture: _Capture, deadline: float, timeout_s: float,
           cap: int) -> tuple[str | None, str]:
    """Pump I/O until the program exits (plus a short drain), overflows its output cap, or the deadline passes."""
    exited_at = None
    while True:
        now = time.monotonic()
        if capture.overflow:
            return "output_limit", f"output exceeded {cap} bytes on one stream; killed"
        if now >= deadline:
            return "timeout", f"wall-clock limit ({timeout_s} s) exceeded; process group killed"
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
        if exited_at is not None and (not capture.reading or now - exited_at > _EXIT_GRACE_S):
            return None, ""
        capture.pump(min(_POLL_S, deadline - now))


def _kill_run(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the run's process group (leader not yet reaped, so the pgid is still ours) and, as root, its uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        kill_uid(uid)


def check_sandbox() -> None:
    """Raise SandboxUnavailable unless a trivial program runs with full isolation (a preflight for jobs)."""
    result = run_program("print('ok')", timeout_s=30.0)
    if result.status != "ok" or result.stdout.strip() != "ok":
        raise SandboxUnavailable(
            f"sandbox self-test failed: status={result.status}: {result.reason} {result.stderr[-500:]}")


_RUN_PARAMETERS = inspect.signature(run_program)


class SandboxPool:
    """A bounded thread pool running many sandboxed programs in parallel; order preserved, thread-safe."""

    def __init__(self, max_workers: int):
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sandbox")
        self._lock = threading.Lock()
        self._closed = False

    def run_many(self, jobs: Sequence[Mapping[str, Any]]) -> list[SandboxResult]:
        """Run each job (keyword arguments of `run_program`) and return the results in job order."""
        for index, job in enumerate(jobs):
            if not isinstance(job, Mapping):
                raise TypeError(f"jobs[{index}] must be a mapping of run_program keyword arguments")
            try:
                _RUN_PARAMETERS.bind(**job)
            except TypeError as exc:
                raise ValueError(f"jobs[{index}]: {exc}") from None
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxPool is closed")
            futures = [self._executor.submit(run_program, **job) for job in jobs]
        return [future.result() for future in futures]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
