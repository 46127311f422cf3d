"""
bench/trl_compare.py: grpo.py against TRL's GRPOTrainer, side by side, on the same machine.

Both train the same locally built model on the same arithmetic prompts with the same reward,
group size, batch, completion length, beta, learning rate and optimiser; every setting where
TRL's defaults differ from ours is set equal and printed. The two run alternately, each in its
own process (so peak memory is that trainer's alone), and the report gives per-step wall time
(median, first step left out as warm-up), its split into sampling / no-grad log-probs / update,
completion tokens per second, peak resident memory, and the mean reward of the last steps, as
ratios grpo.py / TRL.

  pip install -r bench/requirements.txt        # TRL and its dependencies; only the benchmark needs them
  python bench/trl_compare.py                  # small and medium, 2 rounds each
                                               # (about 15 minutes on 2 CPU cores)
  python bench/trl_compare.py --sizes=long_prompt --rounds=3
  python bench/trl_compare.py --sizes=small --rounds=3 --steps=30
  python bench/trl_compare.py --scaling        # grpo.py alone: step time against G, length and model size
  python bench/trl_compare.py --device=cuda --sizes=medium,large   # on a GPU: bf16 autocast in both

Sizes: small = the ~1M-parameter demo model after 200 SFT steps on bare sums ("47+38" -> "85"),
so that completions are ~4 tokens and the accuracy reward moves (cap 8 tokens); medium = a
~27M-parameter Llama with the same tokenizer and random weights, 128-token completions (speed
only: its random weights rarely pick EOS, so every step decodes to the length cap, though the mean
completion is shorter); long_prompt = the medium model with the R1-Zero template's instruction
before each question (~370 prompt tokens, 64-token completions), where a group's shared prompt is
most of the work; large (GPU) = a Qwen2.5-0.5B-shaped model (24 layers, width 896) with the same
tokenizer, random weights, 128-token completions.
On CUDA both use bf16 autocast over fp32 weights (TRL's bf16=True; grpo.py's default there) and
peak memory is torch.cuda.max_memory_allocated; on CPU both run in fp32 and peak memory is RSS.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# what both trainers are set to; TRL's own default in the comment where it differs
SHARED = dict(
    prompts_per_step=8,        # unique prompts per step (TRL: per_device_train_batch_size / num_generations)
    group_size=8,              # G (TRL num_generations, default 8)
    beta=0.04,                 # TRL default 0.0
    loss_type="grpo",          # TRL default "dapo"
    lr=1e-4,                   # TRL default 1e-6; constant schedule in both (TRL default linear decay)
    temperature=1.0, top_p=1.0,  # TRL top_k=0 (off), as ours
    clip_eps=0.2, scale_rewards="group", num_iterations=1,
    adam_betas=(0.9, 0.99),    # TRL default beta2 0.999
    grad_clip=1.0, weight_decay=0.0,
    precision="fp32 on CPU, bf16 autocast on CUDA",  # TRL default bf16=True (on CUDA, as ours)
    gradient_checkpointing=False,  # TRL default True
)
SIZES = {"small": dict(max_new_tokens=8, overrides={}),
         # 32 completions: minutes, not hours
         "medium": dict(max_new_tokens=128, overrides={"prompts_per_step": 4}),
         "large": dict(max_new_tokens=128, overrides={"prompts_per_step": 4}),  # for GPUs
         # the medium model behind the R1-Zero template's instruction: a long prompt shared by each group
         "long_prompt": dict(max_new_tokens=64, model="medium",
                             overrides={"prompts_per_step": 4, "template": "r1zero"})}


RANDOM_SHAPES = {  # the random-weight models: a ~27M Llama, and a Qwen2.5-0.5B-shaped one for GPUs
    "medium": ("LlamaForCausalLM", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=8)),
    "large": ("Qwen2ForCausalLM", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2)),
}


def prepare_models(workdir, sizes):
    """The small model: the demo's tiny Llama taught bare sums; the others: random weights with
    the same tokenizer (RANDOM_SHAPES). Built once per workdir, only those asked for."""
    import torch
    import transformers

    import data
    import r1
    paths = {name: os.path.join(workdir, name) for name in ("small", *RANDOM_SHAPES)}
    if not os.path.isdir(paths["small"]):
        train = data.load_task("arithmetic", 0)[0]
        pairs = r1.write_jsonl(os.path.join(workdir, "bare_sums.jsonl"),
                               [{"prompt": e["question"], "completion": e["answer"]} for e in train[:2000]])
        r1.sft(r1.R1Config(model="tiny", data_path=pairs, out_dir=paths["small"], sft_steps=200, sft_lr=1e-3,
                           warmup_steps=0, eval_size=0, save_every=10**6))
    for size in sizes:
        if size in RANDOM_SHAPES and not os.path.isdir(paths[size]):
            architecture, shape = RANDOM_SHAPES[size]
            tokenizer = transformers.AutoTokenizer.from_pretrained(paths["small"])
            config = transformers.AutoConfig.for_model(
                "llama" if architecture.startswith("Llama") else "qwen2", vocab_size=len(tokenizer), **shape,
                max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id)
            torch.manual_seed(0)
            getattr(transformers, architecture)(config).save_pretrained(paths[size])
            tokenizer.save_pretrained(paths[size])
    return paths


def reward_fn(completion, example):
    import rewards as R
    return R.accuracy_reward(completion, example) + 0.5 * R.format_reward(completion, example)


# ----------------------------------------------------------------------------
# workers: one trainer per process


def run_grpo(model, steps, max_new_tokens, out_dir, device, **overrides):
    import grpo
    s = dict(SHARED, **overrides)
    argv = [f"--model={model}", "--sft_steps=0", "--eval_size=0", f"--max_steps={steps}",
            f"--out_dir={out_dir}", f"--prompts_per_step={s['prompts_per_step']}",
            f"--group_size={s['group_size']}", f"--beta={s['beta']}", f"--loss_type={s['loss_type']}",
            f"--lr={s['lr']}", "--warmup_steps=0", "--min_lr_ratio=1.0", f"--max_new_tokens={max_new_tokens}",
            f"--clip_eps_low={s['clip_eps']}", f"--grad_clip={s['grad_clip']}",
            f"--adam_betas={s['adam_betas']}", "--rewards=accuracy:1,format:0.5", "--log_samples_every=0",
            f"--save_every={10**6}", f"--micro_batch_size={s['prompts_per_step'] * s['group_size']}",
            "--compile=False", f"--device={device}", f"--template={s.get('template', 'plain')}"]
    assert grpo.main(argv) == 0
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    step_time = [r["t_sample"] + r["t_rewards"] + r["t_logprobs"] + r["t_update"] for r in rows]
    return [{"step_time": t, "sample": r["t_sample"], "logprobs": r["t_logprobs"], "update": r["t_update"],
             "reward": r["reward_mean"], "tokens": r["tokens_per_sec"] * t} for r, t in zip(rows, step_time)]


def run_trl(model, steps, max_new_tokens, out_dir, device, **overrides):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import data
    s = dict(SHARED, **overrides)
    train = data.load_task("arithmetic", 0)[0]
    # the text grpo.py's template renders
    dataset = Dataset.from_list([{"prompt": data.render_prompt(e, s.get("template", "plain")),
                                  "answer": e["answer"]}
                                 for e in train])

    def reward(prompts, completions, answer, **kwargs):
        return [reward_fn(c, {"answer": a}) for c, a in zip(completions, answer)]

    batch = s["prompts_per_step"] * s["group_size"]
    args = GRPOConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch,
                      gradient_accumulation_steps=1, num_generations=s["group_size"], steps_per_generation=1,
                      max_completion_length=max_new_tokens, beta=s["beta"], loss_type=s["loss_type"],
                      learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
                      temperature=s["temperature"], top_p=s["top_p"], top_k=0, epsilon=s["clip_eps"],
                      scale_rewards=s["scale_rewards"], num_iterations=s["num_iterations"],
                      adam_beta1=s["adam_betas"][0], adam_beta2=s["adam_betas"][1],
                      max_grad_norm=s["grad_clip"], weight_decay=s["weight_decay"], bf16=device == "cuda",
                      gradient_checkpointing=s["gradient_checkpointing"], use_cpu=device == "cpu",
                      disable_dropout=True, logging_steps=1, report_to="none", save_strategy="no",
                      mask_truncated_completions=False, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=args,
                          reward_funcs=reward, train_dataset=dataset, processing_class=tokenizer)
    spent = {"sample": 0.0, "logprobs": 0.0}

    def timed(name, fn, only_without_grad=False):
        def wrapper(*a, **k):
            if only_without_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper
    trainer._generate = timed("sample", trainer._generate)
    trainer._get_per_token_logps_and_entropies = timed("logprobs", trainer._get_per_token_logps_and_entropies,
                                                       True)
    rows = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            spent.update(sample=0.0, logprobs=0.0)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - self.start
            rows.append({"step_time": total, "sample": spent["sample"], "logprobs": spent["logprobs"],
                         "update": total - spent["sample"] - spent["logprobs"]})
    trainer.add_callback(StepTimer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    for row, log in zip(rows, logs):
        row.update(reward=log["reward"], tokens=log["completions/mean_length"] * batch)
    return rows


def peak_rss_mib():
    """This process's peak resident memory. VmHWM, not getrusage: on Linux ru_maxrss carries the
    parent's peak over fork + exec, so a worker launched by a large parent would report that."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    kind, model, steps, length = args.worker.split(",")
    overrides = json.loads(args.overrides or "{}")
    with tempfile.TemporaryDirectory() as out_dir:
        run = run_grpo if kind == "grpo" else run_trl
        rows = run(model, int(steps), int(length), os.path.join(out_dir, "run"), args.device, **overrides)
    if args.device == "cuda":
        import torch
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = peak_rss_mib()
    print("RESULT " + json.dumps({"rows": rows, "peak_mib": peak_mib}))


