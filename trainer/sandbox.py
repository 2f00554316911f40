"""Run untrusted generated code (a HumanEval task's tests) in a child process that cannot do much harm.

Layers, each independent of the others:
  * resource limits set in the child before exec: CPU seconds, address space, file size, open files, no
    core dumps, and a process cap (RLIMIT_NPROC: a fork bomb hits it instead of the machine);
  * a wall-clock timeout; the child runs in its own session and PID namespace, so everything it started
    dies with it;
  * no network: a fresh network namespace (`unshare --net`; only a downed loopback inside);
  * a fresh temporary working directory, an empty environment (no proxies, no secrets), `python -I`;
  * when the trainer runs as root: the child drops to `nobody` (root ignores RLIMIT_NPROC).

What this host allows is probed once (`detect_isolation`). Where `unshare` is not permitted (some
container runtimes), the network falls back to an in-process block (socket functions replaced before
the program runs), which is weaker; the report says which isolation was used. Run the batch image as a
non-root user with user namespaces allowed for the full set.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Isolation", "Limits", "SandboxResult", "detect_isolation", "run_program"]

NOBODY = 65534
_NET_BLOCK_PRELUDE = """\
import socket as _qlp_socket
def _qlp_blocked(*_a, **_k):
    raise OSError("network access is disabled in the sandbox")
for _qlp_name in ("socket", "create_connection", "getaddrinfo", "socketpair", "fromfd"):
    setattr(_qlp_socket, _qlp_name, _qlp_blocked)
del _qlp_socket, _qlp_name
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    nproc: int = 16  # processes/threads the program may add to its user's current count
    fsize_mb: int = 16
    nofile: int = 64


@dataclass(frozen=True)
class Isolation:
    python: str
    prefix: tuple[str, ...]  # argv before the interpreter (unshare ...)
    uid: int | None  # drop to this uid (root only)
    network: str  # "namespace" or "in-process block"
    notes: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        return {
            "network": self.network,
            "user": "nobody" if self.uid == NOBODY else "trainer's own",
            "pid_namespace": "--pid" in self.prefix,
            "notes": list(self.notes),
        }


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout
    detail: str = ""
    seconds: float = 0.0
    stderr: str = field(default="", repr=False)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _user_tasks(uid: int) -> int:
    """Processes and threads owned by `uid` (what RLIMIT_NPROC counts)."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return n


def _preexec(limits: Limits, uid: int | None, nproc: int) -> None:
    cpu = max(1, int(limits.timeout_s) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = limits.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.fsize_mb << 20, limits.fsize_mb << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _try(argv: list[str], uid: int | None, cwd: str) -> bool:
    limits = Limits(timeout_s=10)
    nproc = _user_tasks(uid if uid is not None else os.getuid()) + limits.nproc
    try:
        r = subprocess.run(
            argv,
            cwd=cwd,
            env=_env(cwd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
            preexec_fn=functools.partial(_preexec, limits, uid, nproc),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


@functools.cache
def detect_isolation(python: str | None = None) -> Isolation:
    """The strongest isolation this host allows, found by trying each one."""
    candidates = [python or sys.executable]
    if python is None and Path("/usr/bin/python3").exists():
        candidates.append("/usr/bin/python3")  # readable by nobody when the venv's interpreter is not
    notes: list[str] = []
    probe = "import sys; sys.exit(0)"
    unshare = shutil.which("unshare")
    with tempfile.TemporaryDirectory(prefix="qlp-sandbox-probe-") as cwd:
        os.chmod(cwd, 0o777)
        root = os.geteuid() == 0
        uids: list[int | None] = [NOBODY, None] if root else [None]
        for uid in uids:  # dropping privileges first: it matters more than which interpreter
            for py in candidates:
                base = [py, "-I", "-c", probe]
                if unshare:
                    # As root without dropping, root may create namespaces directly; otherwise a user
                    # namespace maps us to root inside, which is what allows the network namespace.
                    userns = () if (root and uid is None) else ("--user", "--map-root-user")
                    prefix = (unshare, *userns, "--net", "--pid", "--fork", "--kill-child", "--")
                    if _try([*prefix, *base], uid, cwd):
                        if uid is None and root:
                            notes.append(
                                "runs as root: the interpreter is not usable by nobody, and root "
                                "is exempt from RLIMIT_NPROC; run the trainer as a non-root user"
                            )
                        return Isolation(py, prefix, uid, "namespace", tuple(notes))
                if _try(base, uid, cwd):
                    notes.append("unshare is not permitted here: network blocked in-process only")
                    if uid is None and root:
                        notes.append("runs as root: root is exempt from RLIMIT_NPROC")
                    return Isolation(py, (), uid, "in-process block", tuple(notes))
    raise RuntimeError("no usable Python interpreter for the sandbox")


def run_program(source: str, limits: Limits | None = None, isolation: Isolation | None = None) -> SandboxResult:
    """Run `source` as a Python program; passed means exit status 0 within the limits."""
    limits = limits or Limits()
    iso = isolation or detect_isolation()
    if iso.network != "namespace":
        source = _NET_BLOCK_PRELUDE + source
    workdir = tempfile.mkdtemp(prefix="qlp-sandbox-")
    try:
        program = Path(workdir) / "program.py"
        program.write_text(source)
        if iso.uid is not None:
            os.chown(workdir, iso.uid, iso.uid)
            os.chown(program, iso.uid, iso.uid)
        nproc = _user_tasks(iso.uid if iso.uid is not None else os.getuid()) + limits.nproc
        argv = [*iso.prefix, iso.python, "-I", "-B", "program.py"]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=functools.partial(_preexec, limits, iso.uid, nproc),
        )
        try:
            _, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            with_group_killed(proc)
            proc.communicate()
            return SandboxResult("timeout", f"no result within {limits.timeout_s:g}s", time.monotonic() - start)
        seconds = time.monotonic() - start
        stderr = err.decode("utf-8", "replace")[-4000:]
        if proc.returncode == 0:
            return SandboxResult("passed", "", seconds, stderr)
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            return SandboxResult("timeout", "CPU limit reached", seconds, stderr)
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        detail = lines[-1][:300] if lines else f"exit status {proc.returncode}"
        return SandboxResult("failed", detail, seconds, stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def with_group_killed(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole session (it was started as a session leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
