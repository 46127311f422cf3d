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
import shutil
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from configurator import ConfigError

# ----------------------------------------------------------------------------
# torchrun: one process per device. Ranks split each step's groups between them and agree on
# everything else; outside torchrun every helper here is a no-op.


def init_distributed(cfg):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) -> this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
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


def comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


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
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def full_state(model, optimizer=None):
    """The optimizer's state by parameter name, or the model's weights when FSDP shards them
    (None otherwise: save_pretrained reads the model), whole and on the CPU. Under FSDP every rank
    must call this; rank 0 gets the result."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is not None:  # None before the first update: the call would make a zero state that counts a step
        return get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else None
    if not hasattr(model, "reshard"):  # not an FSDP module
        return None
    weights = get_model_state_dict(model, options=options)
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: w for name, w in weights.items() if name in names}  # tied weights once, as save_pretrained does


def load_optimizer_state(model, optimizer, state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=dist.is_initialized()))


# ----------------------------------------------------------------------------
# the run directory: atomic writes, checkpoints, resume, random state


def save_model(path, model, tokenizer):
    """model.save_pretrained(path) with its tokenizer; every rank calls it (FSDP gathers the weights)."""
    weights = full_state(model)
    if main_rank():
        model.save_pretrained(path, state_dict=weights)
        tokenizer.save_pretrained(path)
    barrier()


def save_training(run_dir, step, model, tokenizer, optimizer, scheduler, keep, ref_model=None, adapter=None,
                  merged=None, **fields):
    """A checkpoint of a training run after `step`: the model, and what resuming needs (optimizer,
    schedule, random streams, a reference model that moves, and `fields`). With LoRA, `adapter`
    (the PeftModel) is saved in adapter/ and merged() (its merged weights, built on the main rank
    only) as the model. Every rank calls it; the main rank writes (save_checkpoint).
    restore_training reads it back."""
    state = {"step": step, "optimizer": full_state(model, optimizer), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), **fields}
    if ref_model is not None:
        state["ref_model"] = full_state(ref_model) or ref_model.state_dict()
    weights = full_state(model) if merged is None else None
    if main_rank():
        save_checkpoint(run_dir, step, model, tokenizer, state, keep, weights if merged is None else merged(), adapter)
    barrier()


def restore_training(state, model, optimizer, scheduler):
    """Put back what save_training saved of the optimizer, the schedule and the random streams."""
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])


def step_metrics(step, rewards, scores, reward_spec, correct, zero_std, lengths, truncated, counts, update, with_kl,
                 times):
    """The metrics row of one step. rewards, scores, correct, zero_std: the whole step's; lengths,
    truncated, counts (sums) and update (policy_update's result): this rank's, brought together
    by one all-reduce. Quantities of the update are per loss token and update, and null when no
    update was made (no token in the loss, or a skipped step). times: the clock at the start and
    after sampling, log-probs and the update."""
    sums, grad_norm, updates, skipped = update
    names = [*sums, *counts]
    values = [torch.as_tensor(v, dtype=torch.float32).to(lengths.device) for v in [*sums.values(), *counts.values()]]
    total = dict(zip(names, all_sum(torch.stack(values)).tolist()))
    lengths, truncated = gather(lengths.float()), gather(truncated.float())
    per_token = {k: total[k] / (max(1.0, total["loss_tokens"]) * updates) if updates else None for k in sums}
    return {"step": step, "loss": total["loss"] / updates if updates else None,
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            **{f"reward_{name}": scores[:, j].mean().item() for j, (name, _) in enumerate(reward_spec)},
            "accuracy": correct.mean().item(), "zero_std_frac": zero_std.float().mean().item(),
            "completion_len_mean": lengths.mean().item(), "completion_len_max": int(lengths.max()),
            "completion_len_correct": mean_or_none(lengths[correct.to(lengths.device) > 0]),
            "completion_len_wrong": mean_or_none(lengths[correct.to(lengths.device) <= 0]),
            "truncated_frac": truncated.mean().item(), "reflection_frac": total["reflecting"] / len(rewards),
            "kl": per_token["kl"] if with_kl else None, "clip_low_frac": per_token["clip_low"],
            "clip_high_frac": per_token["clip_high"], "entropy": total["entropy"] / total["tokens"],
            "mismatch_abs": per_token["mismatch_abs"], "mismatch_kl": per_token["mismatch_kl"],
            "grad_norm": grad_norm, "updates": updates, "reward_errors": int(total["reward_errors"]),
            "skipped": skipped, "prompts_cut": int(total["prompts_cut"]),
            "tokens_per_sec": total["tokens"] / (times[3] - times[0]), "t_sample": times[1] - times[0],
            "t_logprobs": times[2] - times[1], "t_update": times[3] - times[2]}


def mean_or_none(values):
    return values.mean().item() if len(values) else None


def sample_rows(step, examples, texts, scores, reward_spec, rewards, advantages, lengths, truncated, G):
    """samples.jsonl rows, one per question of this rank's share of the step: its G completions
    with each reward, the weighted total, the advantage, the length in tokens and truncation."""
    def completion(i):
        return {"text": texts[i], "rewards": {name: float(scores[i, j]) for j, (name, _) in enumerate(reward_spec)},
                "reward": float(rewards[i]), "advantage": float(advantages[i]), "length": int(lengths[i]),
                "truncated": bool(truncated[i])}
    return [{"step": step, "prompt": example["question"], "answer": example["answer"],
             "completions": [completion(i) for i in range(g * G, (g + 1) * G)]} for g, example in enumerate(examples)]


class MetricsLog:
    """metrics.jsonl, a JSON row per step (and Weights & Biases with cfg.wandb), on the main rank.
    fresh: a new run starts it empty; a resumed run appends to it."""

    def __init__(self, path, cfg, fresh):
        self.path, self.wandb = path, None
        if main_rank() and fresh:
            write_atomic(path, "")
        if main_rank() and cfg.wandb:
            import dataclasses
            import wandb
            self.wandb = wandb
            wandb.init(project="grpo", name=os.path.basename(os.path.abspath(cfg.out_dir)), config=dataclasses.asdict(cfg))

    def write(self, row):
        if main_rank():
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log(row, step=row["step"])


def append_rows(path, rows):
    """JSON lines appended to `path` by the main rank (a resumed run drops the rows past its
    checkpoint, as for metrics.jsonl, and does those steps again)."""
    if main_rank():
        with open(path, "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_checkpoint(run_dir, step, model, tokenizer, state, keep, model_state=None, adapter=None):
    """Write checkpoint-STEP/ (HF model + tokenizer + trainer_state.pt, and a LoRA adapter in
    adapter/) under a temporary name and rename it; hard-link its model files into run_dir itself,
    so that from_pretrained(run_dir) loads the newest model; only then point `latest` at it, and
    prune. A crash at any moment leaves `latest` naming a complete checkpoint and run_dir holding a
    complete model. model_state: the weights to save (FSDP's gathered ones, LoRA's merged ones)."""
    name = f"checkpoint-{step:06d}"
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, name + ".tmp")
    if not os.path.isdir(final):
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state)
        tokenizer.save_pretrained(tmp)
        if adapter is not None:
            adapter.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        os.replace(tmp, final)
    for file in sorted(os.listdir(final)):  # each file replaced whole: the run directory always holds one model
        if file != "trainer_state.pt" and os.path.isfile(os.path.join(final, file)):
            link = os.path.join(run_dir, file + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                os.remove(link)
            try:
                os.link(os.path.join(final, file), link)
            except OSError:  # no hard links on this file system
                shutil.copyfile(os.path.join(final, file), link)
            os.replace(link, os.path.join(run_dir, file))
    write_atomic(os.path.join(run_dir, "latest"), name)
    checkpoints = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
    for old in checkpoints[:-keep]:
        shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


def open_resumed_run(run_dir, clean=True):
    """(trainer state, checkpoint directory) of the latest checkpoint. With clean, what a crashed
    run left after it is cleared away: half-written or newer checkpoints (`latest` never named
    them) and metrics.jsonl / samples.jsonl rows past it, a torn last line included; those steps
    are simply done again."""
    checkpoint = latest_checkpoint(run_dir)
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), weights_only=True)
    if clean:
        for name in os.listdir(run_dir):
            if name.startswith("checkpoint-") and (name.endswith(".tmp") or name > os.path.basename(checkpoint)):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            path, kept = os.path.join(run_dir, name), []
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= state["step"]:
                            kept.append(line)
                    except json.JSONDecodeError:  # the line being written when the run died
                        break
            write_atomic(path, "".join(kept))
    return state, checkpoint


def latest_checkpoint(run_dir):
    path = os.path.join(run_dir, "latest")
    if not os.path.isfile(path):
        raise ConfigError(f"resume: {run_dir} holds no checkpoint")
    with open(path) as f:
        return os.path.join(run_dir, f.read().strip())


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
    except KeyboardInterrupt:  # checkpoints are renamed into place whole, so the latest is intact
        say(f"\n{prog}: interrupted; continue with --resume=OUT_DIR from its latest checkpoint", file=sys.stderr)
        return 130
    finally:
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
        print(("\r" + line + "\033[K") if self.tty else line, end="\n" if done == total or not self.tty else "",
              file=sys.stderr, flush=True)
