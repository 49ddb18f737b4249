"""Process facts from ``/proc`` (Linux): whether a pid still runs, and when it started.

One place for "is this process alive": an exited child that its parent has not reaped yet
(a zombie) counts as gone, so callers that wait for a process to stop do not wait on one.
"""

from __future__ import annotations

from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The one-letter state (R, S, D, Z, X, ...), or None if there is no such process."""
    fields = _stat(pid)
    return fields[0] if fields else None


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")
