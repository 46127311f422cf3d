"""Countdown (TinyZero's R1-Zero reproduction) on Qwen2.5-3B base: pure RL, no cold start.

    python grpo.py --config configs/countdown_qwen.py

The task: reach a target with 3 or 4 given numbers, each used once, with + - * / (data.py
generates it; TinyZero used the Countdown-Tasks-3to4 set, numbers and targets of the same kind).
The R1-Zero template with the answer opened as "Let me solve this step by step.\n<think>" as in
TinyZero; reward 1 for a correct equation and 0.1 for the format (TinyZero's values); lr 1e-6,
KL 0.001, up to 1024 new tokens (TinyZero's settings). Group size and batch are chosen here.

The prefill's text before <think> is prompt: the rewards see the answer from <think> on, so a
perfect completion scores format 1 (tests/test_config.py checks every shipped config so).

Memory, by arithmetic (python bench/recipe_memory.py configs/countdown_qwen.py; not run):
dtype=bfloat16 computes in bf16 over fp32 master weights, as lr 1e-6 steps would round away on
bf16 weights: the training state 49.4 GB (16 bytes a parameter), the bf16 reference 6.2, the static
decoder's bf16 copy 6.2 and its decode states 15.1 (256 rows of up to 1,280 slots, and evaluation's
64), activations with gradient checkpointing 10.3: an 87 GB peak, so one 141 GB GPU (H200). On one
80 GB GPU add --decoder=hf (no bf16 copy, and its cache is freed before the update): 71 GB. Or two
80 GB GPUs with torchrun --sharding=fsdp, which halves the training state.

What to expect, from TinyZero's report (NOT measured with this recipe): the 3B base model starts by
guessing and stopping, then learns to search, check
and revise its equations, reaching high accuracy in a few hundred steps; models of 1.5B and up
learn this, 0.5B does not. TinyZero trained on 2 GPUs for about a day of GPU time.
"""
model = "Qwen/Qwen2.5-3B"
task = "countdown"
template = "r1zero"
prefill = " Let me solve this step by step.\n<think>"
rewards = "countdown:1,format:0.1"
sft_steps = 0
max_steps = 400
prompts_per_step = 32
group_size = 8
max_new_tokens = 1024
temperature = 1.0
lr = 1e-6
warmup_steps = 10
min_lr_ratio = 1.0
beta = 0.001
dtype = "bfloat16"
gradient_checkpointing = True
micro_batch_size = 16
eval_size = 200
eval_every = 50
eval_batch_size = 64
save_every = 50
log_samples_every = 20
out_dir = "runs/countdown_qwen"
