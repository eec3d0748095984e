"""The packer's decoder processes: forked workers, a time-out per clip, a fresh worker for a hung one.

Not the loader's pool (pipeline.stream.workers.WorkerPool, persistent workers filling batch slots):
this one runs `pack_clip` on one video at a time and must survive decoders that hang or crash.
"""

from __future__ import annotations

import collections
import os
import time

from pipeline import procs


def _decoder_init():
    import signal

    import cv2

    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the packer dies (Linux). Without it a worker whose
    packer was killed -9 while it sent a result larger than the pipe buffer would block for ever:
    it holds a copy of the packer's end of its own pipe (fork), so the pipe never breaks."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the poll loop below still notices between tasks
    if os.getppid() != parent:  # the packer died before prctl took effect
        os._exit(0)


def _decoder_main(conn, parent: int, fn) -> None:
    _die_with(parent)
    _decoder_init()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # the packer was killed (-9): nobody will read our results
                return
            continue
        try:
            args = conn.recv()
        except EOFError:
            return
        if args is None:
            return
        try:
            result = fn(*args)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        conn.send(result)


class _Slot:
    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.tasks: collections.deque = collections.deque()
        """(task, args) sent to this worker, oldest (the one running) first."""
        self.deadline = 0.0


class DecoderPool:
    """Forked worker processes with a time-out per task that kills a hung decoder (a native call
    that never returns can be stopped no other way) and forks a fresh one in its place.

    Hand-written in place of pebble's ProcessPool: measured here, pebble took 0.25 s to import and
    0.1-0.15 s to start and stop, against 0.01-0.03 s for a plain pool, out of a 3 s pack of 153
    clips. A pipe per worker and `multiprocessing.connection.wait` are all it needs. Each worker
    holds `depth` tasks, so it starts the next clip while the packer writes a shard.
    """

    def __init__(self, workers: int, fn, timeout: float, depth: int = 2):
        import multiprocessing

        self._mp = multiprocessing.get_context("fork")
        self._fn, self.timeout, self.depth = fn, timeout, depth
        self._slots = [self._start() for _ in range(workers)]

    def _start(self) -> _Slot:
        ours, theirs = self._mp.Pipe()
        proc = self._mp.Process(target=_decoder_main, args=(theirs, os.getpid(), self._fn), daemon=True)
        try:
            procs.start(proc)  # a Ctrl-C during the fork stops the pack (the worker dies with it)
        finally:
            theirs.close()
        return _Slot(proc, ours)

    def idle(self) -> bool:
        return any(len(s.tasks) < self.depth for s in self._slots)

    def busy(self) -> bool:
        return any(s.tasks for s in self._slots)

    def submit(self, task: int, args: tuple) -> None:
        slot = min(self._slots, key=lambda s: len(s.tasks))
        slot.conn.send(args)
        if not slot.tasks:
            slot.deadline = time.monotonic() + self.timeout
        slot.tasks.append((task, args))

    def wait(self) -> list[tuple[int, dict]]:
        """Block until a task ends or times out; (task, result) of each that did."""
        from multiprocessing.connection import wait

        busy = [s for s in self._slots if s.tasks]
        ready = wait([s.conn for s in busy], max(0.0, min(s.deadline for s in busy) - time.monotonic()))
        done = []
        for slot in busy:
            if slot.conn in ready:
                try:
                    result = slot.conn.recv()
                except (EOFError, OSError):
                    slot.proc.join()
                    result = {"error": f"decoder process died (exit code {slot.proc.exitcode})"}
                    self._replace(slot)
            elif time.monotonic() >= slot.deadline:
                result = {"error": f"decoding took longer than {self.timeout:g} s (time-out)"}
                self._replace(slot)
            else:
                continue
            done.append((slot.tasks.popleft()[0], result))
            slot.deadline = time.monotonic() + self.timeout  # the next task starts now
        return done

    def _replace(self, slot: _Slot) -> None:
        """A fresh worker in place of a dead or killed one; the tasks queued behind go to it."""
        slot.proc.kill()
        slot.proc.join()
        slot.conn.close()
        fresh = self._start()
        slot.proc, slot.conn = fresh.proc, fresh.conn
        for _, args in list(slot.tasks)[1:]:
            slot.conn.send(args)

    def close(self) -> None:
        for s in self._slots:
            try:
                s.conn.send(None)
            except OSError:
                pass
        for s in self._slots:
            s.proc.join(5)
        self.stop()

    def stop(self) -> None:
        for s in self._slots:
            if s.proc.is_alive():
                s.proc.kill()
            s.proc.join()
            s.conn.close()
