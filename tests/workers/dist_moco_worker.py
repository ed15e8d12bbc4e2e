"""Run under torchrun: one MoCo step on 2 ranks (gloo, float64); rank 0 saves what test_moco.py compares.

Every rank builds the same model (seed 0; its random queue comes from --seed, default 0) and the
same global batch and takes its half; the key batch is shuffled across ranks (Shuffling BN, one chunk
per rank), the loss is averaged by DDP, and the gathered keys are enqueued. Saved: initial weights
(with the random queue), both ranks' initial queues, the batch, the all-reduced loss, the averaged
gradients, the queue and its pointer after the step, and the key encoder.
"""
import sys

import torch

import moco
from common import cli, dist

runtime = dist.setup("cpu")
args = moco.resolve_version_defaults(cli.parse_args(moco.Args, None, [
    "--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16", "--queue-size", "36"]))
n_per_rank = 6
torch.manual_seed(0)
model = moco.MoCo(args).double()
initial = {k: v.clone() for k, v in model.state_dict().items()}
initial_queues = dist.gather(model.queue.unsqueeze(0))  # every rank's, before DDP could broadcast anything
images = [torch.randn(n_per_rank * runtime.world_size, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
mine = [x[runtime.rank * n_per_rank:(runtime.rank + 1) * n_per_rank] for x in images]

ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
torch.manual_seed(1)  # the Shuffling-BN permutation (rank 0's is broadcast)
q, k = ddp(mine[0], mine[1], 0.9, 1)
loss = moco.moco_loss(q, k, model.negatives(), 0.2)
loss.backward()
model.enqueue(dist.gather(k))
loss = dist.all_reduce_mean(loss.detach())
if runtime.is_main:
    torch.save({"initial": initial, "initial_queues": initial_queues, "images": images, "n_per_rank": n_per_rank,
                "world_size": runtime.world_size,
                "loss": loss, "grads": {name: p.grad for name, p in model.named_parameters() if p.grad is not None},
                "queue": model.queue.clone(), "queue_ptr": int(model.queue_ptr),
                "queue_filled": int(model.queue_filled),
                "key_encoder": {k: v.clone() for k, v in model.key_encoder.state_dict().items()}}, sys.argv[1])
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
