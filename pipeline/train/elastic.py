"""What a job on a cluster needs beyond one machine: a process group that survives torchrun's
restarts, and checkpoints taken when the cluster asks (SIGTERM), every N minutes or steps, at a step
every rank has reached.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

STORE_TIMEOUT = datetime.timedelta(minutes=30)
"""As long as torch's default process-group time-out: a slow rank may take that long to join."""


def init_process_group(backend: str, rank: int, world_size: int, device_id=None, environ=os.environ) -> None:
    """torch.distributed's default group, on a store of its own for every torchrun restart.

    Under torchrun the ranks share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE), and torch
    2.13's env:// rendezvous uses it as is: the ranks of a restarted attempt find the previous
    attempt's gloo addresses there and fail in `connectFullMesh` (connection refused), with static
    and c10d rendezvous alike. A PrefixStore keyed by TORCHELASTIC_RESTART_COUNT gives each attempt
    clean keys. `environ` is read here, once, at the edge (the torchrun variables)."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
        return
    store = dist.TCPStore(
        environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), world_size, is_master=False, timeout=STORE_TIMEOUT
    )
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = dist.PrefixStore(f"clipstream/restart-{attempt}/", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, device_id=device_id)


class CheckpointTriggers:
    """When to checkpoint besides the end of an epoch: every `every_steps` steps, every `every_min`
    minutes, and as soon as SIGTERM arrives (a scheduler's preemption notice) on any rank.

    `due(step)` is asked at every step boundary, on every rank, and answers alike on all of them:
    the ranks' wishes are combined (max) in one small collective, on a CPU (gloo) group even when
    training on NCCL, so that it never waits for the GPU. A clock or a signal that reaches one rank
    first thus makes every rank checkpoint at the same step."""

    def __init__(self, every_steps: int, every_min: float, world_size: int, on_cuda: bool):
        self.every_steps, self.every_min, self.world_size = every_steps, every_min, world_size
        self.terminated = False
        self.last_step = 0
        self.last_time = time.monotonic()
        self.group = dist.new_group(backend="gloo") if world_size > 1 and on_cuda else None
        self._previous = None

    def install(self, last_step: int = 0) -> CheckpointTriggers:
        """Catch SIGTERM from here on; `close()` puts the old handler back. Outside the main thread
        (where Python cannot catch signals) SIGTERM keeps its own handling."""
        self.last_step = last_step
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame) -> None:
        self.terminated = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def due(self, step: int) -> bool:
        """Whether every rank checkpoints now (after `step`); True also when SIGTERM came (see `stop`)."""
        wishes = [
            float(self.terminated),
            float(bool(self.every_min) and time.monotonic() - self.last_time >= 60 * self.every_min),
            float(bool(self.every_steps) and step - self.last_step >= self.every_steps),
        ]
        if self.world_size > 1:
            agreed = torch.tensor(wishes, dtype=torch.float64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
            wishes = agreed.tolist()
        self.terminated = self.terminated or bool(wishes[0])
        return any(wishes)

    def taken(self, step: int, epoch_end: bool = False) -> None:
        """A checkpoint was written after `step`: the intervals start again (an epoch's own checkpoint
        restarts the clock only: `every_steps` counts from the last checkpoint it called for)."""
        if not epoch_end:
            self.last_step = step
        self.last_time = time.monotonic()

    @property
    def stop(self) -> bool:
        """SIGTERM came (on this or another rank): checkpoint, then exit with 143."""
        return self.terminated
