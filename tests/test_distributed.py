"""torchrun --nproc_per_node=2 (gloo): distributed SimCLR equals one process on the global batch."""
import torch

import simclr
from common import cli
from tests.helpers import run_torchrun


def test_two_rank_simclr_step_equals_single_process(tmp_path):
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_simclr_worker.py", out)
    saved = torch.load(out, weights_only=False)
    args = cli.parse_args(simclr.Args, None, ["--arch", "resnet18", "--hidden-dim", "64", "--crops", "2x32"])
    model = simclr.SimCLR(args).double()
    model.load_state_dict(saved["initial"])
    n, world, views = saved["n_per_rank"], saved["world_size"], saved["views"]
    # the trunk sees each rank's half separately (BatchNorm statistics are per rank without
    # SyncBN); the loss then runs once over the whole global batch, view-major
    halves = [model([v[r * n:(r + 1) * n] for v in views]).reshape(len(views), n, -1) for r in range(world)]
    z = torch.cat(halves, dim=1).reshape(len(views) * n * world, -1)
    loss = simclr.nt_xent_loss(z, len(views), 0.2)
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-8, atol=1e-11, msg=name)
