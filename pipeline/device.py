"""The machine side of a job: which rank this process is, how many cores it may use, which device
it computes on, and the host-to-device copy of batches (`ModelInput`)."""

from __future__ import annotations

import dataclasses
import os

import torch

from pipeline.config import default_workers
from pipeline.errors import UserError

# Kinetics-400 statistics, the usual normalisation of the r3d / r(2+1)d recipes.
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""
    local_world_size: int = 1
    """Processes on this machine (share its CPU cores)."""

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} outside a world of {self.world_size}")

    @classmethod
    def from_env(cls) -> DistEnv:
        """The torchrun variables, or a single process when they are absent."""
        env = os.environ
        if "WORLD_SIZE" not in env:
            return cls()
        local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), local_world)


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The library's one detection of the distributed job: the arguments when given, else
    torch.distributed's rank and world size when it is initialised, else (0, 1). A process that
    torchrun (or Lightning, accelerate, Slurm's srun with torchrun) started as one of several, with
    no process group yet, is an error: taking rank 0 of 1 there would make every rank read every clip."""
    import torch.distributed as dist

    if rank is None or world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        env_world = os.environ.get("WORLD_SIZE", "1")
        if not initialised and env_world.strip() not in ("", "0", "1"):
            raise UserError(
                f"WORLD_SIZE={env_world} and RANK={os.environ.get('RANK', '?')} say this is one process of a distributed "
                "job, but torch.distributed is not initialised: iterate after init_process_group (Lightning and "
                "accelerate do it before training starts), or pass `rank` and `world_size`"
            )
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    if not (isinstance(rank, int) and isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise UserError(f"`rank` must be in 0..world_size-1 and `world_size` >= 1, got rank {rank!r} of {world_size!r}")
    return rank, world_size


def known_rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int] | None:
    """rank_and_world when it is already known for sure (given, or torch.distributed initialised);
    None while a process group may still come (a loader made in a DataModule's __init__)."""
    import torch.distributed as dist

    if (rank is None or world_size is None) and not (dist.is_available() and dist.is_initialized()):
        return None
    return rank_and_world(rank, world_size)


def cores_per_rank(local_world_size: int = 1) -> int:
    """This process's share of the machine's cores (its CPU affinity), at least 1."""
    return max(1, default_workers() // max(1, local_world_size))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda`: the rank's GPU, or a one-line error without one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("`device` is 'cuda' but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def model_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """channels_last_3d for 3D conv nets, channels_last for 2D ones (cnn-lstm: its frames, cut from a
    channels_last_3d clip batch by transpose + reshape, arrive channels_last without a copy)."""
    if any(isinstance(m, torch.nn.Conv3d) for m in model.modules()):
        return torch.channels_last_3d
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.contiguous_format


def to_model_input(video: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 on the host -> normalised (B, 3, T, H, W) float on `device` (a fresh
    buffer each call; the training loop uses a ModelInput, which reuses one)."""
    return ModelInput(device, channels_last)(video)


class ModelInput:
    """(B, T, H, W, 3) uint8 batches on the host -> normalised (B, 3, T, H, W) float on `device`.

    The copy travels as uint8 (4x less than float); the per-pixel work happens on the device.
    (B, T, H, W, 3) is exactly channels_last_3d memory for (B, 3, T, H, W), so no transpose is paid
    there. The result is written into one float buffer reused from batch to batch (on a CPU a fresh
    19 MB buffer per batch is mostly page faults: normalising took 2.8x as long), so each result is
    valid until the next call, which is all a training step needs (backward frees its graph). The
    mean and std live on the device from the start: building them per batch from a Python list was
    a blocking host-to-device copy every step.
    """

    def __init__(self, device: torch.device, channels_last: bool):
        self.device, self.channels_last = device, channels_last
        self.scale = torch.tensor([1 / (255 * s) for s in STD], device=device)
        self.shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.buffer: torch.Tensor | None = None

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        x = video.to(self.device, non_blocking=True)
        batch, frames, height, width, channels = x.shape
        if self.buffer is None or self.buffer.numel() != x.numel():
            self.buffer = torch.empty(x.numel(), dtype=torch.float32, device=self.device)
        if self.channels_last:
            # Normalise the memory as rows of width x 3 values against a per-row pattern of scales:
            # long inner loops (a 3-long channel loop is 1.8x slower on a CPU), and the result is
            # already channels_last_3d memory for (B, 3, T, H, W).
            if width not in self.rows:
                self.rows[width] = (self.scale.repeat(width), self.shift.repeat(width))
            scale, shift = self.rows[width]
            rows = self.buffer.view(-1, width * channels)
            rows.copy_(x.reshape(-1, width * channels))
            torch.addcmul(shift, rows, scale, out=rows)
            return rows.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        # One pass, uint8 in, float out, written straight in contiguous layout: x * scale - shift.
        dense = self.buffer.view(batch, channels, frames, height, width)
        return torch.addcmul(
            self.shift.view(1, 3, 1, 1, 1), x.permute(0, 4, 1, 2, 3), self.scale.view(1, 3, 1, 1, 1), out=dense
        )
