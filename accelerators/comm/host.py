"""Which process on which host a rank is, and whether a peer's process is gone.

Read once per use from ``/proc`` (Linux); where a file cannot be read its field is ``""``.
Two ranks run on one host when hostname and boot id are equal; one rank can check another's
pid (:func:`process_gone`) when, in addition, they share a pid namespace (:attr:`pid_space`).
Used by the failure reports (:mod:`xtp.accelerators.comm.failures`) and the shared-memory
rendezvous (:mod:`xtp.accelerators.cpu.shm_setup`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PID_NS_PATH = "/proc/self/ns/pid"


@dataclass(frozen=True)
class ProcessIdentity:
    """One process: hostname, boot id (``""`` where unreadable), pid namespace (the
    ``/proc/self/ns/pid`` link, ``""`` where unreadable) and pid."""

    hostname: str
    boot_id: str
    pid_ns: str
    pid: int

    @property
    def pid_space(self) -> str:
        """Boot id and pid namespace: equal values mean one process can check the other's pid
        (:func:`process_gone`)."""
        return f"{self.boot_id}/{self.pid_ns}"


def this_process() -> ProcessIdentity:
    """The :class:`ProcessIdentity` of the calling process."""
    return ProcessIdentity(socket.gethostname(), _read(BOOT_ID_PATH), _readlink(PID_NS_PATH),
                           os.getpid())


def process_gone(pid: int) -> bool:
    """True when ``pid`` (in this pid namespace) no longer exists or is a zombie (killed, not
    yet reaped); False while it runs or when that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state in (b"Z", b"X")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
