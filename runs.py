"""
runs.py: what a training run needs besides the algorithm: torchrun's process group and
collectives, DDP/FSDP wrapping and whole-model state for saving, a run directory written so that
a crash never leaves it unusable (checkpoints, resume), the metrics row and the samples log,
random-number state, signals, progress.
grpo.py and r1.py import these; none of them changes what is computed.
"""
import contextlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from configurator import ConfigError, fields_in_order, read_text, unread


@dataclass
class RunOptions:
    # the run: device, sharding, checkpoints, logging (runs.py)
    device: str = "auto"           # auto | cpu | cuda | cuda:N (under torchrun: each rank's LOCAL_RANK GPU)
    sharding: Literal["ddp", "fsdp"] = "ddp"  # torchrun: ddp, a copy per rank; fsdp shards weights and Adam
    save_every: int = 400          # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2      # checkpoints kept on disk
    max_bad_steps: int = 10        # stop after this many consecutive steps with a non-finite loss/gradient
    wandb: bool = False            # log to Weights & Biases (needs the package)

    def checks(self):
        gpus, cuda = cuda_devices(), re.fullmatch(r"cuda(:\d+)?", self.device)
        return [*[(getattr(self, k) >= 1, f"{k}: must be at least 1")
                  for k in ("save_every", "keep_checkpoints", "max_bad_steps")],
                (self.device in ("auto", "cpu") or cuda,
                 f"device: {self.device!r} is not auto, cpu or cuda[:N]"),
                (not cuda or gpus > int(self.device.partition(":")[2] or 0),
                 f"device: {self.device!r}, but "
                 + (f"this machine has {gpus} CUDA device(s)" if gpus else
                    "torch sees no CUDA device here (a CPU build, or no GPU); use --device=cpu")),
                (not self.wandb or installed("wandb"), "wandb: the wandb package is not installed"),
                (not unwritable(self.out_dir), f"out_dir: {self.out_dir}: {unwritable(self.out_dir)}"),
                *unread(self, world_size_asked() == 1, ("sharding",),
                        "one process has nothing to share it with (torchrun starts ranks)")]

# ----------------------------------------------------------------------------
# torchrun: one process per device. Ranks split each step's groups between them and agree on
# everything else; outside torchrun every helper here is a no-op.


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
    as FSDP's weight gathers must pair up)."""
    return all_sum((~done).sum()).item() == 0


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


class WeightsMoved:
    """Called, whether `model`'s weights may have changed since the last call: their version
    counters moved (load_state_dict, in-place edits, a plain optimizer step) or an optimizer has
    stepped (a fused AdamW step writes in place without moving them). For copies of the weights
    that must follow training: the engine's bf16 copy and vLLM's."""

    def __init__(self, model):
        self.model, self.versions, self.stepped = model, None, True  # its parameters as they are at each call
        from torch.optim.optimizer import register_optimizer_step_post_hook
        alive = weakref.ref(self)  # the hook is global: it must not keep this (and the model) alive
        self.hook = register_optimizer_step_post_hook(
            lambda *args: alive() is not None and setattr(alive(), "stepped", True))

    def __del__(self):
        if hasattr(self, "hook"):  # not when __init__ failed
            self.hook.remove()

    def __call__(self):
        versions = [p._version for p in self.model.parameters()]  # LoRA's adapters may have come since
        moved = self.stepped or versions != self.versions
        self.versions, self.stepped = versions, False
        return moved


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