def launch(kind, model, steps, length, device, overrides=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={kind},{model},{steps},{length}",
           f"--overrides={json.dumps(overrides or {})}", f"--device={device}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


# ----------------------------------------------------------------------------
# the comparison and the scaling table


def summarise(runs, last=10):
    """Medians over every run's steps after the first (warm-up); peak memory: the largest run's."""
    rows = [r for run in runs for r in run["rows"][1:]]
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_time", "sample", "logprobs", "update")}
    med["tokens_per_sec"] = statistics.median(r["tokens"] / r["step_time"] for r in rows)
    med["peak_mib"] = max(run["peak_mib"] for run in runs)
    med["final_reward"] = statistics.mean(r["reward"] for run in runs for r in run["rows"][-last:])
    med["first_reward"] = statistics.mean(r["reward"] for run in runs for r in run["rows"][:last])
    return med


def compare(args, models):
    print("settings (both trainers): " + ", ".join(f"{k}={v}" for k, v in SHARED.items()))
    print("TRL also: steps_per_generation=1, gradient_accumulation_steps=1, "
          "mask_truncated_completions=False, use_vllm=False, lr_scheduler_type=constant, warmup 0; "
          "grpo.py: warmup_steps=0, min_lr_ratio=1.0, compile=False")
    table = []
    for size in args.sizes.split(","):
        length, overrides, runs = (SIZES[size]["max_new_tokens"], SIZES[size]["overrides"],
                                   {"grpo": [], "trl": []})
        steps = args.steps or (30 if size == "small" else 4)
        for round_ in range(args.rounds):
            for kind in (("grpo", "trl") if round_ % 2 == 0 else ("trl", "grpo")):  # alternate who goes first
                runs[kind].append(launch(kind, models[SIZES[size].get("model", size)], steps, length,
                                         args.device, overrides))
                print(f"  {size} round {round_ + 1} {kind}: median step "
                      f"{statistics.median(r['step_time'] for r in runs[kind][-1]['rows'][1:]):.3f}s, "
                      f"peak {runs[kind][-1]['peak_mib']:.0f} MiB", flush=True)
        ours, theirs = summarise(runs["grpo"]), summarise(runs["trl"])
        table.append((f"{size}, {dict(SHARED, **overrides)['prompts_per_step']}x{SHARED['group_size']}",
                      steps, length, ours, theirs))
    print("\n| size | metric | grpo.py | TRL | grpo.py / TRL |\n|---|---|---|---|---|")
    for size, steps, length, ours, theirs in table:
        for key, label in [("step_time", "s per step (median)"), ("sample", "  sampling s"),
                           ("logprobs", "  no-grad log-probs s"), ("update", "  update s"),
                           ("tokens_per_sec", "completion tokens / s"), ("peak_mib", "peak memory MiB"),
                           ("first_reward", "reward, first 10 steps"),
                           ("final_reward", "reward, last 10 steps")]:
            ratio = ours[key] / theirs[key] if theirs[key] else float("nan")
            print(f"| {size} ({steps} steps x {args.rounds} runs, {length} tok) | {label} | "
                  f"{ours[key]:.3f} | {theirs[key]:.3f} | {ratio:.2f} |")
        print(f"| {size} | **steps per second, grpo.py / TRL** | | | "
              f"**{theirs['step_time'] / ours['step_time']:.2f}x** |")
    return table


SCALING = [("small", 4, 32), ("small", 8, 32), ("small", 16, 32), ("medium", 8, 32), ("medium", 8, 64),
           ("medium", 8, 128)]


def scaling(args, models):
    """grpo.py alone: median step time (and its split) as G, completion length and model size grow."""
    print("| model | G | max tokens | s per step | sampling | log-probs | update | tokens / s |\n"
          "|---|---|---|---|---|---|---|---|")
    for size, group, length in SCALING:
        run = launch("grpo", models[size], args.steps or 6, length, args.device, {"group_size": group})
        s = summarise([run], last=1)
        print(f"| {size} | {group} | {length} | {s['step_time']:.3f} | {s['sample']:.3f} | "
              f"{s['logprobs']:.3f} | {s['update']:.3f} | {s['tokens_per_sec']:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default: 30 small, 4 medium)")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(args.workdir, exist_ok=True)
    sizes = {case[0] for case in SCALING} if args.scaling else args.sizes.split(",")
    models = prepare_models(args.workdir, {SIZES[size].get("model", size) for size in sizes})
    import torch
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU threads" +
          (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    (scaling if args.scaling else compare)(args, models)


if __name__ == "__main__":
    main()
