"""`torchrun --nproc_per_node=2` (gloo) runs of the three ops equal one process on all rows."""
import os
import subprocess
import sys

import pytest
import torch

from common import ops
from tests.helpers import global_data


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(here))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(here, "workers", "dist_ops_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_workers_used_the_compiled_kernels(ranks):
    assert all(r["backend"] == ops.backend() for r in ranks)


def test_sinkhorn_distributed_equals_single_process(ranks):
    data = global_data()
    single = ops.sinkhorn(data["scores"], epsilon=0.01, n_iters=3)
    both = torch.cat([r["sinkhorn"] for r in ranks])
    assert torch.allclose(both, single, atol=1e-6)
    assert torch.allclose(both.double(), ops.sinkhorn_reference(data["scores"].double(), 0.01, 3), atol=1e-5)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_distributed_equals_single_process(ranks, spherical):
    data = global_data()
    c, a = ops.kmeans(data["x"], 13, n_iters=4, spherical=spherical, seed=5)
    (c0, a0), (c1, a1) = ranks[0][f"kmeans_{spherical}"], ranks[1][f"kmeans_{spherical}"]
    assert torch.equal(c0, c1), "ranks disagree on the centroids"
    assert torch.allclose(c0, c, atol=1e-5)
    assert torch.equal(torch.cat([a0, a1]), a)


def test_contrastive_distributed_equals_single_process(ranks):
    data = global_data()
    z = data["z"].clone().requires_grad_()
    loss = ops.contrastive_loss(z, z, data["pos"], 0.1, data["self"], reduction="none")
    loss.sum().backward()
    assert torch.allclose(torch.cat([r["contrastive"][0] for r in ranks]), loss.detach(), atol=1e-5)
    # queries' grad + the all-reduced keys' grad of its rows = the single-process grad of those rows
    assert torch.allclose(torch.cat([r["contrastive"][1] for r in ranks]), z.grad, atol=1e-5)
