"""Run under torchrun: two training steps of npid.py (or pirl.py, argv[2]) on 2 ranks (gloo, CPU).

Every rank records its memory bank; after training each rank saves its bank, Z and the
initial bank to <argv[1]>/rank<r>.pt for tests/test_npid.py and tests/test_pirl.py to compare.
"""
import importlib
import sys
from pathlib import Path

import torch

from common import cli, dist

out, method = Path(sys.argv[1]), importlib.import_module(sys.argv[2])
banks = []


class RecordedBank(method.MemoryBank):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial = self.bank.clone()
        banks.append(self)


method.MemoryBank = RecordedBank
args = cli.parse_args(method.Args, method.PRESETS, sys.argv[3:] + ["--output-dir", str(out / "run")])
runtime = dist.setup("cpu")
torch.manual_seed(args.seed)
method.train(args, runtime)
torch.save({"bank": banks[0].bank, "initial": banks[0].initial, "z": banks[0].z, "world_size": runtime.world_size},
           out / f"rank{runtime.rank}.pt")
dist.barrier()  # let every rank finish its collectives before tearing gloo down
dist.cleanup()
