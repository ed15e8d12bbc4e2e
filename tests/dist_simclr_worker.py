"""Run under torchrun: SimCLR loss and gradients of a 2-rank step (gloo, SyncBN off).

Every rank builds the same model (seed 0) and the same global batch, takes its half, and
runs one DDP step; rank 0 saves the initial weights, the batch, the all-reduced loss and
the averaged gradients to argv[1] for tests/test_distributed.py to compare with one process.
"""
import sys

import torch

import simclr
from common import cli, dist

runtime = dist.setup("cpu")
args = cli.parse_args(simclr.Args, None, ["--arch", "resnet18", "--hidden-dim", "64", "--crops", "2x32"])
n_per_rank, n_views = 6, 2
torch.manual_seed(0)
model = simclr.SimCLR(args).double()  # float64: the comparison is exact up to rounding
initial = {k: v.clone() for k, v in model.state_dict().items()}
views = [torch.randn(n_per_rank * runtime.world_size, 3, 32, 32, dtype=torch.float64) for _ in range(n_views)]
mine = [v[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for v in views]

ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = simclr.nt_xent_loss(ddp(mine), n_views, 0.2)
loss.backward()
loss = dist.all_reduce_mean(loss.detach())
if runtime.is_main:
    torch.save({"initial": initial, "views": views, "n_per_rank": n_per_rank, "world_size": runtime.world_size,
                "loss": loss, "grads": {name: p.grad for name, p in model.named_parameters()}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
