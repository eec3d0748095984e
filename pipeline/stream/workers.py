"""Persistent loader processes that write whole batches into reused shared-memory slots.

Why not torch's DataLoader: it sends every batch in a fresh shared-memory segment (writing 4.8 MB
into fresh pages is page faults: ~4.5 ms a batch of 8 clips on 2 cores, half as much as decoding
them), it forks a new set of workers for every epoch (each refills its shuffle buffer before its
first batch, and their memory overlaps the previous set's), and its segments live in /dev/shm,
which containers cap at 64 MB by default ("bus error" in Docker).

Here each worker owns a ring of `slots` batch buffers, allocated once before the workers start; a
worker fills a free slot and sends the slot number with the small per-batch fields (keys, labels,
faults) through a pipe; the parent reads the slot in place and hands it back when the consumer asks
for the next batch. On Linux the ring is anonymous shared memory inherited through fork (no /dev/shm
file, no size cap); elsewhere workers are spawned and the ring is a torch shared-memory tensor.

A producer is a picklable callable `produce(worker, ring) -> Iterator[dict]`: it takes a free slot
with `ring.take()` -> (slot, uint8 array), fills it, and yields a message {"slot": slot, "n": rows,
...}; messages without "slot" (markers, faults) pass through as they are. With 0 workers the
producer runs in the calling process, one message per `get`.
"""

from __future__ import annotations

import atexit
import mmap
import os
import queue
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch

from pipeline import procs
from pipeline.errors import LoaderError, WorkerDied

Producer = Callable[[int, "object"], Iterator[dict]]

# The parent's ends of every worker pipe of this process. A forked worker closes its copies first
# thing: otherwise, if the parent died, each worker would hold its own pipe (and its siblings')
# open and wait for ever for a message, holding the run's stdout open with it.
_PARENT_ENDS: set = set()
# Pools of this process still running, closed (bounded) at exit before multiprocessing's own exit
# handler, which joins daemon processes without a time-out.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_AT_EXIT: list[bool] = []


def default_signals() -> None:
    """In a loader process: drop the signal handlers inherited from the parent (Lightning's, a SLURM
    requeue helper's): with them a worker ignores the SIGTERM that ends it at exit, and the exit
    waits for it for ever. SIGINT is the parent's to handle: ignored here, the parent stops us."""
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):  # pragma: no cover - a signal Python cannot query
            continue
        if callable(handler):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _close_live_pools() -> None:
    for pool in list(_LIVE):
        try:
            pool.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: whatever is left, multiprocessing kills
            pass


class _Stop(Exception):
    """The parent asked this worker to stop (or went away)."""


class LocalRing:
    """The slots of the in-process producer (0 workers): plain memory, freed by `free`."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.free_slots = list(range(len(array)))

    def take(self) -> tuple[int, np.ndarray]:
        if not self.free_slots:
            raise RuntimeError("no free batch slot: the consumer holds all of them")
        slot = self.free_slots.pop(0)
        return slot, self.array[slot]

    def free(self, slot: int) -> None:
        self.free_slots.append(slot)


class _WorkerRing:
    """A worker's side of its ring: free slots come back from the parent through the pipe."""

    def __init__(self, array: np.ndarray, conn):
        self.array, self.conn = array, conn
        self.free_slots = list(range(len(array)))

    def take(self) -> tuple[int, np.ndarray]:
        while self.conn.poll() or not self.free_slots:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                raise _Stop from None
            if message is None:
                raise _Stop
            self.free_slots.append(message)
        slot = self.free_slots.pop(0)
        return slot, self.array[slot]


def _worker_main(produce: Producer, worker: int, conn, ring, slot_shape: tuple[int, ...]) -> None:
    for end in list(_PARENT_ENDS):
        end.close()
    _PARENT_ENDS.clear()
    _LIVE.clear()
    default_signals()
    # SIGTERM too (a scheduler sends it to every process of the job): the rank checkpoints on it and
    # still needs this worker's batches until then; it closes us after (a bounded join, then kill).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(os, "SCHED_BATCH"):
        # A batch task does not preempt the task that wakes it. Without this, handing a slot back
        # woke the worker, which took the trainer's core until the next scheduler tick: 3-4 ms
        # lost at every other step with 2 workers on 2 cores; with it, none (throughput unchanged).
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # pragma: no cover - a sandbox that forbids it
            pass
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass
    array = ring.numpy() if isinstance(ring, torch.Tensor) else np.frombuffer(ring, np.uint8)
    array = array.reshape(-1, *slot_shape)
    try:
        for message in produce(worker, _WorkerRing(array, conn)):
            conn.send(message)
        conn.send({"done": True})
    except _Stop:
        pass
    except BaseException:  # noqa: BLE001 - whatever it is, the parent must hear of it
        try:
            conn.send({"error": traceback.format_exc()})
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()


