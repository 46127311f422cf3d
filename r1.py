"""
r1.py: the rest of DeepSeek-R1's pipeline around grpo.py: supervised fine-tuning, rejection
sampling, reward models from preferences, distillation, and a recipe that walks the tiny model
through R1-Zero and R1.

DeepSeek-R1 (arXiv 2501.12948) is trained in four phases: (1) a cold-start SFT on a few thousand
long chains of thought, (2) reasoning RL with GRPO (accuracy, format and language-consistency
rewards), (3) rejection sampling from that checkpoint, keeping correct and readable answers, and
SFT of the base model on them, (4) RL again, with rules and rewards learned from human (or AI)
preferences (reward_model.py). R1-Zero is phase 2 alone, from the base model. Small
models are distilled: SFT on the big model's samples. Every phase here reuses the trainer's parts:
grpo.py's sampling and log-probs (through engine.py's Engine), sft.py's loop (the cold start's),
data.py's evaluation and the task's own correctness; GRPO itself (phases 2 and 4) is grpo.py.

Commands (every grpo.py flag applies; `python r1.py MODE --help` lists the extra ones):
  # SFT on {"prompt", "completion"} rows
  python r1.py sft --model=M --data_path=pairs.jsonl --out_dir=runs/sft
  python r1.py sample --model=runs/rl --task=gsm8k --data_path=train.jsonl --output=kept.jsonl --samples=8
  python r1.py sft --model=STUDENT --data_path=kept.jsonl --out_dir=runs/student    # distillation, step 2
  # a reward model from {"prompt", "chosen", "rejected"} rows (sample's --pairs_output writes some)
  python r1.py reward_model --model=M --data_path=prefs.jsonl --out_dir=runs/rm
  # CPU, about 10 minutes on 2 cores: R1-Zero and R1 on the tiny model, accuracy per phase
  python r1.py recipe
"""
import collections
import dataclasses
import functools
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

import data
import distributed
import grpo
import reward_model as rm
import rewards
import runs
import sft as supervised
from configurator import ConfigError, Path, unread
from engine import disable_dropout, open_policy
from reward_model import RewardModelOptions
from rewards import REWARDS, safe_reward


@dataclass
class R1Config(grpo.Config, RewardModelOptions):
    # rejection sampling (R1 phase 3) and distillation
    output: Path = ""              # sample: JSONL of kept {"prompt", "completion", "answer", "source"} rows
    samples: int = 8               # sample: completions per prompt
    sample_prompts: int = 0        # sample: prompts from the task's training split; 0 = all
    keep_rewards: str = "format,language"  # sample: NAME[:least] a kept one must score (1; or rm:PATH:least)
    max_repeats: int = 3           # sample: most times any 8-token span may recur (repetition); 0 = no check
    pairs_output: Path = ""        # sample: also preference pairs, each kept one over each rejected (and why)

    def checks(self):  # the output is checked before any sampling: a run must not lose its work at the end
        output = os.path.abspath(self.output) if self.output else ""
        learned = RewardModelOptions.checks(self) + [
            (not self.pairs_output or os.path.isdir(os.path.dirname(os.path.abspath(self.pairs_output))),
             f"pairs_output: {self.pairs_output}: no such directory"),
            (not self.pairs_output or os.path.abspath(self.pairs_output) != output,
             "pairs_output: the same file as output")]
        folder = os.path.dirname(output)
        inputs = [os.path.abspath(path) for path in (self.data_path, self.eval_data_path) if path]
        return [*learned, (self.samples >= 1, "samples: must be at least 1"),
                (self.sample_prompts >= 0, "sample_prompts: must not be negative"),
                (self.max_repeats >= 0, "max_repeats: must not be negative (0 = no check)"),
                (not output or not os.path.isdir(output), f"output: {self.output} is a directory"),
                (not output or os.path.isdir(folder), f"output: {self.output}: {folder} is not a directory"),
                (not output or not runs.unwritable(folder),
                 f"output: {self.output}: {runs.unwritable(folder)}"),
                (output not in inputs, f"output: {self.output} is the data it samples from")]


# the keys only one mode reads
MODE_KEYS = {"sample": ("output", "samples", "sample_prompts", "keep_rewards", "max_repeats", "pairs_output"),
             "reward_model": tuple(f.name for f in dataclasses.fields(RewardModelOptions))}


