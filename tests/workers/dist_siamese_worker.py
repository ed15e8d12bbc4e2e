"""Run under torchrun: one DDP step of BYOL or SimSiam on 2 ranks (gloo, SyncBN off).

    dist_siamese_worker.py METHOD OUT     (METHOD: byol or simsiam)

Every rank builds the same float64 model (seed 0) and the same global batch of two views, takes its half and
runs one DDP step (forward, loss, backward, the method's optimizer step, BYOL's target update); every rank saves
the initial weights, the batch, the all-reduced loss, the averaged gradients and the state after the step to
OUT.<rank> for tests/test_byol.py and tests/test_simsiam.py to compare with one process.
"""
import sys

import torch

import byol
import simsiam
from common import cli, dist, optim

method, out = sys.argv[1], sys.argv[2]
module = {"byol": byol, "simsiam": simsiam}[method]
runtime = dist.setup("cpu")
args = cli.parse_args(module.Args, None, ["--arch", "resnet18", "--hidden-dim", "32", "--embedding-dim", "16",
                                          *(["--predictor-hidden-dim", "8"] if method == "simsiam" else [])])
n_per_rank = 5
torch.manual_seed(0)
model = (byol.BYOL(args) if method == "byol" else simsiam.SimSiam(args)).double()
initial = {k: v.clone() for k, v in model.state_dict().items()}
views = [torch.randn(n_per_rank * runtime.world_size, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
mine = [v[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for v in views]

ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = module.build_optimizer(model, args)
optim.set_lr(optimizer, 0.5)
loss = (byol.byol_loss if method == "byol" else simsiam.simsiam_loss)(*ddp(mine))
loss.backward()
grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
optimizer.step()
if method == "byol":
    model.update_target(0.9)
loss = dist.all_reduce_mean(loss.detach())
torch.save({"initial": initial, "views": views, "n_per_rank": n_per_rank, "world_size": runtime.world_size,
            "loss": loss, "grads": grads, "after": model.state_dict()}, f"{out}.{runtime.rank}")
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