def lr_factor(step, warmup_steps, total_steps, min_ratio):
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr):
    """The optimizer, with every parameter group's learning rate set to lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return optimizer


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


# ----------------------------------------------------------------------------
# the run directory: atomic writes, checkpoints, resume, random state


def show_config(cfg, model_defaults):
    """Print every field of the resolved config, marking the values taken from model_defaults
    ({field: (the tiny demo's, a pretrained model's)}) for this model."""
    kind = "the tiny demo" if cfg.model == "tiny" else "a pretrained model"
    marks = {k: f"  # the default for {kind}" for k, pair in model_defaults.items()
             if getattr(cfg, k) == pair[cfg.model != "tiny"]}
    say("config:\n" + "\n".join(f"  {k} = {v!r}{marks.get(k, '')}" for k, v in fields_in_order(cfg)))


def run_dir(cfg, argv):
    """The run's directory, made absolute so that nothing can move it later: --resume's, or out_dir.
    ConfigError for an --out_dir beside --resume that names another, or for none at all."""
    moved = os.path.abspath(cfg.out_dir) != os.path.abspath(cfg.resume)
    if cfg.resume and any(arg.startswith("--out_dir=") for arg in argv) and moved:
        raise ConfigError("out_dir: a resumed run continues in its own directory, --resume's; "
                          "leave out --out_dir")
    if not (cfg.resume or cfg.out_dir).strip():
        raise ConfigError("out_dir: empty; name the run's directory")
    return os.path.abspath(cfg.resume or cfg.out_dir)


def take_run_dir(run_dir, key="out_dir", new=None):
    """Make run_dir if need be and hold it for this process: one run per directory. The hold is an
    exclusive flock on the directory itself, so no file is written, and the kernel lets go when the
    process ends however it ends (a kill too): a lock is never left stuck. Under torchrun the main
    rank holds it for all. Held by another process: ConfigError naming its pid. A process that holds
    it already (grpo.train called again) goes on. new: a fresh run's hint, said (ConfigError) when
    run_dir already holds a run; checked under the lock, so no run can finish in between."""
    problem = None  # the main rank's; every rank learns whether there is one, then all stop together
    if main_rank():
        try:
            os.makedirs(run_dir, exist_ok=True)
            holder = hold(os.path.realpath(run_dir))
        except OSError as err:  # /sys, a dangling link made since the check, a folder it cannot open
            holder, problem = None, f"{key}: {run_dir}: {err.strerror}"
        if holder:
            problem = (f"{key}: {run_dir} is in use by another run ({holder}); let it finish or stop it, "
                       "or use another --out_dir")
    if any_rank([problem] if problem else []):
        raise ConfigError(problem or f"{key}: {run_dir} cannot be held (rank 0 says why)")
    if new and os.path.exists(os.path.join(run_dir, "latest")):
        raise ConfigError(f"{key}: {run_dir} already holds a run; {new} in another --out_dir")


HELD = {}  # the real path of each run directory this process holds -> the descriptor holding its lock


def hold(path):
    """None once this process holds `path`'s lock, else who holds it ("pid N")."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks
        return None
    if path in HELD:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return lock_holder(path)
    except OSError as err:  # a file system without flock (some network ones)
        os.close(fd)
        say(f"note: cannot lock {path} ({err.strerror}); start no second run in it while this one runs",
            file=sys.stderr)
        return None
    HELD[path] = fd
    return None


def lock_holder(path):
    """"pid N", the process holding `path`'s flock as Linux's /proc/locks lists it, else "another process"."""
    st = os.stat(path)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for fields in map(str.split, lines):  # "1: FLOCK  ADVISORY  WRITE 2132 fe:00:2146548 0 EOF"
        if "FLOCK" in fields and where in fields and "->" not in fields:
            pid = fields[fields.index(where) - 1]
            return f"pid {pid}" if pid.isdigit() and pid != "0" else "another process"
    return "another process"


def release_run_dir(run_dir=None):
    """Let go of run_dir (at the end of its run), or of every directory this process holds (at the
    end of a command)."""
    for path in [os.path.realpath(run_dir)] if run_dir else list(HELD):
        if path in HELD:
            os.close(HELD.pop(path))


# a process forked from this one (without exec) closes its copies of the held directories'
# descriptors: a copy would keep the lock after this process lets go, or ends
os.register_at_fork(after_in_child=release_run_dir)


def save_model(path, model, tokenizer):
    """model.save_pretrained(path) with its tokenizer; every rank calls it (FSDP gathers the weights)."""
    weights = full_state(model)
    if main_rank():
        model.save_pretrained(path, state_dict=weights)
        tokenizer.save_pretrained(path)
    barrier()


def save_training(run, checkpoint):
    """A checkpoint of a training run (grpo.setup's) after checkpoint["step"]: its model, the dict
    `checkpoint` and what resuming needs besides: the optimizer, the random streams, a reference
    that moves, the config and the model RL started from (the lr is a function of the step). With
    LoRA the adapter is saved in adapter/ and run.merged() (its merged weights, built on the main
    rank only) as the model. Every rank calls it; the main rank writes (save_checkpoint)."""
    cfg, model = run.cfg, run.model
    state = {**checkpoint, "optimizer": full_state(model, run.optimizer), "rng": rng_state(),
             "config": run.saved_cfg, **init_model_fields(cfg.out_dir, run.init_path)}
    if run.ref_model is not None and cfg.ref_sync_every > 0:
        state["ref_model"] = full_state(run.ref_model) or run.ref_model.state_dict()
    weights = full_state(model) if run.merged is None else None
    if main_rank():
        weights = weights if run.merged is None else run.merged()
        save_checkpoint(cfg.out_dir, model, run.engine.tokenizer, state, cfg.keep_checkpoints, weights,
                        run.lora)
    barrier()


