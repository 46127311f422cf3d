"""Countdown (TinyZero's R1-Zero reproduction) on Qwen2.5-3B base: pure RL, no cold start.

    python grpo.py --config configs/countdown_qwen.py

The task: reach a target with 3 or 4 given numbers, each used once, with + - * / (data.py
generates it; TinyZero used the Countdown-Tasks-3to4 set, numbers and targets of the same kind).
The R1-Zero template with the answer opened as "Let me solve this step by step.\n<think>" as in
TinyZero; reward 1 for a correct equation and 0.1 for the format (TinyZero's values); lr 1e-6,
KL 0.001, up to 1024 new tokens (TinyZero's settings). Group size and batch are chosen here.

The prefill's text before <think> is prompt: the rewards see the answer from <think> on, so a
perfect completion scores format 1 (tests/test_config.py checks every shipped config so).

Memory (estimated, not run): dtype=bfloat16 computes in bf16 over fp32 master weights, as lr 1e-6
steps would round away on bf16 weights: weights, gradients and AdamW state take 16 bytes per
parameter (~48 GB), the bf16 reference ~6 GB, activations little with gradient checkpointing:
one 80 GB GPU, or two with torchrun --sharding=fsdp.

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
