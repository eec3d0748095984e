"""Starting a worker process without losing a Ctrl-C or SIGTERM that arrives meanwhile.

A Python signal handler runs at the first bytecode after the signal. A signal that comes while
`os.fork()` runs is handled inside the at-fork callbacks (logging registers one in every process),
and Python ignores what a callback raises: it hands the exception to `sys.unraisablehook`, which
prints "Exception ignored", and carries on. The KeyboardInterrupt of a Ctrl-C, or the SystemExit a
rank's SIGINT handler raises, vanishes there, and the program runs on as if no signal had come.

Measured here, before this module: about 1 Ctrl-C in 30 of a two-process `train-stream` landed in
the fork of the evaluation's loader workers. Both ranks trained on, now ignoring later signals,
until torch elastic killed them 30 s later; the rank killed that way left its progress bar's
semaphore behind ("resource_tracker: ... leaked semaphore objects").

Blocking the signals around the fork would not do: the kernel hands a process-directed signal to
another thread (a rank has gloo's, torch's and the loader's), and Python still runs the handler in
the main thread's next callback. So `start` catches what the callbacks swallow and raises it once
the fork is done, where the caller can unwind.

`start` also forks with OpenCV held to one thread. OpenCV's thread pool does not survive a fork: a
child whose parent had run a parallel OpenCV call (a resize, in a script or notebook that packs
through the API) hangs for ever in its first `cv2.setNumThreads(1)`, which every decoder and loader
worker makes (measured here with OpenCV 4.x: about 2 forks in 5). Set to one thread in the parent before
the fork, the pool is stopped, and the child starts clean; the parent's setting is put back after.
"""

from __future__ import annotations

import contextlib
import os
import sys


def start(proc) -> None:
    """`proc.start()` for a multiprocessing Process; an interrupt (KeyboardInterrupt, SystemExit)
    raised while it forked is raised here, after the fork, instead of being ignored. The process
    has started either way: a caller that records its processes records this one first."""
    caught: list[BaseException] = []
    previous = sys.unraisablehook
    parent = os.getpid()

    def hook(unraisable) -> None:
        if os.getpid() == parent and isinstance(unraisable.exc_value, (KeyboardInterrupt, SystemExit)):
            caught.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        with _opencv_on_one_thread():
            proc.start()
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
    if caught:
        raise caught[0]


@contextlib.contextmanager
def _opencv_on_one_thread():
    """OpenCV's thread pool stopped across a fork (see the module's docstring); nothing when this
    process never imported OpenCV or runs it on one thread already."""
    cv2 = sys.modules.get("cv2")
    threads = cv2.getNumThreads() if cv2 is not None and hasattr(cv2, "getNumThreads") else 1
    if threads <= 1:
        yield
        return
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
