"""Run under torchrun: Barlow Twins loss and gradients of a 2-rank step (gloo, SyncBN off).

    dist_barlow_twins_worker.py OUT

Every rank builds the same model (seed 0) and the same global batch, takes its half, and runs one DDP step;
rank 0 saves the flags, the initial weights, the batch, the all-reduced loss and the averaged gradients to OUT
for tests/test_barlow_twins.py to compare with one process on the global batch.
"""
import sys

import torch

import barlow_twins
from common import cli, dist

runtime = dist.setup("cpu")
flags = ["--arch", "resnet18", "--image-size", "32", "--projector", "24", "16", "--lambd", "0.02"]
args = cli.parse_args(barlow_twins.Args, None, flags)
n_per_rank = 5
torch.manual_seed(0)
model = barlow_twins.BarlowTwins(args).double()  # float64: the comparison is exact up to rounding
initial = {k: v.clone() for k, v in model.state_dict().items()}
views = [torch.randn(n_per_rank * runtime.world_size, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
mine = [v[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for v in views]

ddp = torch.nn.parallel.DistributedDataParallel(model)
loss = barlow_twins.barlow_twins_loss(*ddp(mine), args.lambd)[0]
loss.backward()
loss = dist.all_reduce_mean(loss.detach())
if runtime.is_main:
    torch.save({"flags": flags, "initial": initial, "views": views, "n_per_rank": n_per_rank,
                "world_size": runtime.world_size, "loss": loss,
                "grads": {name: p.grad for name, p in model.named_parameters() if p.requires_grad}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
