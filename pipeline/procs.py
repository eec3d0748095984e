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
"""

from __future__ import annotations

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
        proc.start()
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
    if caught:
        raise caught[0]
