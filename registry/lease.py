"""Who runs a pipeline run: the lease a run records, and whether its process still lives.

A lease is the host name, the pid and a process identity: the kernel's boot id, the pid
namespace and the process's start time (in clock ticks since boot, /proc/PID/stat field
22). A pid that is reused by another process after a crash has another start time, so it
does not keep a dead run alive; a reboot changes the boot id. Only a lease taken on this
machine (same host name, boot and pid namespace) can be checked directly; a lease taken
elsewhere is judged by its heartbeat (registry.runs).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    #: "BOOT_ID/PID_NAMESPACE/START_TICKS", or "" where /proc is not available
    process: str

    @property
    def machine(self) -> str:
        """The part of the identity shared by every process of this machine and namespace."""
        return self.process.rsplit("/", 1)[0] if self.process else ""


def _boot_id() -> str:
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink(PROC / "self/ns/pid")
    except OSError:
        return ""


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, or None if there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except FileNotFoundError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def process_identity(pid: int) -> str:
    boot, namespace = _boot_id(), _pid_namespace()
    stat = _stat(pid) if boot else None
    if not boot or stat is None:
        return ""
    return f"{boot}/{namespace}/{stat[1]}"


def current() -> Lease:
    pid = os.getpid()
    return Lease(socket.gethostname(), pid, process_identity(pid))


def local(lease: Lease) -> bool:
    """Whether `lease` was taken on this machine, in this pid namespace (so its process
    can be looked up here)."""
    me = current()
    return lease.host == me.host and lease.machine == me.machine


def alive(lease: Lease) -> bool:
    """Whether the lease's process still runs; only meaningful when `local(lease)`.
    A zombie (killed, not yet reaped) is dead."""
    if not lease.process:  # no /proc: the pid alone
        try:
            os.kill(lease.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        stat = _stat(lease.pid)
    except PermissionError:  # /proc mounted with hidepid: cannot tell, so not dead
        return True
    if stat is None or stat[0] in ("Z", "X", "x"):
        return False
    return f"{lease.machine}/{stat[1]}" == lease.process


def dead(lease: Lease, heartbeat_age_s: float, lease_s: float) -> str | None:
    """Why the holder of `lease` is dead, or None if it may still live: a local process is
    looked up; one elsewhere is dead once its heartbeat is older than `lease_s`."""
    if local(lease):
        return None if alive(lease) else f"its process {lease.pid} on {lease.host} is gone"
    if heartbeat_age_s <= lease_s:
        return None
    return f"no heartbeat from pid {lease.pid} on {lease.host} for {heartbeat_age_s:.0f} s"
