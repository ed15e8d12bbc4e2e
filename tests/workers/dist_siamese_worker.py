"""Run under torchrun: one DDP step of BYOL, SimSiam, MoCo v3 or DINO on 2 ranks (gloo, SyncBN off).

    dist_siamese_worker.py METHOD OUT     (METHOD: byol, simsiam, mocov3 or dino)

Every rank builds the same float64 model (seed 0) and the same global batch of two views, takes its half and
runs one DDP step (forward, loss, backward, the method's optimizer step, BYOL's target update, DINO's
centre update); every rank saves
the initial weights, the batch, the all-reduced loss, the averaged gradients and the state after the step to
OUT.<rank> for tests/test_byol.py, tests/test_simsiam.py, tests/test_mocov3.py and tests/test_dino.py to
compare with one process.
"""
import sys

import torch

import byol
import dino
import mocov3
import simsiam
from common import cli, dist, optim

method, out = sys.argv[1], sys.argv[2]
module = {"byol": byol, "simsiam": simsiam, "mocov3": mocov3, "dino": dino}[method]
runtime = dist.setup("cpu")
extra = {"simsiam": ["--predictor-hidden-dim", "8"], "mocov3": ["--optimizer", "lars"],
         "dino": ["--optimizer", "sgd", "--out-dim", "24", "--bottleneck-dim", "8"]}.get(method, [])
args = cli.parse_args(module.Args, None, ["--arch", "resnet18", "--hidden-dim", "32",
                                          *([] if method == "dino" else ["--embedding-dim", "16"]), *extra])
n_per_rank = 5
torch.manual_seed(0)
model = {"byol": byol.BYOL, "simsiam": simsiam.SimSiam, "mocov3": mocov3.MoCoV3, "dino": dino.DINO}[method](args)
model = model.double()
initial = {k: v.clone() for k, v in model.state_dict().items()}
views = [torch.randn(n_per_rank * runtime.world_size, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
mine = [v[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for v in views]

ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = module.build_optimizer(model, args)
optim.set_lr(optimizer, 0.5)
if method == "dino":
    student_out, teacher_out = ddp(mine)
    loss = dino.dino_loss(student_out, teacher_out, model.center, 2, 0.1, 0.04)
elif method == "mocov3":
    loss = mocov3.mocov3_loss(*ddp(mine, 0.9), 0.2)  # keys from the momentum encoder after its step at m = 0.9
else:
    loss = (byol.byol_loss if method == "byol" else simsiam.simsiam_loss)(*ddp(mine))
loss.backward()
grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
optimizer.step()
if method == "byol":
    model.update_target(0.9)
if method == "dino":
    model.update_center(teacher_out, 0.9)
    model.update_teacher(0.9)
loss = dist.all_reduce_mean(loss.detach())
torch.save({"initial": initial, "views": views, "n_per_rank": n_per_rank, "world_size": runtime.world_size,
            "loss": loss, "grads": grads, "after": model.state_dict()}, f"{out}.{runtime.rank}")
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