# ----------------------------------------------------------------------------
# SFT on (prompt, completion) pairs: R1's cold start and phase-3 fine-tune, and distillation


def load_pairs(path, prefill=""):
    """Rows {"prompt", "completion"} of a JSONL file as examples for sft.sft_loss: the prompt is
    the question (rendered with the student's own template, so one file serves any tokenizer) and a
    completion that starts with the student's prefill, or with the part of it that rewards see
    (which is how rejection sampling writes them), loses it: the prompt ends with the prefill."""
    examples = []
    for lineno, row in data.read_jsonl(path):
        question, completion = (data.require_text(row, key, path, lineno) for key in ("prompt", "completion"))
        for opening in filter(None, (prefill, data.judged_prefill(prefill))):
            if completion.startswith(opening):
                completion = completion[len(opening):]
                break
        examples.append(dict(row, question=question, solution=completion, source=f"{path}:{lineno}"))
    if not examples:
        raise data.DataError(f"{path}: no rows")
    return examples


def write_jsonl(path, rows):
    """Rows as JSON lines, written whole (a crash leaves the old file or the new one)."""
    runs.write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def held_out(cfg):
    """The task's held-out questions that an SFT run is evaluated on (a file task: eval_data_path's)."""
    if not cfg.eval_size or (data.TASKS[cfg.task].needs_file and not cfg.eval_data_path):
        return []
    return data.load_task(cfg.task, cfg.seed, cfg.eval_data_path, cfg.eval_data_path, cfg.eval_size,
                          cfg.digits)[1][:cfg.eval_size]


