"""Worker processes that never outlive the training process.

DataLoader workers and the decoded-cache pool are started by a multiprocessing *fork server* (see
``util.datasets.worker_options``). Killed with ``kill -9`` (out of memory, a scheduler, a user), the
training process used to leave that fork server, its workers and multiprocessing's resource tracker
running for ever, 0.5 to 0.8 GB each: the workers hold the fork server's "alive" pipe open (so it
never sees the end of its client), and they watch only their own parent, the fork server.

On Linux each process now asks the kernel to kill it when its parent dies (``prctl``
``PR_SET_PDEATHSIG``): the fork server dies with the training process, and every process the fork
server forks dies with the fork server. The resource tracker then sees the end of its pipe and exits
by itself, after cleaning up. Elsewhere (no ``prctl``) nothing changes.

The parent-death signal fires when the *thread* that forked the process ends, so the fork server is
started from the thread that asks for it (:func:`forkserver_context`; the main thread in the
training scripts), never lazily from a short-lived thread.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set (to the training process's pid) only while that process starts its fork server: the fork server
# inherits it and so knows that it is one, and whose.
_FORK_SERVER_OF = "DEBLURRINGMIM_FORK_SERVER_OF"
_forking_pid = None  # in a process that forks: its own pid, recorded just before each fork


def die_with_parent(expected_parent: int | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False where that is unsupported.

    ``expected_parent``: the pid the parent had when this process was forked. If it already died
    (the request came too late to fire), exit now.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
    return True


def _record_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _child_dies_with_parent() -> None:
    die_with_parent(expected_parent=_forking_pid)


def _install_in_fork_server() -> None:
    """In the fork server: die with the training process, and make every child die with us."""
    del os.environ[_FORK_SERVER_OF]  # not for the workers' own children
    die_with_parent()  # if the training process is already gone, the fork server exits on its own
    os.register_at_fork(before=_record_forking_pid, after_in_child=_child_dies_with_parent)


def forkserver_context():
    """The multiprocessing context for worker processes: the fork server, started now from the
    calling thread with the parent-death set-up above (spawn where there is no fork server)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    # '__main__' is multiprocessing's default preload (the script's imports, made once); this module
    # runs the set-up in the fork server before it forks any worker
    forkserver.set_forkserver_preload(["__main__", __name__])
    os.environ[_FORK_SERVER_OF] = str(os.getpid())
    try:
        forkserver.ensure_running()  # no-op if it runs already
    finally:
        del os.environ[_FORK_SERVER_OF]
    return multiprocessing.get_context("forkserver")


if os.environ.get(_FORK_SERVER_OF) == str(os.getppid()):  # imported by the fork server being started
    _install_in_fork_server()
