"""Does a recipe fit its GPU? The peak memory of a config, by arithmetic, from the model's shape and
the bytes a training forward saves for backward, measured here on CPU (no GPU, no download).

    python bench/recipe_memory.py configs/gsm8k_qwen.py
    python bench/recipe_memory.py configs/countdown_qwen.py --decoder=hf

The parts: the policy's training state (fp32 weights, gradients and AdamW's two moments: 16 bytes a
parameter), the reference (its dtype), the static decoder's bf16 copy (fp32 weights under bf16
autocast), the decode states it keeps between calls (a KV cache of rows x (prompt bucket + new
tokens) slots each: the training batch's and evaluation's; engine.StaticDecoder.MAX_STATES more
when prompt widths vary), and a micro-batch's activations: saved_tensors_hooks count what
grpo.logprobs saves for backward under bf16 autocast on a 1- and a 2-layer model of the same
widths, at two lengths, which splits it into bytes per token and layer and a fixed part (bf16
casts of the weights). The log-prob head runs chunked (lmhead.py) unless --chunked_head=False.
Not counted: CUDA's context and the allocator's fragmentation (allow a few GB), torch.compile's
workspace. Sampling with decoder=hf frees its cache before the update, so the peak is the larger of
sampling and update there.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import transformers  # noqa: E402

import grpo  # noqa: E402

# the hub configs of the recipes' models (their config.json), so that nothing downloads
SHAPES = {"Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                             tie_word_embeddings=True),
          "Qwen/Qwen2.5-3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                  num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                  tie_word_embeddings=True)}
GB = 1e9


def saved_for_backward(shape, layers, tokens, cfg, completion_share):
    """Bytes grpo.logprobs saves for backward on one sequence of `tokens` (completion_share of them
    completion) of a `layers`-layer model of `shape`, weights left out."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=8192)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    ids = torch.randint(0, shape["vocab_size"], (1, tokens))
    probe = grpo.Config(model="probe", bf16=True, micro_batch_size=cfg.micro_batch_size,  # as the run decides
                        max_new_tokens=cfg.max_new_tokens, share_prompt=False, chunked_head=cfg.chunked_head)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        grpo.logprobs(model, ids, torch.ones_like(ids), round(tokens * completion_share), probe)
    return sum(saved.values())


def activations(shape, cfg, completion_share):
    """(bytes per token and layer, fixed bytes per layer, bytes per token of the rest, fixed bytes
    of the rest), from four measured passes."""
    short, long = 128, 256
    m = {(layers, n): saved_for_backward(shape, layers, n, cfg, completion_share)
         for layers in (1, 2) for n in (short, long)}
    layer = {n: m[2, n] - m[1, n] for n in (short, long)}
    rest = {n: m[1, n] - layer[n] for n in (short, long)}
    per_token = (layer[long] - layer[short]) / (long - short)
    rest_token = (rest[long] - rest[short]) / (long - short)
    return per_token, layer[short] - short * per_token, rest_token, rest[short] - short * rest_token


def budget(cfg, prompt_tokens):
    shape = SHAPES[cfg.model]
    with torch.device("meta"):
        config = transformers.Qwen2Config(**shape)
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    layers, head_dim = shape["num_hidden_layers"], shape["hidden_size"] // shape["num_attention_heads"]
    kv_per_slot = 2 * layers * shape["num_key_value_heads"] * head_dim * 2  # bf16 K and V, one row
    width = -(-prompt_tokens // 64) * 64 + cfg.max_new_tokens
    rows = cfg.prompts_per_step * cfg.group_size
    static = cfg.decoder in ("auto", "static")
    parts = {"training state (16 B/param)": 16 * params,
             "reference": (2 if cfg.dtype == "bfloat16" else 4) * params if cfg.beta else 0,
             "bf16 copy for the static decoder": 2 * params if static else 0,
             "decode state, training batch": rows * width * kv_per_slot,
             "decode state, evaluation": min(cfg.eval_batch_size, cfg.eval_size) * width * kv_per_slot}
    share = cfg.max_new_tokens / (prompt_tokens + cfg.max_new_tokens)
    per_token, layer_fixed, rest_token, rest_fixed = activations(shape, cfg, share)
    tokens = cfg.micro_batch_size * (prompt_tokens + cfg.max_new_tokens)
    recompute = 0
    if cfg.gradient_checkpointing:  # one layer's activations are rebuilt at a time in backward
        plain = argparse.Namespace(**{**vars(cfg), "gradient_checkpointing": False})
        recompute = activations(shape, plain, share)[0] * tokens
    parts["activations of a micro-batch"] = (per_token * layers * tokens + layer_fixed * layers
                                             + rest_token * tokens + rest_fixed + recompute)
    if static:
        return parts, sum(parts.values())
    sampling = sum(v for k, v in parts.items() if not k.startswith("activations"))
    update = sum(v for k, v in parts.items() if not k.startswith("decode state"))
    return parts, max(sampling, update)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--prompt_tokens", type=int, default=None)  # default: the config's max_prompt_tokens
    args, rest = parser.parse_known_args(argv)
    cfg = grpo.parse_config(["--config", args.config, *rest, "--out_dir=/tmp/recipe_memory_unused"])
    prompt_tokens = args.prompt_tokens or cfg.max_prompt_tokens or 256
    parts, peak = budget(cfg, prompt_tokens)
    print(f"{args.config} ({cfg.model}; prompts of up to {prompt_tokens} tokens, {cfg.max_new_tokens} new)")
    for name, value in parts.items():
        print(f"  {name:<34} {value / GB:6.1f} GB")
    print(f"  {'peak':<34} {peak / GB:6.1f} GB (+ CUDA context and fragmentation)")
    return parts, peak


if __name__ == "__main__":
    main()
