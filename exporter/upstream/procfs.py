"""What /proc tells about the processes on this host (or in this pod): who listens on a port,
whose parent is whom, with which command line. Linux only; every function answers None or an
empty result, never raises, when /proc is absent or a process is not ours to read."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
LISTEN = "0A"  # the TCP state column of /proc/net/tcp


def listening_inodes(port: int, proc: Path = PROC) -> set[str]:
    """Socket inodes listening on TCP `port` (any address, IPv4 or IPv6), in our network
    namespace: the sockets of a pod's other containers are there too."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and \
                    int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    return inodes


def pids(proc: Path = PROC) -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return []


def owner_of(inodes: set[str], proc: Path = PROC, first: int | None = None) -> int | None:
    """The process holding one of these sockets, if we may look at its descriptors (same
    user, or root; in a pod: `shareProcessNamespace: true`). `first` is looked at before
    the rest: the owner found last time, so that a poll need not read every process's."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in ([first] if first is not None else []) + pids(proc):
        fd_dir = proc / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(fd_dir / name) in wanted:
                    return pid
            except OSError:
                continue
    return None


def parent_of(pid: int, proc: Path = PROC) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ")".
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def children_of(parent: int, proc: Path = PROC) -> list[int]:
    return [pid for pid in pids(proc) if parent_of(pid, proc) == parent]


def command_line(pid: int, proc: Path = PROC) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0") if arg] or None
