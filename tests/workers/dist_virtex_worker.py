"""Run under torchrun: one DDP step of VirTex (bicaptioning, label smoothing 0.1) on 2 ranks (gloo, float64).

    dist_virtex_worker.py OUT

Every rank builds the same float64 model (seed 0) and the same global batch of images and captions, takes its half
and runs one DDP step (forward with dropout drawn from the seed 100 + rank, loss, backward, gradient clipping, SGD
at lr multiplier 0.5); every rank saves the initial weights, the batch, the all-reduced loss, the averaged gradients
and the weights after the step to OUT.<rank> for tests/test_virtex.py to compare with one process.
"""
import sys

import torch

import virtex
from common import cli, dist, optim

out = sys.argv[1]
runtime = dist.setup("cpu")
argv = ["--arch", "resnet18", "--textual-width", "32", "--textual-heads", "2", "--max-caption-length", "8",
        "--label-smoothing", "0.1"]
args = cli.parse_args(virtex.Args, None, argv)
n_per_rank, vocab_size = 3, 17
torch.manual_seed(0)
model = virtex.VirTex(args, vocab_size).double()
initial = {k: v.clone() for k, v in model.state_dict().items()}
world = n_per_rank * runtime.world_size
images = torch.randn(world, 3, 32, 32, dtype=torch.float64)
tokens = torch.full((world, 8), virtex.PAD)
for b in range(world):
    n = 3 + b % 5
    tokens[b, :n] = torch.randint(len(virtex.SPECIALS), vocab_size, (n,))
    tokens[b, 0], tokens[b, n - 1] = virtex.SOS, virtex.EOS
part = slice(runtime.rank * n_per_rank, (runtime.rank + 1) * n_per_rank)

ddp = torch.nn.parallel.DistributedDataParallel(model)
model.train()
torch.manual_seed(100 + runtime.rank)
loss, _ = virtex.virtex_loss(ddp(images[part], tokens[part]), tokens[part], "bicaptioning", args.label_smoothing)
loss.backward()
grads = {name: p.grad.clone() for name, p in model.named_parameters()}
torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
optimizer = virtex.build_optimizer(model, args, world)
optim.set_lr(optimizer, 0.5)
optimizer.step()
loss = dist.all_reduce_mean(loss.detach())
torch.save({"initial": initial, "images": images, "tokens": tokens, "n_per_rank": n_per_rank, "argv": argv,
            "vocab_size": vocab_size, "loss": loss, "grads": grads, "after": model.state_dict()},
           f"{out}.{runtime.rank}")
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
