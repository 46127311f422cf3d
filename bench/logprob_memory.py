"""Peak memory of a training step's log-probs at Qwen's vocabulary: the definition's pass, which holds
[M, C, V] logits for backward, against lmhead.py's chunked head, side by side in one run, each in a
fresh process (its peak resident memory, VmHWM, reset before the step); and the two paths' log-probs,
entropies and gradients compared.

    python bench/logprob_memory.py                      # M = 4 rows, C = 512 completion tokens
    python bench/logprob_memory.py --rows=8 --hidden=256

The model is a Qwen2 of `--layers` layers and `--hidden` width with the 151,936-token vocabulary
(tied embeddings), random weights and random token ids (no tokenizer is needed to take log-probs);
the step is grpo.logprobs with gradients (entropy included, as the entropy bonus asks) and a
backward of a GRPO-shaped loss. Results: --output (runs/logprob_memory.json).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

QWEN_VOCAB = 151_936


def memory_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step(args, chunked, out):
    """One log-prob pass with gradients and its backward, in this process -> peak memory above the
    memory before the step (MiB), seconds; the values and gradients saved to `out`."""
    import transformers

    import grpo
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=args.hidden,
                                      intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=args.prompt + args.completion)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    ids = torch.randint(0, QWEN_VOCAB, (args.rows, args.prompt + args.completion),
                        generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    advantages = torch.randn(args.rows, 1, generator=torch.Generator().manual_seed(2))
    cfg = grpo.Config(model="qwen-shape", chunked_head=chunked, micro_batch_size=args.rows,
                      max_new_tokens=args.completion, share_prompt=False)
    assert grpo.lmhead.matters(model, cfg) == chunked
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
        f.write("5")
    before, started = memory_kb("VmRSS"), time.perf_counter()
    logp, entropy = grpo.logprobs(model, ids, attention, args.completion, cfg, with_entropy=True)
    (-(logp * advantages).mean() - 0.01 * entropy.mean()).backward()
    seconds, peak = time.perf_counter() - started, memory_kb("VmHWM") - before
    torch.save({"logp": logp.detach(), "entropy": entropy.detach(),
                "grads": {name: p.grad for name, p in model.named_parameters()}}, out)
    return {"peak_mib": peak / 1024, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4)        # M: a micro-batch's completions
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=512)  # C
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--one", choices=("plain", "chunked"))  # internal: run one side, print JSON
    parser.add_argument("--out", default="/tmp/logprob_memory")  # the two sides' values, compared, removed
    parser.add_argument("--output", default="runs/logprob_memory.json")
    args = parser.parse_args()
    if args.rows * args.completion * QWEN_VOCAB <= 1 << 24:
        parser.error("rows x completion x 151,936 must pass 2^24 logits, where lmhead.py's path is taken")
    if args.one:
        print(json.dumps(step(args, args.one == "chunked", f"{args.out}.{args.one}.pt")))
        return
    result = {"rows": args.rows, "completion": args.completion, "vocab": QWEN_VOCAB, "hidden": args.hidden,
              "layers": args.layers, "torch": torch.__version__,
              "logits_fp32_mib": args.rows * args.completion * QWEN_VOCAB * 4 / 2**20}
    shape = [f"--{key}={getattr(args, key)}" for key in ("rows", "prompt", "completion", "hidden", "layers")]
    for side in ("plain", "chunked"):
        done = subprocess.run([sys.executable, __file__, f"--one={side}", f"--out={args.out}", *shape],
                              capture_output=True, text=True, check=True)
        result[side] = json.loads(done.stdout.strip().splitlines()[-1])
        print(side, result[side], flush=True)
    plain, chunked = (torch.load(f"{args.out}.{side}.pt") for side in ("plain", "chunked"))
    for side in ("plain", "chunked"):
        os.remove(f"{args.out}.{side}.pt")
    result["max_abs_diff"] = {
        "logp": (plain["logp"] - chunked["logp"]).abs().max().item(),
        "entropy": (plain["entropy"] - chunked["entropy"]).abs().max().item(),
        "grads": max((plain["grads"][k] - chunked["grads"][k]).abs().max().item() for k in plain["grads"])}
    result["peak_ratio"] = result["plain"]["peak_mib"] / result["chunked"]["peak_mib"]
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