class Closing:
    """`with` support and a last-chance close for objects that own worker processes."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class WorkerPool(Closing):
    """`workers` processes (0: none, the producer runs here), each with `slots` buffers of `slot_shape`.

    `get(w)` returns worker w's next message, with "frames" set to a uint8 tensor view of its slot's
    first "n" rows; the view stays valid until `release(w, message)`.
    """

    def __init__(
        self, produce: Producer, workers: int, slot_shape: tuple[int, ...], slots: int, start_method: str | None = None
    ):
        self.workers, self.slot_shape, self.slots = workers, tuple(slot_shape), slots
        self.closed = False
        slot_bytes = int(np.prod(self.slot_shape))
        if workers == 0:
            self.local = LocalRing(np.empty((slots, *self.slot_shape), np.uint8))
            self.views = [torch.from_numpy(self.local.array)]
            self.source = produce(0, self.local)
            return
        method = start_method or ("fork" if sys.platform == "linux" else "spawn")
        ctx = torch.multiprocessing.get_context(method)
        if not _AT_EXIT:  # registered after multiprocessing's exit handler, so it runs before it
            atexit.register(_close_live_pools)
            _AT_EXIT.append(True)
        _LIVE.add(self)
        self.conns, self.procs, self.views, self._maps = [], [], [], []
        try:
            self._start(produce, ctx, method, slot_bytes)
        except BaseException:  # a Ctrl-C while starting: stop the workers already started
            self.close()
            raise

    def _start(self, produce: Producer, ctx, method: str, slot_bytes: int) -> None:
        slots = self.slots
        for w in range(self.workers):
            if method == "fork":
                # Anonymous shared memory: inherited by the forked worker, not a /dev/shm file.
                ring = mmap.mmap(-1, slots * slot_bytes)
                self._maps.append(ring)
                view = torch.frombuffer(ring, dtype=torch.uint8)
            else:
                ring = view = torch.empty(slots * slot_bytes, dtype=torch.uint8).share_memory_()
            self.views.append(view.view(slots, *self.slot_shape))
            parent_end, child_end = ctx.Pipe(duplex=True)
            _PARENT_ENDS.add(parent_end)
            proc = ctx.Process(
                target=_worker_main,
                args=(produce, w, child_end, ring, self.slot_shape),
                daemon=True,
                name=f"clipstream-loader-{w}",
            )
            # Recorded before it starts, for close(): a Ctrl-C that procs.start raises (after the fork)
            # leaves a started worker, and an exit would wait on it for ever (it ignores SIGTERM).
            self.conns.append(parent_end)
            self.procs.append(proc)
            try:
                procs.start(proc)
            finally:
                child_end.close()

    def get(self, worker: int) -> dict:
        if self.workers == 0:
            message = next(self.source, None)
            if message is None:
                message = {"done": True}
        else:
            message = self._receive(worker)
        if "error" in message:
            raise LoaderError(f"loader worker {worker} failed:\n{message['error']}")
        if "slot" in message:
            message["frames"] = self.views[worker][message["slot"]][: message["n"]]
        return message

    def _receive(self, worker: int) -> dict:
        conn, proc = self.conns[worker], self.procs[worker]
        while not conn.poll(0.5):
            if not proc.is_alive() and not conn.poll():
                raise WorkerDied(_died(worker, proc.exitcode))
        try:
            return conn.recv()
        except (EOFError, OSError):
            proc.join(1)
            raise WorkerDied(_died(worker, proc.exitcode)) from None

    def release(self, worker: int, message: dict) -> None:
        """Hand the message's slot back to its worker (after its rows were used or copied)."""
        if "slot" not in message or self.closed:
            return
        message.pop("frames", None)
        if self.workers == 0:
            self.local.free(message["slot"])
            return
        try:
            self.conns[worker].send(message["slot"])
        except (BrokenPipeError, OSError):
            pass  # the worker has finished or died; get() reports a death

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.workers == 0:
            close = getattr(self.source, "close", None)
            if close:
                close()
            return
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            if proc.pid is None:  # interrupted before it started
                continue
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            if proc.is_alive():  # pragma: no cover - stuck in native code
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            _PARENT_ENDS.discard(conn)
            conn.close()

    def pids(self) -> list[int]:
        return [] if self.workers == 0 else [p.pid for p in self.procs if p.pid is not None]


def _died(worker: int, code: int | None) -> str:
    if code is None:
        reason = "its pipe closed"
    elif code < 0:
        try:
            reason = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            reason = f"killed by signal {-code}"
    else:
        reason = f"exit code {code}"
    hint = " (out of memory? see dmesg)" if code == -signal.SIGKILL else ""
    return f"loader worker {worker} died: {reason}{hint}"


def threaded(
    source: Iterator[dict], transform: Callable[[dict], dict], depth: int = 2, init: Callable[[], None] | None = None
) -> Iterator[dict]:
    """Run `source` and `transform` (e.g. copying a batch into pinned memory) in a background thread,
    `depth` items ahead of the consumer; exceptions reach the consumer in order. `init` runs first in
    the thread (e.g. selecting the rank's GPU, without which pinning would open a CUDA context on GPU 0).

    The source is advanced only by the thread, so a slot it frees on its next step is freed after
    `transform` has copied out of it.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        """Queue `item` unless the consumer has gone (then a full queue would block for ever)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            if init is not None:
                init()
            for item in source:
                if not put(transform(item)):
                    return
            put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=run, daemon=True, name="clipstream-transfer")
    thread.start()
    try:
        while True:
            item = items.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(5)
