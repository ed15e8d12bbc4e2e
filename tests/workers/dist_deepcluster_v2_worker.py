"""Run under torchrun: DeepCluster-v2's distributed k-means and one training step on 2 ranks (gloo, float64).

Every rank builds the same model (seed 0), the same global memory banks (two, as crops_for_mb
0 and 1: heads 0 and 1 cluster banks 0 and 1; rows indexed by a permutation of the dataset's
indices, rank-major) and the same global batch, and keeps its own half of both.
Rank 0 saves the initial weights, the inputs, the pseudo-labels, the centroids, the
all-reduced loss and the averaged gradients to argv[1].
"""
import sys

import torch

import deepcluster_v2
from common import cli, dist

runtime = dist.setup("cpu")
args = cli.parse_args(deepcluster_v2.Args, None, ["--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16",
                                                  "--num-clusters", "5", "7", "--crops", "2x32,1x16"])
rows, n, world, n_images = 20, 6, runtime.world_size, 50
torch.manual_seed(0)
model = deepcluster_v2.DeepClusterV2(args).double()
initial = {k: v.clone() for k, v in model.state_dict().items()}
bank = torch.nn.functional.normalize(torch.randn(2, rows * world, 16, dtype=torch.float64), dim=2)  # crops 0, 1
bank_indices = torch.randperm(n_images)[:rows * world]
crops = [torch.randn(n * world, 3, s, s, dtype=torch.float64) for s in (32, 32, 16)]
batch_indices = bank_indices[:n * world].flip(0)
mine = slice(runtime.rank * rows, (runtime.rank + 1) * rows)
batch = slice(runtime.rank * n, (runtime.rank + 1) * n)

labels = deepcluster_v2.cluster_memory(model, bank[:, mine], bank_indices[mine], n_images, 10, seed=5)
ddp = torch.nn.parallel.DistributedDataParallel(model)
z, scores = ddp([c[batch] for c in crops])
loss = deepcluster_v2.deepcluster_loss(scores, labels[:, batch_indices[batch]], len(crops), 0.1)
loss.backward()
loss = dist.all_reduce_mean(loss.detach())
if runtime.is_main:
    torch.save({"initial": initial, "bank": bank, "bank_indices": bank_indices, "crops": crops,
                "batch_indices": batch_indices, "n_per_rank": n, "world_size": world, "n_images": n_images,
                "labels": labels, "centroids": [h.weight.clone() for h in model.prototypes], "loss": loss,
                "grads": {name: p.grad for name, p in model.named_parameters() if p.grad is not None}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
