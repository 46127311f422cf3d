"""
distributed.py: torchrun, one process per device. Ranks split each step's groups between them and
agree on everything else: the collectives grpo.py calls (all_sum, gather, my_share), gradients
summed over ranks, DDP/FSDP wrapping, and whole-model state for saving. Outside torchrun every
helper here is a no-op, so the single-process path reads as if it were not here.
"""
import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from configurator import unread


@dataclass
class DistributedOptions:
    # the devices (distributed.py)
    device: str = "auto"           # auto | cpu | cuda | cuda:N (under torchrun: each rank's LOCAL_RANK GPU)
    sharding: Literal["ddp", "fsdp"] = "ddp"  # torchrun: ddp, a copy per rank; fsdp shards weights and Adam

    def checks(self):
        gpus, cuda = cuda_devices(), re.fullmatch(r"cuda(:\d+)?", self.device)
        return [(self.device in ("auto", "cpu") or cuda,
                 f"device: {self.device!r} is not auto, cpu or cuda[:N]"),
                (not cuda or gpus > int(self.device.partition(":")[2] or 0),
                 f"device: {self.device!r}, but "
                 + (f"this machine has {gpus} CUDA device(s)" if gpus else
                    "torch sees no CUDA device here (a CPU build, or no GPU); use --device=cpu")),
                *unread(self, world_size_asked() == 1, ("sharding",),
                        "one process has nothing to share it with (torchrun starts ranks)")]


def cuda_devices():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_distributed(cfg):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) -> this rank's device."""
    if world_size_asked() == 1:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
                            else cfg.device)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def leave_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def world_size():
    return rank_and_world()[1]


def world_size_asked():
    """The number of ranks torchrun starts (before the group is joined): 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def main_rank():
    """Whether this process prints, logs and saves: rank 0 (before the group is joined too)."""
    return os.environ.get("RANK", "0") == "0"


def say(*args, **kwargs):
    """print, on the main rank only."""
    if main_rank():
        print(*args, **kwargs)


def my_share(rows):
    """This rank's part of `rows` (a list or tensor split into world-size equal, consecutive parts,
    as each step's groups are): all of them outside torchrun."""
    rank, world = rank_and_world()
    size = len(rows) // world
    return rows[rank * size:(rank + 1) * size]


def strided_share(rows):
    """Every world-size-th row from this rank's: a share of a list of any length."""
    rank, world = rank_and_world()
    return rows[rank::world]


def padded_share(rows):
    """(strided_share(rows) padded with repeats of rows[0] to the same length on every rank, the
    number of its rows that are not padding): every rank then runs the same number of batches."""
    share = strided_share(rows)
    return share + rows[:1] * (math.ceil(len(rows) / world_size()) - len(share)), len(share)


def backward(loss):
    """Backpropagate a loss already normalised over every rank's batch: DDP and FSDP average the
    ranks' gradients, so each rank's part is scaled by the world size to make that a sum."""
    (loss * world_size()).backward()


@contextlib.contextmanager
def sync_gradients(model, last):
    """Around one micro-batch's backward: DDP all-reduces gradients only after the last one."""
    with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
        yield


def clip_grad_norm(model, max_norm):
    """Clip the gradient norm over all ranks' parameters to max_norm (0: no clipping) -> the norm
    before clipping, a float."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded norm


def every_rank_done(done):
    """Whether every row of `done` [B] bool is True on every rank (ranks stop decoding together,
    as FSDP's weight gathers must pair up); a check of sampling_check's."""
    return sampling_check((~done).sum()) == 0


class RankFailed(Exception):
    """Another rank failed while sampling; its own error is in its output."""


def sampling_check(value, failed=False):
    """The max over ranks of `value` (a 0-d integer tensor), by a collective that also carries
    whether a rank failed. Every collective of sampling is one of these (the decoders' stop checks,
    the tools' rounds, one after each sampler call), so a rank whose sampler raised (an OOM, a
    tool's bug) meets whichever the others wait in with failed=True, and they raise RankFailed
    there rather than wait for it until the collective's timeout (NCCL's: 10 minutes)."""
    if not dist.is_initialized():
        return value.item()
    flags = torch.stack([torch.tensor(int(failed), device=value.device), value.long()]).to(comm_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    someone_failed, top = flags.tolist()
    if someone_failed and not failed:
        raise RankFailed(f"rank {dist.get_rank()} stopped: another rank failed while sampling (its error "
                         "is in its own output)")
    return top


def any_rank(flags):
    """Whether `flags` (e.g. the signals received) is non-empty on any rank."""
    return all_sum(torch.tensor(len(flags))).item() > 0


def reshard(*models):
    """FSDP: free the whole weights a root module keeps after its forward, so that its parameters
    are this rank's shards again (before reading them parameter by parameter)."""
    for model in models:
        for module in model.modules():
            if hasattr(module, "reshard"):
                module.reshard()


def comm_device():
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
            else torch.device("cpu"))


def all_sum(tensor):
    """The sum of `tensor` over ranks."""
    if not dist.is_initialized():
        return tensor
    total = tensor.to(comm_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def gather(tensor):
    """Every rank's [n, ...] rows concatenated in rank order (all ranks hold the same n)."""
    if not dist.is_initialized():
        return tensor
    local = tensor.to(comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def distribute(model, cfg, device, trainable=True):
    """The module that trains: DDP around the model, or with sharding=fsdp the model itself sharded
    in place with fully_shard, a unit per decoder layer (the reference model too, trainable=False)."""
    if not dist.is_initialized():
        return model
    if cfg.sharding == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for module in model.modules():
            if type(module).__name__ in (model._no_split_modules or ()):
                fully_shard(module)
        fully_shard(model)
        return model
    if not trainable:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def full_state(model, optimizer=None):
    """The optimizer's state by parameter name, or the model's weights when FSDP shards them
    (None otherwise: save_pretrained reads the model), whole and on the CPU. Under FSDP every rank
    must call this; rank 0 gets the result."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # None before the first update: the call would make a zero state that counts a step
    if optimizer is not None:
        return get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else None
    if not hasattr(model, "reshard"):  # not an FSDP module
        return None
    weights = get_model_state_dict(model, options=options)
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    # tied weights once, as save_pretrained does
    return {name: w for name, w in weights.items() if name in names}


def load_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state,
                                 options=StateDictOptions(full_state_dict=dist.is_initialized()))