def restore_training(state, model, optimizer):
    """Put back what save_training saved of the optimizer and the random streams. The optimizer's
    settings stay those of this run's config (a resume may lower the lr or change the betas)."""
    settings = [{k: group[k] for k in ("lr", "betas", "weight_decay")} for group in optimizer.param_groups]
    load_optimizer_state(model, optimizer, state["optimizer"])
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    restore_rng(state["rng"])


def step_metrics(step, whole, counts, update, times):
    """The metrics row of one step. whole: the step's rewards, scores {reward name: [N]}, correct
    and zero_std (every rank's), and this rank's lengths and truncated (gathered here); counts
    (sums) and update (policy_update's: its summed statistics) are this rank's, brought together
    by one all-reduce. Quantities of the update are per loss token and update, and null when no
    update was made (no token in the loss, or a skipped step). times: the clock at the start and
    after each of PHASES."""
    sums, updates, device = update.sums, update.updates, whole["lengths"].device
    values = [torch.as_tensor(v, dtype=torch.float32).to(device) for v in [*sums.values(), *counts.values()]]
    total = dict(zip([*sums, *counts], all_sum(torch.stack(values)).tolist()))
    lengths, truncated = gather(whole["lengths"].float()), gather(whole["truncated"].float())
    rewards, correct = whole["rewards"], whole["correct"].to(lengths.device)
    calls = gather(whole["calls"].float().to(device))  # each completion's tool calls, as its text writes them
    per_token = {k: total[k] / (max(1.0, total["loss_tokens"]) * updates) for k in sums} if updates else {}
    return {"step": step, "loss": total["loss"] / updates if updates else None,
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            **{f"reward_{name}": column.mean().item() for name, column in whole["scores"].items()},
            "accuracy": whole["correct"].mean().item(),
            "accuracy_with_tool": mean_or_none(correct[calls > 0]),
            "accuracy_without_tool": mean_or_none(correct[calls == 0]), "tool_calls": calls.mean().item(),
            "tool_call_frac": (calls > 0).float().mean().item(), "tool_errors": int(total["tool_errors"]),
            "zero_std_frac": whole["zero_std"].float().mean().item(),
            "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
            "completion_len_correct": mean_or_none(lengths[correct > 0]),
            "completion_len_wrong": mean_or_none(lengths[correct <= 0]),
            "truncated_frac": truncated.mean().item(), "reflection_frac": total["reflecting"] / len(rewards),
            "kl": per_token.get("kl"), "clip_low_frac": per_token.get("clip_low"),
            "clip_high_frac": per_token.get("clip_high"),
            "entropy": finite_or_none(total["entropy"] / total["tokens"]),
            "mismatch_abs": per_token.get("mismatch_abs"), "mismatch_kl": per_token.get("mismatch_kl"),
            "grad_norm": update.grad_norm, "updates": updates, "reward_errors": int(total["reward_errors"]),
            "skipped": update.skipped, "prompts_cut": int(total["prompts_cut"]),
            "tokens_per_sec": total["tokens"] / (times[-1] - times[0]),
            **{f"t_{phase}": end - begin for phase, begin, end in zip(PHASES, times, times[1:])}}


PHASES = ("sample", "rewards", "logprobs", "update")  # a step's parts, timed in this order


def progress_line(row):
    """A step's figures for the progress line: reward, accuracy, length, and tool calls if any."""
    calls = f" calls {row['tool_calls']:.2f}" if row["tool_calls"] else ""
    return (f"reward {row['reward_mean']:.2f} acc {row['accuracy']:.2f} len {row['completion_len_mean']:.1f}"
            + calls)


def finite_or_none(value):
    """value, or None where it is not finite (vLLM gives no entropy: NaN)."""
    return value if math.isfinite(value) else None


def mean_or_none(values):
    return values.mean().item() if len(values) else None


