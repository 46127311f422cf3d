"""
runs.py: the run directory, written so that a crash never leaves it unusable: one run at a time,
checkpoints and resume, the config, the metrics row and the samples log, random-number state;
and how a run ends: signals, progress, exit codes. grpo.py and r1.py import these; none of them
changes what is computed (torchrun's part is distributed.py).
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
from typing import Callable, NamedTuple, Optional

import torch

from configurator import ConfigError, Path, fields_in_order, read_text
from distributed import (RankFailed, all_sum, any_rank, barrier, full_state, gather, leave_distributed,
                         load_optimizer_state, main_rank, my_share, say, world_size)


@dataclass
class RunOptions:
    # the run directory: checkpoints, logging (runs.py)
    out_dir: Path = "runs/default"  # run directory: config, metrics, checkpoints, summary
    resume: Path = ""              # run directory to continue from its latest checkpoint
    eval_only: bool = False        # evaluate `model` on the held-out split and stop
    log_samples_every: int = 200   # steps between samples printed and written to samples.jsonl; 0 = never
    save_every: int = 400          # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2      # checkpoints kept on disk
    max_bad_steps: int = 10        # stop after this many consecutive steps with a non-finite loss/gradient
    wandb: bool = False            # log to Weights & Biases (needs the package)

    def checks(self):
        return [*[(getattr(self, k) >= 1, f"{k}: must be at least 1")
                  for k in ("save_every", "keep_checkpoints", "max_bad_steps")],
                (self.log_samples_every >= 0, "log_samples_every: must not be negative"),
                (not (self.resume and self.eval_only),
                 "eval_only: evaluate a run with --model=RUN_DIR --eval_only=True, not with --resume"),
                (not self.wandb or installed("wandb"), "wandb: the wandb package is not installed"),
                (not unwritable(self.out_dir), f"out_dir: {self.out_dir}: {unwritable(self.out_dir)}")]

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


class Saving(NamedTuple):
    """What a training run's checkpoints hold besides the step's own state: the policy and its
    optimizer, a reference that moves (None for a fixed one), LoRA's PeftModel and its merged
    weights (merged() -> state dict; None without LoRA), the model RL started from and the config
    as given."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ref_model: Optional[torch.nn.Module]
    lora: Optional[torch.nn.Module]
    merged: Optional[Callable]
    init_path: str
    config: dict


