"""Countdown (TinyZero) on the tiny model with the R1-Zero recipe shape: no cold start, the
countdown and format rewards only. A smoke test of the task and its reward on CPU: a 1M-parameter
model from random weights does not learn Countdown; that takes a pretrained model of 1.5B or more."""
task = "countdown"
template = "plain"
sft_steps = 0
rewards = "countdown:1,format:0.1"
max_new_tokens = 48
max_steps = 20
eval_size = 50
out_dir = "runs/countdown_tiny"
