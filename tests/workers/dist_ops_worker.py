"""Worker of tests/test_ops_distributed.py, run as `torchrun --nproc_per_node=2 tests/workers/dist_ops_worker.py OUT`.

Every rank builds the same global data from a fixed seed, keeps its (uneven) share of
the rows, runs the three ops with torch.distributed (gloo) initialised, and saves its
results to OUT/rank{r}.pt; the test compares them with one process on all rows.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from common import ops  # noqa: E402
from tests.helpers import SPLIT, global_data  # noqa: E402


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = global_data()
    results = {"backend": ops.backend()}
    for name in ("scores", "x"):
        lo, hi = SPLIT[name][rank], SPLIT[name][rank + 1]
        data[name + "_local"] = data[name][lo:hi]
    results["sinkhorn"] = ops.sinkhorn(data["scores_local"], epsilon=0.01, n_iters=3)
    for spherical in (True, False):
        c, a = ops.kmeans(data["x_local"], 13, n_iters=4, spherical=spherical, seed=5)
        results[f"kmeans_{spherical}"] = (c, a)
    # SimCLR: local queries, keys = every rank's views gathered (gradients flow to both)
    lo, hi = SPLIT["z"][rank], SPLIT["z"][rank + 1]
    z_local = data["z"][lo:hi].clone().requires_grad_()
    gathered = [torch.empty(SPLIT["z"][r + 1] - SPLIT["z"][r], data["z"].shape[1]) for r in range(world)]
    dist.all_gather(gathered, z_local.detach())
    keys = torch.cat(gathered).requires_grad_()
    loss = ops.contrastive_loss(z_local, keys, data["pos"][lo:hi], 0.1, data["self"][lo:hi], reduction="none")
    loss.sum().backward()
    # what a gradient-keeping all_gather does in backward: sum the keys' gradients over ranks
    dist.all_reduce(keys.grad)
    results["contrastive"] = (loss.detach(), z_local.grad + keys.grad[lo:hi])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
