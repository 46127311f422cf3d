"""The CPU demo with DAPO's four changes (arXiv 2503.14476): clip-higher, token-level loss,
dynamic sampling (here: groups with equal rewards are left out, not resampled), and overlong
shaping plus filtering. DAPO also drops the KL term.

Without the KL anchor the demo's lr of 3e-4 is too much for the tiny model: measured here, seed 0
collapsed (entropy to 0, every group's rewards equal, learning stopped: 50.5% -> 0.0% greedy
accuracy). At lr 1e-4 it learns: 50.5% -> 98.5%."""
loss_type = "dapo"
clip_eps_high = 0.28
drop_zero_std_groups = True
mask_truncated = True
rewards = "accuracy:1,format:0.5,overlong:1"
overlong_buffer = 8
beta = 0.0
lr = 1e-4
out_dir = "runs/dapo_demo"