def log_samples(log, step, examples, texts, whole, advantages):
    """Two completions printed, and samples.jsonl's rows (log: RunLog): each question of this
    rank's share of the step with its G completions, each reward (whole: as step_metrics takes
    it), the weighted total, the advantage, the length in tokens and truncation; with tools, the
    transcript's runs (whole["segments"]: [["policy", text], ["tool", result], ...] each) and its
    calls."""
    G, rewards = len(texts) // len(examples), my_share(whole["rewards"])
    scores = {name: my_share(column) for name, column in whole["scores"].items()}
    for g in range(min(2, len(examples))):
        say(f"  [step {step}] {examples[g]['question'][:200]!r} -> {texts[g * G][:300]!r} "
            f"(reward {rewards[g * G]:.2f}, answer {examples[g]['answer']})", file=sys.stderr)
    completions = [{"text": text, "rewards": {name: float(column[i]) for name, column in scores.items()},
                    "reward": float(rewards[i]), "advantage": float(advantages[i]),
                    "length": int(whole["lengths"][i]), "truncated": bool(whole["truncated"][i]),
                    **({"tool_calls": int(whole["calls"][i]), "segments": whole["segments"][i]}
                       if whole.get("segments") else {})}
                   for i, text in enumerate(texts)]
    log.samples([{"step": step, "prompt": example["question"], "answer": example["answer"],
                  "completions": completions[g * G:(g + 1) * G]} for g, example in enumerate(examples)])


def summarise(cfg, before, after, questions, wall_start, rl_seconds):
    """summary.json (held-out metrics before and after RL on `questions` questions, steps, ranks,
    times: RL's, and the wall clock since wall_start) and the closing lines."""
    names = ("accuracy", "format", "tool_call_frac", "length")
    summary = {f"{name}_{when}": metrics.get(name) for name in names
               for when, metrics in (("before", before), ("after", after))}
    summary.update(eval_questions=questions, steps=cfg.max_steps, ranks=world_size(), rl_seconds=rl_seconds,
                   wall_seconds=time.time() - wall_start, run_dir=os.path.abspath(cfg.out_dir))
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    say("\n---- summary")
    if after:
        say(f"held-out greedy accuracy: {before['accuracy']:.1%} before RL -> {after['accuracy']:.1%} after "
            f"{cfg.max_steps} GRPO steps ({100 * (after['accuracy'] - before['accuracy']):+.1f} points)")
        say(f"format compliance: {before['format']:.1%} -> {after['format']:.1%}")
        if cfg.tools or before.get("tool_call_frac") or after.get("tool_call_frac"):
            say(f"completions that call a tool: {before.get('tool_call_frac', 0):.1%} -> "
                f"{after['tool_call_frac']:.1%}" + ("" if cfg.tools else " (no tools ran: tools=\"\")"))
    say(f"wall time {summary['wall_seconds']:.0f}s (GRPO {summary['rl_seconds']:.0f}s); run directory "
        f"{summary['run_dir']}")
    say("  metrics.jsonl (a row per step), summary.json, the final model: from_pretrained(run directory)")
    release_run_dir(cfg.out_dir)
    barrier()  # ranks leave together: a process group torn down while another rank still uses it aborts
    return summary


