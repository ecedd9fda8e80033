"""SIGTERM (what `timeout`, `docker stop`, systemd and Kubernetes send) handled as Ctrl-C is.

Python's default for SIGTERM is to die on the spot: no `finally` runs, so an MLflow run stays RUNNING
and a temporary folder stays behind. Every `drscaling` command instead turns SIGTERM into `Terminated`
(a KeyboardInterrupt) where the process is (`sigterm_raises`), so runs end KILLED with the cause and
atomic writes clean up. Work that has a natural boundary (a training step, an annotation batch) defers
it there instead (`sigterm_at_boundary`): the loop checks a flag, saves what it has, then raises.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was or at the next boundary of its work."""


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signal.signal works only there


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """For the block, SIGTERM raises Terminated wherever the process is, as Ctrl-C raises KeyboardInterrupt."""
    if not _on_main_thread():
        yield
        return

    def on_term(signum, frame):  # noqa: ARG001
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_at_boundary() -> Iterator[dict]:
    """For the block, SIGTERM only sets flag["term"]; the block checks it at its boundaries (after a
    step, after a batch is saved) and raises Terminated there. A SIGTERM the block did not act on (it
    came after the last boundary) is passed on to the handler outside it when the block ends, so a
    loop around the block (a sweep's points) stops too instead of starting its next item."""
    flag = {"term": False}
    if not _on_main_thread():
        yield flag
        return

    def on_term(signum, frame):  # noqa: ARG001
        flag["term"] = True

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
    if flag["term"] and callable(previous):  # reached only when the block ended without raising
        previous(signal.SIGTERM, None)
