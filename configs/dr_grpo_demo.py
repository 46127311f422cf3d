"""The CPU demo with Dr. GRPO's corrections (arXiv 2503.20783): advantages are not divided by
the group's std, and the loss is normalised by a constant instead of each completion's length."""
scale_rewards = "none"
loss_type = "dr_grpo"
out_dir = "runs/dr_grpo_demo"
