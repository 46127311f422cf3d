"""
lmhead.py: completion log-probs that never hold [B, C, V] logits.

grpo.completion_logprobs is the definition: the model's logits at every completion position, then
log-softmax. Under autograd those logits stay alive for backward, in fp32 for the log-softmax: at
Qwen's 151,936-token vocabulary, 32 rows of 1,024 tokens hold ~40 GB before backward. Here the
model runs with its LM head reading only the last position, and the head's matmul, log-softmax,
gather and entropy run a chunk of positions at a time in a custom autograd function that keeps
only the hidden states [B, C, H] and recomputes each chunk's logits in backward (the idea of
Liger's fused linear cross-entropy and prime-rl's fused_lm_head_chunk_size). Values and gradients
equal the definition's (tests/test_lmhead.py); grpo.logprobs picks it where it matters (chunked_head).
"""
import torch

from configurator import ConfigError
from engine import positions_of, shares_prompt_pass, unwrap

CHUNK_LOGITS = 1 << 24  # logits of a chunk (64 MB in fp32): its positions are CHUNK_LOGITS // V
# config values by which a family's logits are not hidden @ W^T (Gemma 2's softcap, Cohere's and
# Granite's scales, FalconH1's multiplier); such a model keeps the definition's path
HEAD_TRANSFORMS = ("final_logit_softcapping", "output_logit_soft_cap", "logit_scale", "logits_scaling",
                   "lm_head_multiplier", "output_multiplier")


def matters(model, cfg):
    """Whether grpo.logprobs takes lmhead.logprobs: cfg.chunked_head, no torch.compile, a plain head
    (plain_head), and a micro-batch's logits (micro_batch_size x max_new_tokens x V) past one chunk."""
    head = cfg.chunked_head and not cfg.compile and plain_head(model)
    return bool(head) and cfg.micro_batch_size * cfg.max_new_tokens * head.weight.size(0) > CHUNK_LOGITS


def plain_head(model):
    """The LM head (a torch.nn.Linear) when a model's logits are exactly hidden @ W^T: no bias, no
    softcap or scale after it, not sharded by FSDP (whose weights are whole only inside its
    forward), not LoRA-adapted; else None."""
    if hasattr(model, "reshard"):  # fully_shard's
        return None
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    config = inner.config.get_text_config()
    transformed = any(getattr(config, key, None) not in (None, 1, 1.0) for key in HEAD_TRANSFORMS)
    return None if transformed else head


class ChunkedHead(torch.autograd.Function):
    """log-probs [N] of targets [N] and entropies [N] under softmax(hidden [N, H] @ weight^T /
    temperature), `rows` positions at a time. The matmul runs in `dtype` (the autocast's, as the
    model's own head would) and the softmax in fp32. Saved for backward: hidden, weight (the
    parameter itself), targets and the log-sum-exps [N]; each chunk's logits are made again there.
    d logp / dz = onehot - p; d H / dz = -p (z - E_p[z]); z = logits / temperature."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, rows, dtype):
        logps, entropies, lses = [], [], []
        w = weight.to(dtype)  # cast once, not per chunk
        for h, target in zip(hidden.split(rows), targets.split(rows)):
            logp, entropy, lse = scored(chunk_logits(h, w, temperature), target)
            logps.append(logp)
            entropies.append(entropy)
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, targets, torch.cat(lses))
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        return torch.cat(logps), torch.cat(entropies)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden, grad_weight = torch.empty_like(hidden), None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.to(ctx.dtype)
        for i in range(0, len(hidden), ctx.rows):
            part = slice(i, i + ctx.rows)
            h = hidden[part]
            z = chunk_logits(h, w, ctx.temperature)
            p = (z - lse[part, None]).exp_()
            grad_z = torch.zeros_like(z)  # in place from here: a chunk's [n, V] temporaries are z, p and this
            if grad_logp is not None:
                grad_z.addcmul_(p, grad_logp[part, None], value=-1)
                grad_z.scatter_add_(-1, targets[part, None], grad_logp[part, None])
            if grad_entropy is not None:
                expected = (p * z).sum(-1, keepdim=True)
                grad_z.sub_(z.sub_(expected).mul_(p).mul_(grad_entropy[part, None]))
            grad_logits = grad_z.div_(ctx.temperature).to(ctx.dtype)
            grad_hidden[part] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h.to(ctx.dtype)).float()
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunk_logits(hidden, weight, temperature):
    """One chunk's logits / temperature in fp32 [n, V], the matmul in weight's dtype (the run's
    compute dtype, cast once by the caller)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.to(weight.dtype), weight).float() / temperature


def scored(z, targets):
    """From scaled logits z [n, V] (fp32): the targets' log-probs [n], the entropies [n] and the
    log-sum-exps [n]."""
    lse = torch.logsumexp(z, -1)
    return z.gather(-1, targets[:, None]).squeeze(-1) - lse, lse - (torch.softmax(z, -1) * z).sum(-1), lse


def head_input(model, head, **inputs):
    """One forward call of `model` in which `head` reads only the last position -> the head's whole
    input [B, k, H], checked: the head alone made the model's logits there."""
    taken = []

    def last_position_only(module, args):
        taken.append(args[0])
        return (args[0][:, -1:],)
    hook = head.register_forward_pre_hook(last_position_only)
    try:
        logits = model(**inputs).logits
    finally:
        hook.remove()
    hidden = taken[0]
    with torch.no_grad():  # the head computed the model's logits from hidden alone: nothing after it
        if not torch.equal(head(hidden[:, -1:]), logits):
            raise ConfigError(f"chunked_head: {type(unwrap(model)).__name__}'s logits are not its LM head's "
                              "output alone; run with --chunked_head=False")
    return hidden


def logprobs(model, input_ids, attention_mask, num_completion, cfg, with_entropy, prefill):
    """grpo.completion_logprobs' results at cfg.temperature through ChunkedHead: logp [B, C] and
    entropy [B, C] (None unless with_entropy). With cfg.share_prompt, where engine.shares_prompt_pass
    allows, prefill (grpo.prefill_prompts) runs a group's prompt once and its last logits [B, 1, V]
    score the first completion token. The model's head must be plain_head's."""
    head, C, temperature = plain_head(model), num_completion, cfg.temperature
    positions = positions_of(attention_mask)
    prompt_len = input_ids.size(1) - C
    first = None
    if shares_prompt_pass(model, cfg.share_prompt):
        first, cache = prefill(model, input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
        hidden = head_input(model, head, input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask,
                            position_ids=positions[:, prompt_len:], use_cache=True, logits_to_keep=C, **cache)
    else:
        hidden = head_input(model, head, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions, use_cache=False, logits_to_keep=C + 1)
    hidden = hidden[:, :-1]  # position t's state predicts token t + 1
    targets = input_ids[:, input_ids.size(1) - hidden.size(1):]
    dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(
        input_ids.device.type) else head.weight.dtype
    rows = max(1, CHUNK_LOGITS // head.weight.size(0))
    logp, entropy = ChunkedHead.apply(hidden.reshape(-1, hidden.size(-1)), head.weight, targets.reshape(-1),
                                      temperature, rows, dtype)
    logp, entropy = logp.view(targets.shape), entropy.view(targets.shape)
    if first is not None:  # the first completion token, from the prompt's own logits
        first_logp, first_entropy, _ = scored(first[:, -1].float() / temperature, input_ids[:, prompt_len])
        logp = torch.cat([first_logp[:, None], logp], 1)
        entropy = torch.cat([first_entropy[:, None], entropy], 1)
    return logp, entropy if with_entropy else None
