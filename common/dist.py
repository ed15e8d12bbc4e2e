"""Processes, devices and collectives: torchrun, SLURM (srun) or a single process.

`setup(device)` reads the launcher's environment, initialises torch.distributed when
there is more than one process (NCCL on GPU, gloo on CPU) and returns a `Runtime`.
`gather_with_grad` is the all_gather SimCLR needs: the result keeps the autograd
graph of the local slice, and its backward sums every rank's gradient for it;
`all_reduce_with_grad` is the same for a sum over the ranks (Barlow Twins).
"""
import contextlib
import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def _launcher_env():
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) alone."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / torch.distributed.run
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:  # srun
        if "MASTER_ADDR" not in os.environ:
            nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                                   capture_output=True, text=True, check=True).stdout.split()
            os.environ["MASTER_ADDR"] = nodes[0]
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def setup(device="auto", timeout_minutes=None):
    """Initialise the process group (if launched with several processes) and pick the device."""
    rank, world_size, local_rank = _launcher_env()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available.")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        minutes = timeout_minutes or float(os.environ.get("SSL_DIST_TIMEOUT_MINUTES", 30))
        timeout = datetime.timedelta(minutes=minutes)
        kwargs = dict(init_method="env://")
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun --max-restarts: the agent reuses its store; keep this attempt's keys (gloo/NCCL addresses)
            # apart from the failed attempt's, which would otherwise be read back
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            kwargs = dict(store=dist.PrefixStore(f"restart-{restart}", store))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
    return Runtime(rank, world_size, local_rank, device)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier():
    if world_size() > 1:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss used every slice: sum the gradients, keep our slice
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(local):
    """Concatenate `local` [n, ...] from all ranks (same n everywhere), differentiably.

    Gradients reach the local slice from every rank's use of it, so DDP's gradient
    averaging gives exactly the gradient of the single-process loss on the global batch.
    """
    if world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local):
        total = local.detach().clone().contiguous()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss used the sum: each rank's part gets the sum of every rank's gradient
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(local):
    """The sum of `local` over all ranks, differentiably (a statistic of the global batch: Barlow Twins'
    cross-correlation, a BatchNorm's moments over every rank's rows).

    As with gather_with_grad, every rank computes the same loss from the sum and the backward adds up every
    rank's gradient for its own part, so DDP's gradient averaging gives exactly the gradient of the
    single-process loss on the global batch.
    """
    if world_size() == 1:
        return local
    return _AllReduceWithGrad.apply(local)


@torch.no_grad()
def gather(local):
    """Concatenate `local` [n, ...] from all ranks without gradient (queues, memory banks)."""
    if world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def all_reduce_mean(t):
    if world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world_size()
    return t


def broadcast(t, src=0):
    if world_size() > 1:
        dist.broadcast(t, src)
    return t


def autocast(device, precision):
    """Mixed precision context: bf16/fp16 autocast (fp16 on CUDA only), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)
