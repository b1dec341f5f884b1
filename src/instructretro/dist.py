"""Processes: the one place that starts ``torch.distributed`` and asks about ranks.

``init_distributed`` starts training, SFT and generation (through DeepSpeed, single-process
defaults without a launcher); ``start_ranks`` starts block-wise work (embed, query-neighbors) only
under a launcher, with a long timeout; ``is_rank0``, ``rank``, ``barrier``, ``local_device`` and
the gather helpers work the same in every stage and are no-ops (or the identity) in one process.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket

import numpy as np
import torch

from .errors import PipelineError

def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed, select this process's device, and return
    ``(rank, world_size)``.

    Under the ``deepspeed`` launcher the environment is already set. A plain ``python script.py``
    is one process: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT get single-process
    defaults (a free port, so two stages on one machine do not collide). Each process selects
    the accelerator of its ``LOCAL_RANK`` (``set_device``) before the first collective, as NCCL
    needs one GPU per process. On the CPU accelerator DeepSpeed would JIT-compile a shared-memory
    all-reduce op (a C++ build of about 45 s) when the communication backend starts; its only
    consumer is a compatibility table, so we mark the op unavailable there and gloo does the
    collectives.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        import deepspeed.ops as ds_ops

        # Setting the attribute directly skips DeepSpeed's probe of every op (which runs a compiler).
        ops_table = ds_ops.__dict__.setdefault("__compatible_ops__", {})
        ops_table["deepspeed_shm_comm"] = False
    local_device()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False)
        atexit.register(leave_group)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def local_device() -> torch.device:
    """This process's accelerator, ``<accelerator>:LOCAL_RANK`` (``cuda:3`` for local rank 3;
    ``cpu`` on the CPU accelerator), selected as the current device. What the DeepSpeed engine
    uses; code without an engine (evaluation only, generation) puts its model and every tensor
    it hands to a collective here."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def accelerator_name() -> str:
    """``cuda``, ``cpu``, ...: the DeepSpeed accelerator this process trains on."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def local_rank() -> int:
    """This process's GPU index on its node (``LOCAL_RANK`` set by the launcher; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def start_ranks(timeout: datetime.timedelta = datetime.timedelta(hours=24)) -> tuple[int, int]:
    """``(rank, world_size)``; starts ``torch.distributed`` only under a launcher (WORLD_SIZE > 1).

    For block-wise work (embed, query-neighbors): block b belongs to rank b % world, and rank 0
    assembles. gloo on CPU, nccl on GPU (each rank on ``cuda:LOCAL_RANK``). The default timeout
    is long because ranks meet only once, after embedding all their blocks, which can take hours
    on a big corpus.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise PipelineError(f"WORLD_SIZE is {world} but {key} is not set; start the stage with a launcher (deepspeed, torchrun)")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
        atexit.register(leave_group)
    return dist.get_rank(), dist.get_world_size()


def gather_to_rank0(world: int, done: int, seconds: float) -> tuple[int, float] | None:
    """Wait for every rank's blocks; rank 0 gets (texts encoded by all ranks, slowest rank's seconds).

    Other ranks get ``None`` and leave the process group: their part is done. One process: as is.
    """
    if world <= 1:
        return done, seconds
    import torch.distributed as dist

    device = f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"
    counts = torch.tensor([float(done)], dtype=torch.float64, device=device)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # also the barrier: every block file is written
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if dist.get_rank() != 0:
        dist.destroy_process_group()
        return None
    return int(counts.item()), float(slowest.item())


def leave_group() -> None:
    """Leave the process group if this process is still in one. Registered at exit by
    ``init_distributed`` and ``start_ranks``: a process that exits inside the group leaves gloo's
    worker threads running while the interpreter tears down, and under load that aborts the rank
    ("terminate called without an active exception", exit -6) after its work is done; NCCL warns
    about the same. Leaving is local, so a rank that ends first does not wait for the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_ranks(world: int) -> None:
    """Rank 0 leaves the process group once its outputs are written (no-op for one process: a
    stage function called in a process that holds a group of its own, as tests do, keeps it;
    :func:`leave_group` would end it)."""
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not started."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_rows(table: np.ndarray, share: int, lo: int, hi: int) -> np.ndarray:
    """Every rank's rows ``[lo, hi)`` of ``table`` (``share`` rows per rank), all-gathered on
    this process's device (the one the collective needs: NCCL refuses host tensors)."""
    device = local_device()
    mine = torch.full((share, table.shape[1]), -1, dtype=torch.int64, device=device)
    mine[: hi - lo] = torch.from_numpy(table[lo:hi]).to(device)
    parts = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, mine)
    return torch.cat(parts).cpu().numpy()[: len(table)]