def save_training(cfg, tokenizer, saving, checkpoint):
    """A checkpoint of a training run after checkpoint["step"]: its model, the dict `checkpoint`
    and what resuming needs besides (saving, a Saving): the optimizer, the random streams, a
    reference that moves, the config and the model RL started from (the lr is a function of the
    step). With LoRA the adapter is saved in adapter/ and its merged weights (built on the main
    rank only) as the model. Every rank calls it; the main rank writes (save_checkpoint)."""
    model = saving.model
    state = {**checkpoint, "optimizer": full_state(model, saving.optimizer), "rng": rng_state(),
             "config": saving.config, **init_model_fields(cfg.out_dir, saving.init_path)}
    if saving.ref_model is not None:
        state["ref_model"] = full_state(saving.ref_model) or saving.ref_model.state_dict()
    weights = full_state(model) if saving.lora is None else None
    if main_rank():
        weights = weights if saving.merged is None else saving.merged()
        save_checkpoint(cfg.out_dir, model, tokenizer, state, cfg.keep_checkpoints, weights, saving.lora)
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
    and zero_std (every rank's), and this rank's lengths, truncated and the sampler's tool_calls and
    tool_errors (engine.Sampled's info; gathered here); counts
    (sums) and update (policy_update's: its summed statistics) are this rank's, brought together
    by one all-reduce. Quantities of the update are per loss token and update, and null when no
    update was made (no token in the loss, or a skipped step). times: the clock at the start and
    after each of PHASES."""
    sums, updates, device = update.sums, update.updates, whole["lengths"].device
    counts = {**counts, "tool_errors": whole["tool_errors"].sum()}
    values = [torch.as_tensor(v, dtype=torch.float32).to(device) for v in [*sums.values(), *counts.values()]]
    total = dict(zip([*sums, *counts], all_sum(torch.stack(values)).tolist()))
    lengths, truncated = gather(whole["lengths"].float()), gather(whole["truncated"].float())
    rewards, correct = whole["rewards"], whole["correct"].to(lengths.device)
    calls = gather(whole["tool_calls"].float().to(device))  # each completion's calls, as its text writes them
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
                    **({"tool_calls": int(whole["tool_calls"][i]), "segments": whole["segments"][i]}
                       if whole.get("segments") else {})}
                   for i, text in enumerate(texts)]
    log.samples([{"step": step, "prompt": example["question"], "answer": example["answer"],
                  "completions": completions[g * G:(g + 1) * G]} for g, example in enumerate(examples)])


def summarise(cfg, before, after, questions, wall_start, rl_seconds):
    """summary.json (held-out metrics before and after RL on `questions` questions, steps, ranks,
    times: RL's, and the wall clock since wall_start) and the closing lines."""
    learned = tuple(name for name in after if name.startswith("reward_rm:"))  # reward models' scores
    names = ("accuracy", "format", "tool_call_frac", "length", *learned)
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
        for name in learned:  # risen while accuracy fell: the policy exploits the RM (README: reward hacking)
            say(f"{name[7:]} score: {before.get(name, math.nan):.3f} -> {after[name]:.3f}")
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


class TrainingLog(RunLog):
    """A GRPO run's log (grpo.train's): each step's metrics row written with the count of skipped
    steps, the progress line, samples.jsonl every log_samples_every steps; whether the run must
    stop (a signal, or max_bad_steps non-finite steps in a row); what a checkpoint records of it;
    the summary at the end. state: a resumed run's checkpoint state ({} for a fresh run); started:
    the wall clock at the run's start; before: the held-out metrics before RL ({} without any)."""

    def __init__(self, cfg, state, started, before):
        super().__init__(cfg.out_dir, cfg, fresh=not state)
        self.cfg, self.started, self.before, self.progress = cfg, started, before, Progress("grpo")
        self.bad_steps, self.skipped = state.get("bad_steps", (0, 0))
        self.rl_started, self.step = time.time(), state.get("step", 0)

    def write(self, row, samples=None):
        """The step's row (step_metrics'), after counting it as bad or not; samples: (examples,
        texts, whole, advantages) as log_samples takes them."""
        self.step = row["step"]
        self.bad_steps = self.bad_steps + 1 if row["skipped"] else 0
        self.skipped += row["skipped"]
        super().write({**row, "skipped_total": self.skipped})
        self.progress(row["step"], self.cfg.max_steps, progress_line(row))
        every = self.cfg.log_samples_every
        if samples is not None and every and row["step"] % every == 0:
            log_samples(self, row["step"], *samples)

    def stop(self, signals):
        """A Stop when a signal reached any rank or the last max_bad_steps steps were all skipped,
        else None (every rank gets the same answer)."""
        signalled = any_rank(signals)
        if signalled or self.bad_steps >= self.cfg.max_bad_steps:
            return stopped(signals if signalled else None, self.step, self.bad_steps, self.cfg.out_dir)
        return None

    def checkpoint(self, step):
        """What a checkpoint after `step` keeps of the run besides the weights."""
        return {"step": step, "eval_before": self.before, "bad_steps": (self.bad_steps, self.skipped)}

    def summarise(self, after, questions):
        """summary.json and the closing lines, `after` the held-out metrics after RL."""
        return summarise(self.cfg, self.before, after, questions, self.started, time.time() - self.rl_started)


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
    except RankFailed as err:  # no barrier: the rank that failed has gone
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
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
