"""Run under torchrun: one SwAV step on 2 ranks (gloo, float64, SyncBN off) with a queue.

Every rank builds the same model (seed 0), the same global batch of crops and the same global
queue, and takes its half of both; ops.sinkhorn all-reduces over the ranks. Rank 0 saves the
initial weights, the inputs, the all-reduced loss and the averaged gradients to argv[1].
"""
import sys

import torch

import swav
from common import cli, dist

runtime = dist.setup("cpu")
args = cli.parse_args(swav.Args, None, ["--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16",
                                        "--n-prototypes", "10", "--crops", "2x32,2x16"])
n, world = 6, runtime.world_size
torch.manual_seed(0)
model = swav.SwAV(args).double()
model.normalize_prototypes()
initial = {k: v.clone() for k, v in model.state_dict().items()}
crops = [torch.randn(n * world, 3, s, s, dtype=torch.float64) for s in (32, 32, 16, 16)]
queue = torch.nn.functional.normalize(torch.randn(2, 4 * world, 16, dtype=torch.float64), dim=2)
mine = [c[runtime.rank * n:(runtime.rank + 1) * n] for c in crops]
my_queue = queue[:, runtime.rank * 4:(runtime.rank + 1) * 4]

ddp = torch.nn.parallel.DistributedDataParallel(model)
z, scores = ddp(mine)
loss = swav.swav_loss(scores, 4, (0, 1), 0.1, 0.05, 3, my_queue @ model.prototypes.weight.t())
loss.backward()
loss = dist.all_reduce_mean(loss.detach())
if runtime.is_main:
    torch.save({"initial": initial, "crops": crops, "queue": queue, "n_per_rank": n, "world_size": world,
                "loss": loss, "grads": {name: p.grad for name, p in model.named_parameters()}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
