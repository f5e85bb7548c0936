"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`, held for the life of the process.

Two runs in one workdir would interleave their stages (both write `<stage>.partial`, both append to a metrics log).
`hold(workdir)` takes the lock without waiting; if another process holds it, it raises `WorkdirBusy` naming the
workdir and the holder (pid, host, start time, command: what the holder wrote into the lock file). The OS releases a
`flock` when its process dies, however it dies, so a killed run never leaves a stale lock behind: the file stays, but
its contents only matter while someone holds it.

Only the opening of the file (created if missing, never truncated before the lock is ours) touches the workdir: a
run that finds the workdir busy changes nothing in it. On a file system without `flock` (some network and FUSE
mounts) a warning is printed and the run goes on unprotected.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys
import warnings
from typing import Iterator

LOCK_FILE = ".lock"
# errnos of a file system that cannot lock at all, as opposed to a lock someone holds (EWOULDBLOCK/EAGAIN).
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class WorkdirBusy(RuntimeError):
  """Another process holds `<workdir>/.lock`."""

  def __init__(self, workdir: pathlib.Path, holder: dict):
    self.workdir, self.holder = workdir, holder
    if holder:
      who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
             f"{holder.get('command', '?')}")
    else:
      who = "a process that has not written its details yet"
    super().__init__(f"workdir {workdir} is in use by another run ({who}); wait for it to finish or stop it, or use "
                     f"another --workdir (lock: {workdir / LOCK_FILE})")


def read_holder(path: pathlib.Path) -> dict:
  """What the holder wrote into the lock file ({} if nothing readable yet)."""
  try:
    doc = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {}
  return doc if isinstance(doc, dict) else {}


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, enabled: bool = True) -> Iterator[pathlib.Path | None]:
  """Holds the workdir's lock for the block (yields the lock file; None when `enabled` is False or the file system
  cannot lock). The workdir must exist. Raises `WorkdirBusy` at once if another process holds it."""
  if not enabled:
    yield None
    return
  workdir = pathlib.Path(workdir)
  path = workdir / LOCK_FILE
  # O_CREAT without O_TRUNC: the holder's details must survive our opening the file to find out it is held.
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(workdir, read_holder(path)) from None
    except OSError as e:
      if e.errno not in _NO_LOCKING:
        raise
      warnings.warn(f"{path}: this file system cannot lock ({os.strerror(e.errno)}); nothing stops a second run "
                    f"from using workdir {workdir} at the same time", stacklevel=3)
      yield None
      return
    holder = dict(pid=os.getpid(), host=socket.gethostname(),
                  started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=shlex.join(getattr(sys, "orig_argv", sys.argv)))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    yield path
  finally:
    os.close(fd)  # releases the lock (so does the process's death)