class RunLog:
    """metrics.jsonl (a JSON row per step, and Weights & Biases with cfg.wandb) and samples.jsonl
    (rows of completions), on the main rank. fresh: a new run starts both empty, whatever an
    earlier attempt in the directory left; a resumed run appends (open_resumed_run cut them)."""

    def __init__(self, run_dir, cfg, fresh):
        (self.path, self.samples_path), self.wandb = (os.path.join(run_dir, name) for name in LOGS), None
        if main_rank() and fresh:
            for path in (self.path, self.samples_path):
                write_atomic(path, "")
        if main_rank() and cfg.wandb:
            import dataclasses
            import wandb
            self.wandb = wandb
            wandb.init(project="grpo", name=os.path.basename(os.path.abspath(cfg.out_dir)),
                       config=dataclasses.asdict(cfg))

    def write(self, row):
        if main_rank():
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log(row, step=row["step"])

    def samples(self, rows):
        if main_rank():
            with open(self.samples_path, "a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))


LOGS = ("metrics.jsonl", "samples.jsonl")  # rows with a "step", cut back to the checkpoint on resume


def write_json(path, value):
    """`value` as JSON in `path`, written whole by the main rank."""
    if main_rank():
        write_atomic(path, json.dumps(value, indent=1))


def write_atomic(path, text):
    """`text` in `path`, whole: written under a name of this process's own, then renamed."""
    tmp = temporary(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def temporary(path):
    """A name beside `path` that no other process writes: path.PID.tmp (resume clears what is left)."""
    return f"{path}.{os.getpid()}.tmp"


CHECKPOINT = re.compile(r"checkpoint-\d{6}")  # checkpoint-STEP; with a suffix (.tmp, .damaged) it is none


def checkpoint_names(run_dir):
    return sorted(n for n in os.listdir(run_dir)
                  if CHECKPOINT.fullmatch(n) and os.path.isdir(os.path.join(run_dir, n)))


def save_checkpoint(run_dir, model, tokenizer, state, keep, model_state=None, adapter=None):
    """Write checkpoint-STEP/ (STEP: state["step"]; HF model + tokenizer + trainer_state.pt, and a
    LoRA adapter in
    adapter/) under a temporary name and rename it; hard-link its model files into run_dir itself,
    so that from_pretrained(run_dir) loads the newest model; only then point `latest` at it, and
    prune. A crash at any moment leaves `latest` naming a complete checkpoint and run_dir holding a
    complete model. model_state: the weights to save (FSDP's gathered ones, LoRA's merged ones)."""
    name = f"checkpoint-{state['step']:06d}"
    final, tmp = os.path.join(run_dir, name), temporary(os.path.join(run_dir, name))
    if not os.path.isdir(final):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            adapter.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        os.replace(tmp, final)
    link_model(run_dir, final)
    write_atomic(os.path.join(run_dir, "latest"), name)
    for old in checkpoint_names(run_dir)[:-keep]:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


def link_model(run_dir, checkpoint):
    """Hard-link (or copy) the checkpoint's model files into run_dir, each replacing its old one whole."""
    for file in sorted(os.listdir(checkpoint)):
        if file != "trainer_state.pt" and os.path.isfile(os.path.join(checkpoint, file)):
            link = temporary(os.path.join(run_dir, file))
            with contextlib.suppress(FileNotFoundError):
                os.remove(link)
            try:
                os.link(os.path.join(checkpoint, file), link)
            except OSError:  # no hard links on this file system
                shutil.copyfile(os.path.join(checkpoint, file), link)
            os.replace(link, os.path.join(run_dir, file))


def read_checkpoint(path):
    """(the trainer state of the checkpoint at `path`, None), or (None, what is wrong with it):
    its trainer_state.pt, config.json and every safetensors file must read."""
    if not os.path.isdir(path):
        return None, "is missing"
    if not weight_files(path):
        return None, "holds no model weights"
    problem = damaged_weights(path)
    if problem:
        return None, f"has a damaged model ({problem})"
    try:
        state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    except FileNotFoundError:
        return None, "has no trainer_state.pt"
    except Exception:
        return None, "has a damaged trainer_state.pt"
    return ((state, None) if isinstance(state, dict) and "step" in state
            else (None, "has a damaged trainer_state.pt"))


def weight_files(folder):
    """The safetensors files directly in `folder` (none when it is no folder)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [os.path.join(folder, name) for name in names if name.endswith(".safetensors")]


def damaged_weights(path):
    """What is wrong with the model folder `path`: its config.json or a safetensors file in it (or in
    its adapter/, LoRA's) that does not read whole (empty, truncated, garbage), or None. Other folders
    in it (a run's checkpoints, tiny/) are models of their own."""
    from safetensors import safe_open
    try:
        json.loads(read_text(os.path.join(path, "config.json")))
    except ConfigError as err:  # it names the file
        return str(err)
    except ValueError as err:
        return f"config.json: not JSON ({err})"
    for file in weight_files(path) + weight_files(os.path.join(path, "adapter")):
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as err:  # empty, truncated, garbage
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{os.path.relpath(file, path)}: {why}"
    return None


def open_resumed_run(run_dir, quiet=False):
    """(trainer state, checkpoint directory) to resume from: the checkpoint `latest` names, or when
    `latest` or that checkpoint is damaged or gone, the newest intact one, said in one line (unless
    quiet). Reads only; commit_resume changes the directory, once every other check has passed."""
    path, names = os.path.join(run_dir, "latest"), checkpoint_names(run_dir)
    named = read_text(path).strip() if os.path.isfile(path) else None
    if named is None and not names:
        raise ConfigError(f"resume: {run_dir} holds no checkpoint to resume from (a run saves one "
                          "every save_every steps and when it stops); run it again without --resume")
    if named is None:
        why = f"{path} is missing"
    elif not CHECKPOINT.fullmatch(named):
        why = f"{path} names {named!r}, no checkpoint of this run"
    else:
        state, problem = read_checkpoint(os.path.join(run_dir, named))
        if state is not None:
            return state, os.path.join(run_dir, named)
        why = f"{named}, the latest checkpoint, {problem}"
    for name in reversed(names):
        state, _ = read_checkpoint(os.path.join(run_dir, name)) if name != named else (None, None)
        if state is not None:
            if not quiet:
                say(f"resume: {why}; resuming from {name}, the newest intact one", file=sys.stderr)
            return state, os.path.join(run_dir, name)
    raise ConfigError(f"resume: {why}, and {run_dir} holds no other intact checkpoint; "
                      "start anew in another out_dir")


def begin_run(run_dir, config, resumed=None):
    """The run directory's first change, made once every check has passed: a resumed run, with
    resumed = (its checkpoint, step), cleared back to that checkpoint (commit_resume), and the
    config (a dict) saved as train_config.json."""
    if main_rank():
        if resumed:
            commit_resume(run_dir, *resumed)
        write_atomic(os.path.join(run_dir, "train_config.json"), json.dumps(config, indent=1))
    barrier()


def commit_resume(run_dir, checkpoint, step):
    """Clear away what a crashed or damaged run left after the checkpoint it resumes from: temporary
    files, half-written checkpoints and newer ones (`latest` never named them, or they are damaged:
    kept as NAME.damaged), rows of metrics.jsonl / samples.jsonl past `step` (a torn last line
    included); `latest` and the run directory's model then name that checkpoint. Those steps are
    simply done again."""
    chosen = os.path.basename(checkpoint)
    named = (read_text(os.path.join(run_dir, "latest")).strip()
             if os.path.isfile(os.path.join(run_dir, "latest")) else "")
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.endswith(".tmp") and os.path.isdir(path) and name.startswith("checkpoint-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(".tmp") and os.path.isfile(path):  # a write that a kill cut short
            os.remove(path)
        elif CHECKPOINT.fullmatch(name) and name > chosen and name == named:
            os.replace(path, unused_name(path + ".damaged"))
        elif CHECKPOINT.fullmatch(name) and name > chosen:
            shutil.rmtree(path, ignore_errors=True)
    if named != chosen:
        link_model(run_dir, checkpoint)
        write_atomic(os.path.join(run_dir, "latest"), chosen)
    for name in LOGS:
        path, kept = os.path.join(run_dir, name), []
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line.decode())
                except (ValueError, KeyError, TypeError):  # the line being written when the run died
                    break
        write_atomic(path, "".join(kept))


def init_model_fields(run_dir, path):
    """The checkpoint's record of the model RL started from (the reference's source): its path,
    and where it lies inside run_dir (tiny/, cold_start/) that part, so that a moved run resumes."""
    inside = os.path.isdir(path) and not os.path.relpath(os.path.abspath(path),
                                                         os.path.abspath(run_dir)).startswith("..")
    return {"init_model": path, "init_model_in_run": os.path.relpath(path, run_dir) if inside else None}


def init_model(run_dir, state):
    """The path of the model RL started from, for a run resumed from `state` (init_model_fields)."""
    inside = state.get("init_model_in_run")
    return os.path.join(run_dir, inside) if inside else state["init_model"]


def unused_name(path):
    return next(f"{path}{i or ''}" for i in range(1000) if not os.path.exists(f"{path}{i or ''}"))


def saved_config(run_dir):
    """(the config a run saved, the file it came from): its train_config.json, or when that is
    damaged (not UTF-8, not JSON, no JSON object) the config its checkpoint holds, said in one line."""
    path = os.path.join(run_dir, "train_config.json")
    if not os.path.isdir(run_dir) or not os.path.exists(path):
        raise ConfigError(f"resume: {path} not found")
    try:
        with open(path, "rb") as f:
            saved = json.loads(f.read().decode("utf-8"))
        problem = None if isinstance(saved, dict) else "holds no JSON object"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except (ValueError, RecursionError) as err:
        problem = f"is not valid JSON ({getattr(err, 'msg', 'nested too deeply')})"
    if problem is None:
        return saved, path
    try:
        state, checkpoint = open_resumed_run(run_dir, quiet=True)
    except ConfigError:
        state = None
    if not state or not isinstance(state.get("config"), dict):
        raise ConfigError(f"resume: {path} {problem}, and no checkpoint holds a copy; "
                          "restore it or start anew")
    say(f"resume: {path} {problem}; using the config saved in {os.path.basename(checkpoint)}",
        file=sys.stderr)
    return state["config"], os.path.join(checkpoint, "trainer_state.pt")


def unwritable(path):
    """Why a run directory cannot be made or written at `path`, or None."""
    existing = os.path.abspath(path)
    while True:  # the nearest part of the path that exists
        try:
            os.stat(existing)
            break
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(existing):
                return f"{existing} is a link to {os.readlink(existing)}, which does not exist"
            existing = os.path.dirname(existing)
        except OSError as err:
            return f"{existing}: {err.strerror}"
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------
# the machine, stopping, progress


def installed(package):
    return importlib.util.find_spec(package) is not None


def cuda_devices():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def clock(device):
    """time.perf_counter() once the device has run the work queued on it: GPU kernels launch
    asynchronously, and each phase's (t_sample, t_logprobs, t_update) must be timed with it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cli(prog, run):
    """Run `run()` as a command -> its exit code: 2 with one line for a problem the user must fix
    (ConfigError: config, data, model), a Stop's own code, 130 for an interrupt outside the loop."""
    try:
        run()
    except ConfigError as err:
        say(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Stop as stop:  # every rank stops at the same step
        barrier()
        say(f"{prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        say(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_run_dir()
        leave_distributed()
    return 0


def exit(code):
    """sys.exit(code); under torchrun without interpreter teardown, where gloo's threads can abort
    (~1 exit in 10)."""
    if "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class Stop(Exception):
    """Ends a run early, after a checkpoint: a signal, or too many non-finite steps in a row."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def stopped(signals, step, bad_steps, run_dir):
    """The Stop of a run that saved a checkpoint after `step`: for the first of `signals`
    received (any rank's: none here stands for SIGTERM), or else for bad_steps non-finite steps."""
    if signals is not None:
        number = signals[0] if signals else signal.SIGTERM
        return Stop(f"stopped by {signal.Signals(number).name} after step {step}, checkpoint saved; "
                    f"continue with --resume={run_dir}", 128 + number)
    return Stop(f"{bad_steps} steps in a row had a non-finite loss or gradient and were skipped; "
                f"stopped after step {step} with a checkpoint of the last good weights "
                "(lower lr, check the rewards and data, or raise max_bad_steps)", 1)


@contextlib.contextmanager
def interrupts_say_how_to_go_on(run_dir):
    """A Ctrl-C outside the loop's own handling (loading, the cold start, evaluation) ends with a
    line that is true of run_dir: resume from its latest checkpoint, or there is none yet.
    Checkpoints are renamed into place whole, so the latest one is intact."""
    try:
        yield
    except KeyboardInterrupt:
        if os.path.isfile(os.path.join(run_dir, "latest")):
            raise Stop(f"interrupted; continue with --resume={run_dir} from its latest checkpoint",
                       130) from None
        raise Stop("interrupted before the first checkpoint, so nothing was saved to resume; "
                   "run the same command again to start over", 130) from None


@contextlib.contextmanager
def stop_signals():
    """While training, SIGINT (Ctrl-C) and SIGTERM (schedulers' preemption) only set a flag: the
    loop saves a checkpoint after the current step and stops. A second signal acts at once."""
    received = []

    def note(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr)
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Progress:
    """One status line, on the main rank: redrawn in place on a terminal, a line every 5 % otherwise."""

    def __init__(self, label):
        self.label, self.started, self.tty = label, time.time(), sys.stderr.isatty()

    def __call__(self, done, total, text):
        if not main_rank() or (not self.tty and done not in (1, total) and done % max(1, total // 20)):
            return
        elapsed = time.time() - self.started
        line = (f"{self.label} [{'#' * int(24 * done / total):<24}] {done}/{total} {text} | "
                f"{elapsed:.0f}s, eta {elapsed / done * (total - done):.0f}s")
        print(("\r" + line + "\033[K") if self.tty else line,
              end="\n" if done == total or not self.tty else "", file=sys.stderr, flush=True)
