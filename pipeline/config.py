"""Frozen configuration of the streaming side and the training loop; the CLI maps its options 1:1 onto these fields."""

from __future__ import annotations

import dataclasses

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Where the shards are and how they are read, shuffled, augmented and batched."""

    shards: tuple[str, ...]
    """Training shard patterns: `{000..031}` or `<000..031>` ranges, `::`-separated lists, local paths, http(s) URLs."""
    eval_shards: tuple[str, ...] = ()
    """Test shard patterns; empty: the test shards listed in the index beside the training shards."""
    index: str | None = None
    """Path or URL of index.json; None: `index.json` in the folder (or base URL) of the training shards."""
    batch_size: int = 8
    """Clips per batch on each rank (the global batch is batch_size x world size x grad_accum)."""
    workers: int = 2
    """DataLoader worker processes per rank; each reads its own shards and builds whole batches."""
    shuffle_buffer: int = 256
    """Samples held in each worker's shuffle buffer (raw JPEG bytes, about 150 KB a clip)."""
    crop: int = 112
    """Side of the square crop fed to the model (random in training, centred in evaluation)."""
    seed: int = 0
    """Seed of everything random: shard order, shuffle buffer, crops and flips, model initialisation."""
    resample: bool = False
    """Draw shards with replacement per worker (allows fewer shards than ranks x workers)."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs, which run shell commands."""
    prefetch: int = 2
    """Batches each worker prepares ahead."""
    max_bad_fraction: float = 0.01
    """Stop with an error when more than this share of a worker's samples in an epoch are unreadable."""

    def __post_init__(self):
        if isinstance(self.shards, str) or isinstance(self.eval_shards, str):
            raise ValueError("shards and eval_shards are tuples of patterns, not strings")
        if not self.shards or not all(s.strip() for s in self.shards):
            raise ValueError(f"shards must name at least one pattern, got {self.shards!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (1 = no shuffle), got {self.shuffle_buffer}")
        if self.crop < 1:
            raise ValueError(f"crop must be >= 1, got {self.crop}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run: model, optimisation, evaluation, checkpoints, logging, launch."""

    stream: StreamConfig
    """The data side."""
    model: str = "r3d18"
    """Model name (see pipeline.models.MODEL_NAMES) or `torchvision:<name>`."""
    epochs: int = 10
    """Passes over the training shards."""
    optimizer: str = "adamw"
    """`adamw` or `sgd` (momentum 0.9, Nesterov)."""
    lr: float | None = None
    """Peak learning rate; None: 1e-3 for AdamW, 0.05 for SGD."""
    weight_decay: float = 1e-4
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    schedule: str = "cosine"
    """`cosine` (to zero at the last step) or `step` (x lr_gamma every lr_step_epochs)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimiser steps."""
    lr_step_epochs: int = 10
    """Epochs between decays of the `step` schedule."""
    lr_gamma: float = 0.1
    """Decay factor of the `step` schedule."""
    grad_accum: int = 1
    """Batches whose gradients are summed before each optimiser step."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = True
    """channels_last_3d memory format on CUDA (ignored on CPU)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    eval_every: int = 1
    """Evaluate every this many epochs (and always after the last); 0: only after the last."""
    log_dir: str | None = None
    """Run folder for metrics.jsonl, checkpoints and audit logs; None: runs/<timestamp> (or the resumed run's folder)."""
    log_every: int = 10
    """Steps between step records in metrics.jsonl."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps (0: only at the end of each epoch)."""
    resume: str | None = None
    """Checkpoint file or run folder to continue from."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many steps in total; 0: no limit."""
    audit_keys: bool = False
    """Write the sample keys each rank consumed, per epoch, to <log_dir>/audit/."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    nproc_per_node: int = 1
    """Start this many local processes (gloo on CPU, NCCL on GPU); 1: run in this process (or as launched by torchrun)."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must be named")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_step_epochs < 1:
            raise ValueError(f"lr_step_epochs must be >= 1, got {self.lr_step_epochs}")
        if not 0 < self.lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.optimizer == "adamw" else 0.05
