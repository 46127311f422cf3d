"""Tool use on CPU: two-digit products, which the tiny model cannot learn to compute in minutes,
with a calculator it may call (tools.py). A quarter of the cold start's worked solutions show the
call, <think><tool>47*38</tool><result>1786</result></think><answer>1786</answer>; the rest state
a product without one. Then GRPO decides when to call. The same run without the calculator:
--tools= (a call is then plain text that nothing answers)."""
task = "products"
tools = "calculator"
max_new_tokens = 64            # a call and its result take ~48 tokens
sft_steps = 300
sft_examples = 4000            # enough distinct products that the answer is copied, not remembered
max_steps = 100
out_dir = "runs/calculator_demo"
