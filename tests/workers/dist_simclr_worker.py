"""Run under torchrun: SimCLR loss and gradients of a 2-rank step (gloo, SyncBN off).

    dist_simclr_worker.py OUT [simclr.py flags...]   (default --crops 2x32; e.g. --crops 2x32,4x16 --head-bn)

Every rank builds the same model (seed 0) and the same global batch, takes its half, and
runs one DDP step; rank 0 saves the flags, the initial weights, the batch, the all-reduced
loss and the averaged gradients to OUT for tests/test_distributed.py and
tests/test_fidelity_simclr.py to compare with one process.
"""
import sys

import torch

import simclr
from common import cli, dist

runtime = dist.setup("cpu")
flags = ["--arch", "resnet18", "--hidden-dim", "64", "--crops", "2x32", *sys.argv[2:]]
args = cli.parse_args(simclr.Args, None, flags)
n_per_rank = 6
sizes = [size for count, size in simclr.parse_crops(args.crops) for _ in range(count)]
torch.manual_seed(0)
model = simclr.SimCLR(args).double()  # float64: the comparison is exact up to rounding
initial = {k: v.clone() for k, v in model.state_dict().items()}
views = [torch.randn(n_per_rank * runtime.world_size, 3, size, size, dtype=torch.float64) for size in sizes]
mine = [v[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for v in views]

ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = simclr.nt_xent_loss(ddp(mine), len(views), 0.2)
loss.backward()
loss = dist.all_reduce_mean(loss.detach())
if runtime.is_main:
    torch.save({"flags": flags, "initial": initial, "views": views, "n_per_rank": n_per_rank,
                "world_size": runtime.world_size, "loss": loss,
                "grads": {name: p.grad for name, p in model.named_parameters() if p.requires_grad}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
