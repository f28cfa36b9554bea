"""Several processes training one run (DDP through torchrun): who writes, how ranks agree, and the launcher.

torchrun (or `accelerate launch`) starts one process per device with RANK / LOCAL_RANK / WORLD_SIZE set. Every rank
validates the recipe and trains; rank 0 alone writes the run directory and the console, and what rank 0 decides
(start, resume from which checkpoint) is what every rank does. Outside torchrun every helper here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta

SHUTDOWN_SECONDS = 900  # what the launcher gives the ranks to finish their step and checkpoint after a signal


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    return rank() == 0


def start(cpu: bool) -> None:
    """Join the process group (gloo on CPU, the trainer's CPU mode; NCCL on CUDA) and pick this rank's GPU, before
    anything needs the ranks to agree; the trainer's accelerate state then uses this group."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if not is_main():  # rank 0's progress bars speak for all
        from datasets.utils.logging import disable_progress_bar
        from transformers.utils.logging import disable_progress_bar as disable_transformers_bars

        disable_progress_bar()
        disable_transformers_bars()
    if not cpu:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="gloo" if cpu else "nccl", timeout=timedelta(minutes=30))


def finish() -> None:
    """Leave the process group together (a rank exiting with it alive can abort in gloo's teardown).

    What is left of the trainer goes first (gc.collect: it holds reference cycles). Its DDP Reducer keeps a reference
    to the gloo process group; freed after destroy_process_group, the Reducer destroys the group holding the GIL,
    while a gloo worker thread needs the GIL to free the tensors of its last work: a deadlock (torch issue 56297; it
    hung one rank of the SIGTERM test once). destroy_process_group itself releases the GIL."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def from_main(action):
    """Run `action` on rank 0 and return its result on every rank; an exception it raises is raised on every rank,
    so no rank waits for one that failed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return action()
    box = [None, None]
    if is_main():
        try:
            box[0] = action()
        except Exception as exc:  # handed to every rank, raised below
            box[1] = exc
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def on_every_rank(action):
    """Run `action` on every rank; if it raised UserError on any, raise the lowest such rank's on every rank (named
    after its rank when that is not 0), so all stop at once with one message."""
    import torch.distributed as dist

    from qlora.errors import UserError

    if not dist.is_initialized():
        return action()
    result, error = None, None
    try:
        result = action()
    except UserError as exc:  # gathered, raised below
        error = str(exc)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    for number, message in enumerate(errors):
        if message is not None:
            raise UserError(f"rank {number}: {message}" if number else message)
    return result


def gathered(items: list) -> list:
    """Every process's `items` (picklable), rank 0's first, on every process (a collective: every rank calls it at the
    same point); `items` itself outside torchrun."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return items
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def largest(value: int, device) -> int:
    """The largest of every rank's `value` (a collective: every rank calls it at the same point)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def check_launch(nproc_per_node: int, nnodes: str, node_rank: int, master_addr: str, master_port: int,
                 rdzv_endpoint: str | None) -> None:
    """The launcher's flags, each refused in one line before a process starts (torchrun would fail inside).

    At most one process per GPU, or per CPU core without one: what torchrun's own `--nproc-per-node auto` starts."""
    import re

    import torch

    from qlora.errors import UserError

    devices, kind = ((torch.cuda.device_count(), "GPUs") if torch.cuda.is_available()
                     else (os.cpu_count() or 1, "CPU cores"))
    if not 1 <= nproc_per_node <= devices:
        raise UserError(f"--nproc-per-node {nproc_per_node}: give 1 to {devices}, the {kind} of this machine "
                        "(one process each)")
    sizes = re.fullmatch(r"(\d{1,6})(?::(\d{1,6}))?", nnodes)
    low, high = (int(sizes[1]), int(sizes[2] or sizes[1])) if sizes else (0, 0)
    if not 1 <= low <= high:
        raise UserError(f"--nnodes {nnodes!r}: give the number of machines (2) or a range MIN:MAX (2:4)")
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host.strip() or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UserError(f"--rdzv-endpoint {rdzv_endpoint!r}: give HOST:PORT, with a TCP port from 1 to 65535")
        return
    if not 1 <= master_port <= 65535:
        raise UserError(f"--master-port {master_port}: give a TCP port from 1 to 65535")
    if not master_addr.strip():
        raise UserError("--master-addr is empty: give the host name or IP address of machine 0")
    if not 0 <= node_rank < high:
        raise UserError(f"--node-rank {node_rank}: give 0 to {high - 1}, this machine's number among --nnodes {nnodes}")


def launch(worker_args: list[str], nproc_per_node: int, nnodes: str, node_rank: int, master_addr: str,
           master_port: int, rdzv_endpoint: str | None) -> int:
    """Run `python -m qlora <worker_args>` as a torchrun job from this process; return the exit code: the first
    failed rank's, or 128 + N when this launcher got signal N (the ranks got it too and stopped after the same step
    with a checkpoint)."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    rendezvous = (["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint] if rdzv_endpoint else
                  ["--master-addr", master_addr, "--master-port", str(master_port), "--node-rank", str(node_rank)])
    args = get_args_parser().parse_args([
        "--nproc-per-node", str(nproc_per_node), "--nnodes", nnodes, *rendezvous,
        "--shutdown-timeout", os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS)),
        "-m", "qlora", *worker_args,
    ])
    config, entrypoint, cmd_args = config_from_args(args)
    try:
        elastic_launch(config, entrypoint)(*cmd_args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        # a rank killed by a signal reports -N
        return 128 - code if code < 0 else code
    finally:
        sys.stdout.flush()
    return 0
