"""The few collectives the loop needs beyond DDP's, each a no-op in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.device import DistEnv


def gather(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """(world_size, *t.shape): every rank's `t`, on every rank."""
    if env.world_size == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def broadcast_text(text: str, env: DistEnv, device: torch.device) -> str:
    """Rank 0's `text` (at most 1024 bytes of UTF-8), on every rank."""
    if env.world_size == 1:
        return text
    buf = torch.zeros(1024, dtype=torch.uint8, device=device)
    if env.rank == 0:
        data = text.encode()[:1024]
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()


def agree_min(value: int, env: DistEnv, device: torch.device) -> int:
    """The smallest of every rank's `value`, on every rank."""
    agreed = torch.tensor([value], device=device)
    if env.world_size > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())