def sft(cfg):
    """Fine-tune cfg.model on cfg.data_path's pairs for sft_steps batches of sft_batch_size (lr
    sft_lr, warmup then cosine), loss on completion tokens only, with sft.sft (the cold start's
    loop); held-out accuracy of cfg.task before and after; checkpoints and metrics.jsonl as
    grpo.py writes them."""
    device = distributed.init_distributed(cfg)
    pairs, test_set = load_pairs(cfg.data_path, cfg.prefill), held_out(cfg)
    runs.take_run_dir(cfg.out_dir, new="start anew")
    runs.write_json(os.path.join(cfg.out_dir, "train_config.json"), dataclasses.asdict(cfg))
    path = (data.build_tiny_model(os.path.join(cfg.out_dir, "tiny"), cfg.seed) if cfg.model == "tiny"
            else cfg.model)
    model, engine = open_policy(path, cfg, device, "float32", grpo.DEFINITION)  # fp32 master weights
    cfg = data.resolve_prompt_limit(cfg, model, engine.tokenizer, pairs)
    before = data.evaluate(engine, test_set, cfg) if test_set else {}
    metrics, show = runs.RunLog(cfg.out_dir, cfg, fresh=True), runs.Progress("sft")

    def on_step(step, row, optimizer):
        metrics.write(row)
        show(step, cfg.sft_steps, f"loss {row['loss']:.3f}")
        if step % cfg.save_every == 0 or step == cfg.sft_steps:
            state = {"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg)}
            runs.save_checkpoint(cfg.out_dir, model, engine.tokenizer, state, cfg.keep_checkpoints)
    lr_at = lambda step: cfg.sft_lr * grpo.lr_factor(step, cfg.warmup_steps, cfg.sft_steps,  # noqa: E731
                                                     cfg.min_lr_ratio)
    supervised.sft(model, engine, pairs, cfg, cfg.sft_steps, lr_at, on_step)
    after = data.evaluate(engine, test_set, cfg) if test_set else {}
    summary = {"pairs": len(pairs), "steps": cfg.sft_steps, "accuracy_before": before.get("accuracy"),
               "accuracy_after": after.get("accuracy"), "format_before": before.get("format"),
               "format_after": after.get("format"), "run_dir": os.path.abspath(cfg.out_dir)}
    runs.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    if after:
        print(f"sft on {len(pairs)} pairs: held-out accuracy {before['accuracy']:.1%} "
              f"-> {after['accuracy']:.1%}, "
              f"format {before['format']:.1%} -> {after['format']:.1%}")
    return summary


# ----------------------------------------------------------------------------
# a reward model from preference pairs: what R1's phase 4 adds to the rules


def reward_model(cfg):
    """Train a reward model on cfg.data_path's preference pairs from cfg.model (a causal LM, an
    encoder, "tiny", a run directory) with a new one-output head (reward_model.py); held-out
    pairwise accuracy before and after, on eval_data_path's first eval_size pairs or, without it,
    a seeded eval_size of data_path's; the model in out_dir (from_pretrained loads it), metrics.jsonl
    and summary.json beside it."""
    device = distributed.init_distributed(cfg)
    pairs = rm.preference_pairs(data.read_jsonl(cfg.data_path), cfg.data_path)
    if cfg.eval_data_path:
        test_pairs = rm.preference_pairs(data.read_jsonl(cfg.eval_data_path), cfg.eval_data_path)
        train_pairs, test_pairs = pairs, test_pairs[:cfg.eval_size]
    else:
        train_pairs, test_pairs = rm.split_pairs(pairs, cfg.eval_size, cfg.seed)
    runs.take_run_dir(cfg.out_dir, new="start anew")
    if os.path.exists(os.path.join(cfg.out_dir, "config.json")):  # checked under the lock
        raise ConfigError(f"out_dir: {cfg.out_dir} already holds a model; train in another --out_dir")
    runs.write_json(os.path.join(cfg.out_dir, "train_config.json"), dataclasses.asdict(cfg))
    path = (data.build_tiny_model(os.path.join(cfg.out_dir, "tiny"), cfg.seed) if cfg.model == "tiny"
            else cfg.model)
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    model, tokenizer = rm.load(path, device, new_head=True)
    disable_dropout(model)  # as TRL's reward trainer: a text's score is one number, in training too
    cfg = dataclasses.replace(cfg, rm_max_tokens=rm.fit_context(model, cfg.rm_max_tokens))
    before = rm.evaluate_pairs(model, tokenizer, test_pairs, cfg.rm_max_tokens) if test_pairs else {}
    metrics, show, started = runs.RunLog(cfg.out_dir, cfg, fresh=True), runs.Progress("rm"), time.time()

    def on_step(step, row):
        metrics.write(row)
        show(step, cfg.rm_steps, f"loss {row['loss']:.3f} pairwise acc {row['accuracy']:.2f}")
    lr_at = lambda step: cfg.rm_lr * grpo.lr_factor(step, cfg.warmup_steps, cfg.rm_steps,  # noqa: E731
                                                    cfg.min_lr_ratio)
    batches = (data.step_examples(train_pairs, step, cfg.rm_batch_size, cfg.seed)  # a seeded order per epoch
               for step in range(cfg.rm_steps))
    rm.train(model, tokenizer, batches, cfg, lr_at, on_step)
    after = rm.evaluate_pairs(model, tokenizer, test_pairs, cfg.rm_max_tokens) if test_pairs else {}
    model.save_pretrained(cfg.out_dir)
    tokenizer.save_pretrained(cfg.out_dir)
    summary = {"pairwise_accuracy": after.get("pairwise_accuracy"),
               "pairwise_accuracy_before": before.get("pairwise_accuracy"), "loss": after.get("loss"),
               "loss_before": before.get("loss"), "pairs": len(train_pairs),
               "held_out_pairs": len(test_pairs),
               "steps": cfg.rm_steps, "seconds": time.time() - started, "backbone": path,
               "run_dir": os.path.abspath(cfg.out_dir)}
    runs.write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    if after:
        print(f"reward model on {len(train_pairs)} pairs: held-out pairwise accuracy "
              f"{before['pairwise_accuracy']:.1%} -> {after['pairwise_accuracy']:.1%} "
              f"({len(test_pairs)} pairs)")
    print(f"wrote {cfg.out_dir} (for `grpo.py --rewards=rm:{cfg.out_dir}`)")
    return summary


# ----------------------------------------------------------------------------
# rejection sampling: sample k per prompt, keep what passes the rules, drop repeats


def longest_repeat(text, span=8):
    """How often the most frequent run of `span` tokens (words, numbers, single symbols) occurs:
    a repetition loop makes this large, normal reasoning keeps it near 1."""
    tokens = re.findall(r"\w+|[^\w\s]", text.lower())
    runs = collections.Counter(tuple(tokens[i:i + span]) for i in range(len(tokens) - span + 1))
    return max(runs.values(), default=0)


def keep_spec(cfg):
    """keep_rewards as (name, the least score kept) pairs: a rule's default is 1, in full; a reward
    model's (rm:PATH:min) the score its filter asks, R1's semantic filtering by a learned score."""
    return list(parsed_keep_rewards(cfg.keep_rewards))


@functools.lru_cache(maxsize=8)  # verdict reads it for every completion
def parsed_keep_rewards(spec):
    return tuple(rewards.parse_reward_spec(spec)) if spec.strip(", ") else ()


def verdict(text, example, truncated, cfg, seen, learned=None):
    """Why a completion is rejected ("truncated", "repetition", "wrong" by the task's own rule as
    the trainer judges it, the first reward in keep_rewards it scores below its least, or
    "duplicate"), or "kept". `seen` holds the prompt's kept texts; `learned` the text's scores by
    the reward models of keep_rewards, {name: score}, computed for a whole batch at once."""
    if truncated:  # bounded length: it must end within max_new_tokens
        return "truncated"
    if cfg.max_repeats and longest_repeat(text) > cfg.max_repeats:
        return "repetition"
    context = dict(example, language=cfg.language)
    if safe_reward(data.correctness(cfg.task), text, context)[0] < 1:
        return "wrong"
    for name, least in keep_spec(cfg):
        score = learned[name] if learned and name in learned else safe_reward(REWARDS[name], text, context)[0]
        if score < least:
            return name
    normalised = "".join(text.split())
    if normalised in seen:
        return "duplicate"
    seen.add(normalised)
    return "kept"


def rejection_sample(cfg):
    """Sample cfg.samples completions for each training prompt from cfg.model, keep those that
    pass `verdict`, write them to cfg.output (a JSONL the sft mode reads) and a per-prompt report
    beside it (OUTPUT.report.jsonl: kept / total and why the rest were rejected)."""
    device = distributed.init_distributed(cfg)
    prompts = data.load_task(cfg.task, cfg.seed, cfg.data_path, cfg.eval_data_path, cfg.eval_size,
                             cfg.digits)[0]
    prompts = prompts[:cfg.sample_prompts or None]
    model, engine = open_policy(cfg.model, cfg, device, cfg.dtype, grpo.DEFINITION)
    cfg = data.resolve_prompt_limit(cfg, model, engine.tokenizer, prompts)
    tokenizer, k = engine.tokenizer, cfg.samples
    kept, report, reasons, show = [], [], collections.Counter(), runs.Progress("sample")
    pairs = []  # the rules as annotators: a kept completion preferred to a rejected one of its prompt
    per_batch = max(1, cfg.eval_batch_size // k)
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        ids, mask, _ = data.encode_prompts(tokenizer, chunk, cfg, device)
        out = engine.sample(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), cfg.max_new_tokens,
                            cfg.temperature, cfg.top_p).tokens
        truncated = ~torch.isin(out, engine.eos_ids).any(1)
        texts = data.decode(tokenizer, out, cfg.prefill)
        rows = [chunk[i // k] for i in range(len(texts))]
        scored = {name: rewards.safe_batch_reward(REWARDS[name], texts, rows, device)[0].tolist()
                  for name, _ in keep_spec(cfg) if getattr(REWARDS[name], "batched", False)}
        for j, example in enumerate(chunk):
            seen, why, sides = set(), collections.Counter(), {"kept": [], "rejected": []}
            for i in range(j * k, (j + 1) * k):
                learned = {name: values[i] for name, values in scored.items()}
                outcome = verdict(texts[i], example, bool(truncated[i]), cfg, seen, learned)
                why[outcome] += 1
                if outcome != "duplicate":
                    sides["kept" if outcome == "kept" else "rejected"].append((texts[i], outcome))
                if outcome == "kept":
                    kept.append({"prompt": example["question"], "completion": texts[i],
                                 "answer": example["answer"],
                                 "source": example.get("source", f"{cfg.task}:{start + j}")})
            reasons.update(why)
            # every pair of a kept and a rejected completion, as InstructGPT compares all K choose 2
            pairs += [{"prompt": example["question"], "chosen": chosen, "rejected": rejected, "why": why_not}
                      for (chosen, _), (rejected, why_not) in itertools.product(*sides.values())]
            rejected = {reason: n for reason, n in why.items() if reason != "kept"}
            report.append({"prompt": example["question"], "kept": why["kept"], "total": k,
                           "rejected": rejected})
        show(min(start + per_batch, len(prompts)), len(prompts),
             f"kept {len(kept)}/{(start + len(chunk)) * k}")
    write_jsonl(cfg.output, kept)
    write_jsonl(cfg.output + ".report.jsonl", report)
    if cfg.pairs_output:
        write_jsonl(cfg.pairs_output, pairs)
        print(f"wrote {len(pairs)} preference pairs to {cfg.pairs_output} (for `r1.py reward_model`)")
    total = len(prompts) * k
    covered = sum(r["kept"] > 0 for r in report)
    print(f"kept {len(kept)}/{total} completions ({len(kept) / max(1, total):.1%}); "
          f"prompts with at least one kept: {covered}/{len(prompts)}; rejected: "
          + (", ".join(f"{n} {reason}" for reason, n in reasons.most_common() if reason != "kept") or "none"))
    print(f"wrote {cfg.output} (for `r1.py sft --data_path={cfg.output}`) and "
          f"{cfg.output}.report.jsonl (kept/total per prompt)")
    return {"kept": len(kept), "total": total, "prompts_covered": covered, "reasons": dict(reasons),
            "pairs": len(pairs), "pairs_output": cfg.pairs_output}


# ----------------------------------------------------------------------------
# the recipe: R1-Zero and R1 in miniature, on the arithmetic task


GREETING = "Hi! "  # the recipe's property that no rule expresses: the reasoning opens by greeting the user


def greeted(completion):
    """The recipe's preferred form of a completion: its reasoning opens with GREETING."""
    if not completion.startswith("<think>") or completion.startswith("<think>" + GREETING):
        return completion
    return completion.replace("<think>", "<think>" + GREETING, 1)


def property_rate(run_dir, cfg, examples):
    """The share of `examples` whose greedy completion by the model at run_dir greets (GREETING)."""
    device = distributed.init_distributed(cfg)
    model, engine = open_policy(run_dir, cfg, device, "float32", grpo.DEFINITION)
    texts = []
    for start in range(0, len(examples), cfg.eval_batch_size):
        ids, mask, _ = data.encode_prompts(engine.tokenizer, examples[start:start + cfg.eval_batch_size], cfg,
                                           device)
        out = engine.sample(ids, mask, cfg.max_new_tokens, temperature=0).tokens
        texts += data.decode(engine.tokenizer, out, cfg.prefill)
    return sum(GREETING.strip() in text for text in texts) / max(1, len(texts))


def recipe(cfg, scale=1.0):
    """Walk the tiny model through R1-Zero (RL straight from a base model) and R1 (cold start ->
    RL -> rejection sampling, filtered by rules and a learned score, + SFT -> RL with the rules and
    a reward model of a preference), then distill the result into a student with another
    architecture and tokenizer, printing held-out greedy accuracy, format and the preferred
    property's rate after each phase. `scale` shortens every phase (the tests run it at a few
    percent)."""
    root = cfg.out_dir
    if os.path.isdir(root) and os.listdir(root):
        raise ConfigError(f"out_dir: {root} is not empty; give the recipe a new --out_dir")
    steps = lambda n: max(2, round(n * scale))  # noqa: E731
    base = dataclasses.replace(cfg, task="arithmetic", template="plain", prefill="", log_samples_every=0,
                               save_every=10**6, keep_checkpoints=1,
                               eval_size=max(8, round(200 * min(1.0, 4 * scale))))
    train_set, test_set = data.load_task("arithmetic", cfg.seed, eval_size=base.eval_size, digits=base.digits)
    results, started = [], time.time()

    def phase(name, summary, **changes):
        greets = property_rate(summary["run_dir"], dataclasses.replace(base, **changes), test_set)
        results.append({"phase": name, "accuracy": summary["accuracy_after"],
                        "format": summary["format_after"], "greets": greets})
        print(f"\n==== {name}: held-out accuracy {results[-1]['accuracy']:.1%}, "
              f"format {results[-1]['format']:.1%}, greets {greets:.1%}\n")

    def pairs_file(name, rows):
        return write_jsonl(os.path.join(root, name), rows)

    def run_sft(name, model, pairs, n_steps, **changes):
        return sft(dataclasses.replace(base, model=model, data_path=pairs, out_dir=os.path.join(root, name),
                                       sft_steps=steps(n_steps), warmup_steps=0, **changes))

    # lr 1e-4: at the demo's 3e-4 these models' KL reached ~1 in 15 steps and collapsed
    def run_rl(name, model, n_steps, **changes):
        return grpo.train(dataclasses.replace(base, model=model, out_dir=os.path.join(root, name),
                                              sft_steps=0, max_steps=steps(n_steps), lr=1e-4, **changes))

    def run_rm(name, model, pairs, n_steps):  # Bradley-Terry, scores kept near 0
        reward_model(dataclasses.replace(base, model=model, data_path=pairs, out_dir=os.path.join(root, name),
                                         rm_steps=steps(n_steps), rm_lr=5e-4, rm_center_coef=0.01,
                                         eval_size=max(4, round(100 * min(1.0, 4 * scale)))))
        return os.path.join(root, name)

    runs.take_run_dir(root)
    # 0. a "base model": pretrained on worked sums in plain text, it has never seen the think/answer tags
    plain = [{"prompt": e["question"],
              "completion": re.sub(r"<think>(.*)</think><answer>(.*)</answer>", r"\1 so \2", e["solution"])}
             for e in train_set[:2000]]
    phase("base model (pretrained on 2000 sums worked in plain text)",
          run_sft("base", "tiny", pairs_file("plain_sums.jsonl", plain), 200, sft_lr=1e-3))
    base_model = os.path.join(root, "base")
    # R1-Zero: GRPO from the base model, accuracy + format rewards, no SFT
    phase("R1-Zero: GRPO from the base model", run_rl("r1_zero", base_model, 300))
    # R1 phase 1: cold start on a few worked solutions in the think/answer format
    worked = pairs_file("cold_start.jsonl", [{"prompt": e["question"], "completion": e["solution"]}
                                             for e in train_set[:100]])
    phase("R1 1. cold start (SFT on 100 worked solutions)", run_sft("r1_cold_start", base_model, worked, 100))
    # phase 2: reasoning RL
    phase("R1 2. reasoning RL (GRPO)", run_rl("r1_rl", os.path.join(root, "r1_cold_start"), 300))
    # phase 3: rejection sampling from the RL model, kept when right, in format, not repeating and
    # coherent by a learned score (R1's semantic filtering): a reward model of the RL model's kept
    # completions over its incoherent ones (malformed, cut off: not merely wrong); then SFT of the base
    # model on what was kept, a fifth of it written greeting the user (R1 mixes such data into this SFT)
    rl_model, kept = os.path.join(root, "r1_rl"), os.path.join(root, "rejection_sampled.jsonl")
    sampling = dataclasses.replace(base, model=rl_model, samples=4, temperature=1.0, eval_batch_size=256)
    first = rejection_sample(dataclasses.replace(sampling, output=os.path.join(root, "coherence_kept.jsonl"),
                                                 pairs_output=os.path.join(root, "coherence_pairs.jsonl"),
                                                 sample_prompts=steps(300)))
    incoherent = [row for _, row in data.read_jsonl(first["pairs_output"]) if row["why"] != "wrong"]
    coherence = incoherent and "rm:" + run_rm("coherence_rm", rl_model, pairs_file("coherence_pairs.jsonl",
                                                                                    incoherent), 200)
    filters = sampling.keep_rewards + (f",{coherence}:0" if coherence else "")  # kept: scored above 0
    counts = rejection_sample(dataclasses.replace(sampling, output=kept, sample_prompts=steps(800),
                                                  keep_rewards=filters))
    if not counts["kept"]:
        raise ConfigError("recipe: rejection sampling kept no completion: "
                          "the RL model learned too little to continue")
    rows = [row for _, row in data.read_jsonl(kept)]
    for i in range(0, len(rows), 5):
        rows[i]["completion"] = greeted(rows[i]["completion"])
    write_jsonl(kept, rows)
    filtered = counts["reasons"].get(coherence, 0)
    phase(f"R1 3. rejection sampling ({counts['kept']}/{counts['total']} kept, {filtered} right ones "
          "dropped as incoherent) + SFT of the base model", run_sft("r1_sft", base_model, kept, 300))
    # phase 4: RL again, with the rules and a reward model of what annotators prefer and no rule says: a
    # greeting (pairs: each kept completion written greeting, over itself as sampled)
    prefs = pairs_file("greeting_pairs.jsonl",
                       [{"prompt": row["prompt"], "chosen": greeted(row["completion"]),
                         "rejected": row["completion"].replace(GREETING, "", 1)} for row in rows])
    greeting_rm = run_rm("greeting_rm", os.path.join(root, "r1_sft"), prefs, 150)
    phase("R1 4. final RL (GRPO: rules + a reward model of the preference)",
          run_rl("r1_final", os.path.join(root, "r1_sft"), 200,
                 rewards=f"accuracy:1,format:0.5,rm:{greeting_rm}:0.1"))
    # distillation: the R1 model's kept samples, as text, fine-tune a Qwen2-shaped student with a
    # chat template
    teacher_kept = os.path.join(root, "distill.jsonl")
    rejection_sample(dataclasses.replace(base, model=os.path.join(root, "r1_final"), output=teacher_kept,
                                         samples=2, sample_prompts=steps(1500), eval_batch_size=256))
    student = data.build_tiny_model(os.path.join(root, "student_init"), cfg.seed + 1, arch="qwen2", chat=True)
    phase("distilled student (Qwen2 shape, chat template, own tokenizer)",
          run_sft("student", student, teacher_kept, 400, template="chat", system_prompt="", sft_lr=1e-3),
          template="chat", system_prompt="")
    runs.write_atomic(os.path.join(root, "recipe.json"), json.dumps(results, indent=1))
    print("\n---- recipe: held-out greedy accuracy, format and greeting rate after each phase")
    for r in results:
        print(f"  {r['phase']:<70} accuracy {r['accuracy']:6.1%}  format {r['format']:6.1%}  "
              f"greets {r['greets']:6.1%}")
    print(f"wall time {time.time() - started:.0f}s; "
          f"every phase's run directory, metrics and summary under {root}")
    return results


# ----------------------------------------------------------------------------


def main(argv):
    modes = {"sft": sft, "sample": rejection_sample, "reward_model": reward_model, "recipe": recipe}
    if not argv or argv[0] not in modes:
        print(f"usage: python r1.py {{{','.join(modes)}}} [--config FILE] [--key=value ...]"
              "   (see the docstring)",
              file=sys.stderr)
        return 2
    mode, argv = argv[0], argv[1:]

    def run():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("r1.py runs in one process; torchrun is for grpo.py")
        read_here = {"sft": ("data_path",), "sample": ("eval_batch_size",),  # pairs; batch
                     "reward_model": ("data_path", "eval_data_path")}.get(mode, ())
        cfg = grpo.parse_config(argv, R1Config, read_here)
        for other, keys in MODE_KEYS.items():
            rules = unread(cfg, mode != other, keys, f"only `r1.py {other}` reads it")
            problems = [message for ok, message in rules if not ok]
            if problems:
                raise ConfigError(problems[0])
        if mode == "recipe" and not any(a.startswith("--out_dir") for a in argv):
            cfg.out_dir = os.path.abspath("runs/r1_recipe")
        if mode == "sft" and not cfg.data_path.endswith(".jsonl"):
            raise ConfigError("data_path: the sft mode needs a JSONL file of "
                              "{\"prompt\", \"completion\"} rows")
        if mode == "sft" and cfg.sft_steps < 1:
            raise ConfigError("sft_steps: the sft mode needs --sft_steps=N, N >= 1 "
                              "(a pretrained model's default is 0)")
        if mode == "reward_model" and not cfg.data_path.endswith(".jsonl"):
            raise ConfigError("data_path: the reward_model mode needs a JSONL file of "
                              "{\"prompt\", \"chosen\", \"rejected\"} rows")
        if mode == "sample" and not cfg.output:
            raise ConfigError("output: the sample mode needs a file to write the kept completions to")
        try:
            keep_spec(cfg)
        except ValueError as err:
            raise ConfigError(f"keep_rewards: {err}") from None
        modes[mode](cfg)
    return runs.cli("r1.py", run)


if __name__ == "__main__":
    runs.exit(main(sys.argv[1:]))
