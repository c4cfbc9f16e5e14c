"""Run fitting calls in threads the calling thread waits on, interruptibly: the first-step engine's lockstep
batches and a split step's source calls (``TrajectoryFit.run_together``) both meet at every hooked module."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence


def run_in_threads(
    targets: Sequence[Callable[[], None]],
    *,
    name: str,
    stop: Callable[[BaseException], None],
    poll: Callable[[], None] = lambda: None,
) -> None:
    """Run each target in a daemon thread named ``name-<slot>`` that sees the caller's context variables, and
    wait for them all, calling ``poll`` in the calling thread while waiting and once at the end (progress the
    threads queued). An exception in the calling thread (an interrupt) calls ``stop(error)`` so the threads
    give up, waits for those that started, and is re-raised."""
    threads = [
        threading.Thread(
            target=contextvars.copy_context().run, args=(target,), name=f"{name}-{slot}", daemon=True
        )
        for slot, target in enumerate(targets)
    ]
    started: list[threading.Thread] = []
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.05)
                poll()
        poll()
    except BaseException as error:
        stop(error)
        for thread in started:  # a thread that never started cannot be joined
            thread.join()
        raise
