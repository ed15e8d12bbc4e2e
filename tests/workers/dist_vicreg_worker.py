"""Run under torchrun: VICReg loss and gradients of a 2-rank step (gloo, SyncBN off).

    dist_vicreg_worker.py OUT

Every rank builds the same model (seed 0) and the same global batch, takes its half, and runs one DDP step;
rank 0 saves the flags, the initial weights, the batch, the all-reduced loss and the averaged gradients to OUT
for tests/test_vicreg.py to compare with one process on the global batch.
"""
import sys

import torch

import vicreg
from common import cli, dist

runtime = dist.setup("cpu")
flags = ["--arch", "resnet18", "--image-size", "32", "--mlp", "24", "16"]
args = cli.parse_args(vicreg.Args, None, flags)
n_per_rank = 5
torch.manual_seed(0)
model = vicreg.VICReg(args).double()  # float64: the comparison is exact up to rounding
initial = {k: v.clone() for k, v in model.state_dict().items()}
views = [torch.randn(n_per_rank * runtime.world_size, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
mine = [v[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for v in views]

ddp = torch.nn.parallel.DistributedDataParallel(model)
loss, terms = vicreg.vicreg_loss(*ddp(mine), args.sim_coeff, args.std_coeff, args.cov_coeff)
loss.backward()
loss = dist.all_reduce_mean(loss.detach())
terms = {name: dist.all_reduce_mean(value.detach()) for name, value in terms.items()}
if runtime.is_main:
    torch.save({"flags": flags, "initial": initial, "views": views, "n_per_rank": n_per_rank,
                "world_size": runtime.world_size, "loss": loss, "terms": terms,
                "grads": {name: p.grad for name, p in model.named_parameters() if p.requires_grad}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
