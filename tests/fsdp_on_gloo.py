"""One torchrun rank of `qlora train RECIPE [--set KEY=VALUE ...]` with FSDP on gloo CPU ranks: the device gates
lifted, everything else as on GPUs.

accelerate 1.16 makes its FSDP plugin for accelerator devices only (AcceleratorState leaves gloo ranks MULTI_CPU, so
the trainer would run DDP), and qlora refuses fsdp without CUDA for that reason. Here both gates let CPU ranks
through, so transformers' fsdp_config, accelerate's fsdp2_prepare_model, torch's fully_shard over the 4-bit weights,
qlora's checkpoints of the sharded adapter and their resume run for real; torch.load (pickle) is refused, so nothing
is read back through it. Each rank writes rank-N.json beside the recipe: its share of the frozen base's bytes once
sharded, and the dtypes of the base and the adapter.

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_on_gloo.py RECIPE [--set KEY=VALUE ...]
"""

import functools
import json
import os
import sys
from pathlib import Path
from unittest import mock

import accelerate.accelerator
import torch
from accelerate.state import AcceleratorState, DistributedType, PartialState

import qlora.plan
from qlora.cli import app

accelerator_state = AcceleratorState.__init__
check_fsdp = qlora.plan.check_fsdp
prepare = accelerate.accelerator.fsdp2_prepare_model


@functools.wraps(accelerator_state)
def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    """What AcceleratorState does for an FSDP plugin on GPUs, for the gloo ranks too."""
    accelerator_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


def check_fsdp_as_on_gpus(q, optimizer):
    with mock.patch("torch.cuda.is_available", return_value=True):
        check_fsdp(q, optimizer)


def prepare_and_record(accelerator, model):
    model = prepare(accelerator, model)
    here, whole = 0, 0
    for param in model.parameters():
        if not param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param
            here += local.numel() * local.element_size()
            whole += param.numel() * param.element_size()
    record = {"base_bytes_here": here, "base_bytes": whole,
              "base_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
              "adapter_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})}
    Path(sys.argv[1]).with_name(f"rank-{os.environ['RANK']}.json").write_text(json.dumps(record))
    return model


def no_pickle(source, *args, **kwargs):
    raise AssertionError(f"torch.load({source!r}): qlora reads checkpoints without pickle")


AcceleratorState.__init__ = fsdp_on_cpu
torch.load = no_pickle
qlora.plan.check_fsdp = check_fsdp_as_on_gpus
accelerate.accelerator.fsdp2_prepare_model = prepare_and_record
app(["train", *sys.argv[1:]])
