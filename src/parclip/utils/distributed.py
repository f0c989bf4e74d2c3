"""Native torch.distributed set-up (torchrun or SLURM) and gather-with-gradient.

One code path for every world size: with one process nothing is initialised, `gather_with_grad` is the identity and
the model is not wrapped. Launch multi-GPU or multi-node runs with `torchrun --nproc_per_node N -m parclip.cli train …`
or under `srun` (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, with MASTER_ADDR / MASTER_PORT set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "gather_with_grad", "all_reduce_sum", "barrier", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group: its caller takes it down (cleanup)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_ranks() -> tuple[int, int, int]:
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:  # srun
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Detect torchrun / SLURM and initialise the process group (NCCL on GPU, gloo on CPU) when world size > 1.

    `device`: "auto" (CUDA if available), "cpu" or "cuda". Each rank uses cuda:<local_rank>. A process group that
    exists already (set up by the caller, or by an earlier call) is used as it is; ``owns_group`` says whether this
    call created it, and so whether the caller should :func:`cleanup` when done.
    """
    rank, local_rank, world = _env_ranks()
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
            if "MASTER_ADDR" not in os.environ:
                raise RuntimeError("running under SLURM with several tasks: set MASTER_ADDR and MASTER_PORT")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                timeout=timedelta(minutes=30))
    return DistInfo(rank, local_rank, world, dev, owns_group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice.

    (torch.distributed.nn.all_gather does the same but is deprecated in torch 2.14.)
    """

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, …] from every rank in rank order → [W·n, …], differentiable; identity when W = 1.

    Every rank then computes the loss of the whole global batch L. The backward gives this rank's rows
    Σ_ranks ∂L/∂x = W·∂L/∂x, and DDP's gradient averaging divides by W again, so the update is exactly the
    single-process update on the concatenated batch (the reference skipped DDP and never synchronised:
    docs/reference_differences.md#multi-gpu).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, no gradient); identity without a process group. NCCL reduces GPU tensors
    only, so under NCCL a tensor elsewhere (the training loop's counters live on the CPU) is summed through this
    rank's GPU and copied back."""
    if dist.is_available() and dist.is_initialized():
        if x.device.type != "cuda" and dist.get_backend() == "nccl":
            on_gpu = x.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            x.copy_(on_gpu)
        else:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Take the process group down (a no-op without one); for the caller that created it (``DistInfo.owns_group``),
    when it is done: a group the caller did not create may still be in use by whoever did."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
