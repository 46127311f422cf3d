"""
engine.py: the model as a sequence model, for grpo.py and r1.py: loading (dtype, attention, pad and
stop tokens, dropout), a group's prompt prefilled once, sampling with a KV cache, the log-probs and
entropy of completions, bf16 autocast. Nothing here knows about rewards or the GRPO objective.

`Engine` is the interface the trainer calls (`engine.sample(...)`, `engine.logprobs(...)`). Below
it are two sampling paths that pick the same tokens from the same uniforms: transformers' forward
with the model's own cache (any family; `sample`), and `StaticDecoder`, a KV cache the engine owns
with one decode step that picks its own token (Llama, Qwen2, Qwen3, Mistral; compiled on CUDA).
"""
import inspect
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch

import runs
from runs import ConfigError, distribute, every_rank_done, say


@dataclass
class EngineOptions:
    # the engine: precision, attention, sampling and log-prob passes (engine.py)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the policy trains in fp32 either way; bf16: compute
    bf16: Optional[bool] = None    # bf16 autocast over fp32 weights; None = on CUDA, or with dtype=bfloat16
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"  # the last needs flash-attn
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    decoder: Literal["auto", "static", "hf"] = "auto"  # static: the engine's KV cache (Llama, Qwen, Mistral)
    compile_decode: Optional[bool] = None  # torch.compile the static decode step; None = on CUDA
    share_prompt: bool = True      # a group's G sequences share one pass over their prompt (same result)
    disable_dropout: bool = True   # dropout off: the update sees the policy that sampled (TRL: the same)
    compile: bool = False          # torch.compile the log-prob forward (no gain measured, ~100 s to compile)

    def checks(self):
        return [(self.dtype != "bfloat16" or self.bf16 is not False,
                 "bf16: dtype=bfloat16 computes in bf16; bf16=False contradicts it"),
                (self.attn_implementation != "flash_attention_2" or runs.installed("flash_attn"),
                 "attn_implementation: flash_attention_2 needs the flash-attn package")]


@dataclass
class LoraOptions:
    # LoRA (needs peft; engine.py): adapters on a frozen base
    lora_rank: int = 0             # rank r of the adapters; 0 = train every weight (arXiv 2106.09685: 1-64)
    lora_alpha: float = 32.0       # the adapters' update is scaled by alpha / rank (peft's default: 8)
    lora_dropout: float = 0.0      # dropout on the adapters' input; > 0 needs disable_dropout=False
    lora_target_modules: str = "all-linear"  # all-linear (every linear layer but the head), or q_proj,v_proj

    def checks(self):
        off = not self.lora_rank
        return [(self.lora_rank >= 0, "lora_rank: must not be negative"),
                (off or runs.installed("peft"), "lora_rank: LoRA needs the peft package (pip install peft)"),
                (off or self.sharding == "ddp",
                 "lora_rank: LoRA runs with sharding=ddp (an adapter is small)"),
                (off or not self.ref_sync_every,
                 "ref_sync_every: with LoRA the reference is the base model with "
                 "adapters off, which cannot move; use 0"),
                (self.lora_alpha > 0, "lora_alpha: must be positive"),
                (0 <= self.lora_dropout < 1, "lora_dropout: must be in [0, 1)"),
                (not self.lora_dropout or not self.disable_dropout,
                 "lora_dropout: dropout needs disable_dropout=False (the update would score another policy)")]


class Sampled(NamedTuple):
    """Completions [B, T] (pad after each row's first stop token) with the sampler's log-prob of
    each token and the entropy at each position, [B, T] each (mask them with completion_mask)."""
    tokens: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor


def load_model(path, device, dtype="float32", attn_implementation="sdpa"):
    """(model, tokenizer) from a hub name or local path, weights in `dtype`. The policy trains in
    float32 (master weights, bf16 compute under autocast); bfloat16 is for frozen copies (the
    reference model) and inference. A tokenizer without a pad token pads with EOS, which is safe:
    masks count only the first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # one progress bar is enough: ours
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn_implementation).to(device)
    except (OSError, ValueError, KeyError) as err:  # not found, offline, unknown architecture, bad files
        raise ConfigError(f"model: {path}: {str(err).strip().splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"model: {path}: the tokenizer has no EOS token, so completions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def disable_dropout(model):
    """Zero every dropout probability, in modules and in attention (TRL's disable_dropout): the
    sampling and no-grad passes run in eval mode, so with dropout the update would score the
    completions under another policy than the one that drew them."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # transformers' attention reads a float while training
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def add_lora(model, options, adapter=None):
    """LoRA adapters on `model`'s linear layers, in place (peft): the model's own forward then
    computes W x + (alpha / rank) B A x with W frozen and only A, B trainable, so the engine's
    sampling and log-prob paths need no change. options: LoraOptions (lora_target_modules:
    "all-linear", every linear layer but the output head, or comma-separated module names).
    adapter: a saved adapter folder to go on from (a resumed run). -> the PeftModel (for
    WithoutAdapters, saving and merged_weights)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora_rank: LoRA needs the peft package (pip install peft)") from None
    names = options.lora_target_modules
    targets = names if names == "all-linear" else [t.strip() for t in names.split(",")]
    config = peft.LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha,
                             lora_dropout=options.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads an attribute that transformers 5 renamed
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        try:
            lora = (peft.PeftModel.from_pretrained(model, adapter, is_trainable=True) if adapter else
                    peft.get_peft_model(model, config))
        except ValueError as err:  # no module of that name
            raise ConfigError(f"lora_target_modules: {str(err).strip().splitlines()[0]}") from None
    if not any(p.requires_grad for p in model.parameters()):  # never a silent run that trains nothing
        raise ConfigError(f"lora_target_modules: {names!r} leaves no trainable parameter in the model")
    return lora


class WithoutAdapters(torch.nn.Module):
    """The frozen base under a LoRA policy, as a model of its own: the policy's forward with the
    adapters switched off. It is GRPO's reference model without a second copy of the weights."""

    def __init__(self, lora):
        super().__init__()
        self.module, self.lora = lora.get_base_model(), [lora]  # `module`: unwrap() finds the model

    def forward(self, **kwargs):
        with self.lora[0].disable_adapter():
            return self.module(**kwargs)


@torch.no_grad()
def merged_weights(lora):
    """The base model's state dict under its own parameter names with every adapter folded in,
    W + (alpha / rank) B A: what plain from_pretrained loads as the adapted model."""
    base, adapter = lora.get_base_model(), lora.active_adapter
    state = {key.replace(".base_layer.", "."): value for key, value in base.state_dict().items()
             if ".lora_" not in key}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.base_layer.weight
            state[f"{name}.weight"] = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return state


def stop_ids(model, tokenizer):
    """Every token id that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return torch.tensor(sorted(ids), device=model.device)


def unwrap(model):
    """The transformers model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class Engine:
    """Sampling and log-probs for a policy and the models that share its tokenizer (the reference,
    the policy's training wrapper). bf16: run forward passes under bf16 autocast (the weights stay
    as loaded). share_prompt: a group's G sequences share one forward pass over their prompt.
    decoder: "static" samples with StaticDecoder where the model's family allows (compiled with
    compile_decode), "hf" with transformers' forward and cache (`sample`); "auto" is static where
    the family allows, except under FSDP, whose sharded layers only gather inside their forward."""

    def __init__(self, model, tokenizer, bf16=False, share_prompt=True, decoder="hf", compile_decode=False):
        self.model, self.tokenizer, self.bf16, self.share_prompt = model, tokenizer, bf16, share_prompt
        self.eos_ids, self.pad_id = stop_ids(model, tokenizer), tokenizer.pad_token_id
        why_not = StaticDecoder.unsupported(model, 0)
        if decoder == "static" and why_not:
            raise ConfigError(f"decoder: static decoding cannot run this model: {why_not}")
        self.decoder = StaticDecoder(model, compile_decode) if decoder != "hf" and not why_not else None
        self.why_not_static = why_not if decoder != "hf" else "decoder=hf"

    def uses_static(self, length):
        """Whether sampling `length` tokens (prompt + completion) takes the static decoder: not under
        FSDP (its sharded layers gather their weights only inside their own forward), and not past
        a sliding window."""
        if self.decoder is None or any(hasattr(m, "reshard") for m in self.model.modules()):
            return False
        return StaticDecoder.unsupported(self.model, length) is None

    def autocast(self):
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0, uniforms=None):
        """Sampled completions of the policy for left-padded prompts [B, P] (see `sample`)."""
        how = Sampling(max_new_tokens, self.eos_ids, self.pad_id, temperature, top_p, uniforms,
                       self.share_prompt)
        self.model.eval()
        with self.autocast():
            if self.uses_static(prompt_ids.size(1) + max_new_tokens):
                return self.decoder.sample(prompt_ids, prompt_mask, how)
            return sample(self.model, prompt_ids, prompt_mask, how)

    def logprobs(self, ids, attention, num_completion, temperature=1.0, model=None, with_entropy=False):
        """(log-probs [B, C] of the last num_completion tokens of ids [B, L] under `model` (the
        policy when None), with gradients; and with_entropy the entropy [B, C], else None)."""
        with self.autocast():
            return completion_logprobs(self.model if model is None else model, ids, attention, num_completion,
                                       temperature, self.share_prompt, with_entropy)

    @torch.no_grad()
    def logprobs_no_grad(self, ids, attention, num_completion, temperature, model, micro_batch_size):
        """log-probs [B, C] as `logprobs`, without gradients, a micro-batch at a time: the old
        policy's and the reference's."""
        return torch.cat([self.logprobs(ids[i:i + micro_batch_size], attention[i:i + micro_batch_size],
                                        num_completion, temperature, model)[0]
                          for i in range(0, len(ids), micro_batch_size)])


def open_reference(path, options, device, weights=None):
    """The frozen reference model in options.dtype (bf16 halves its memory): RL's starting point at
    `path`, or with `weights` (a resumed run's synced copy) those; sharded as the policy is."""
    model = load_model(path, device, options.dtype,
                       options.attn_implementation)[0].eval().requires_grad_(False)
    if weights is not None:
        model.load_state_dict(weights)
    return distribute(model, options, device, trainable=False)


def open_policy(path, options, device, dtype):
    """The policy (weights in dtype) and its Engine, as `options` (EngineOptions) ask: dropout off
    (disable_dropout), gradient checkpointing, bf16 autocast by default on CUDA and with
    dtype=bfloat16 on any device, the static decoder compiled on CUDA. Says which sampler runs."""
    model, tokenizer = load_model(path, device, dtype, options.attn_implementation)
    if options.disable_dropout:
        disable_dropout(model)
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = (device.type == "cuda" or options.dtype == "bfloat16") if options.bf16 is None else options.bf16
    compile_decode = device.type == "cuda" if options.compile_decode is None else options.compile_decode
    engine = Engine(model, tokenizer, bf16, options.share_prompt, options.decoder, compile_decode)
    say("sampling: " + (f"static KV cache{', compiled' if compile_decode else ''}" if engine.decoder else
                        f"transformers ({engine.why_not_static})"))
    return model, engine


# ----------------------------------------------------------------------------
# today's path: transformers forward calls with the model's own KV cache


ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def can_share_prompts(model):
    """Whether a prompt's cache can be copied to other rows: every layer is attention, whose cache
    is keys and values by row. Hybrid models (LFM2's convolutions, Qwen3-Next's linear attention)
    keep running states that transformers updates in place; they run every row instead."""
    config = getattr(unwrap(model), "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return set(getattr(config, "layer_types", None) or ATTENTION_LAYERS) <= ATTENTION_LAYERS


def prefill_prompts(model, prompt_ids, prompt_mask, share=True):
    """Run each distinct prompt of left-padded prompt_ids [B, P] once (a group's G rows share one
    pass), then copy its KV cache and last logits to every row that has it (gradients flow back
    through the copies); share=False, or a model whose cache cannot be copied, runs every row.
    -> (logits [B, 1, V], the cache as a keyword argument for the next forward call)."""
    from transformers import DynamicCache
    both = torch.cat([prompt_ids, prompt_mask], 1)
    share = share and can_share_prompts(model)
    distinct, rows = torch.unique_consecutive(both, dim=0, return_inverse=True) if share else (both, None)
    ids, mask = distinct.split(prompt_ids.size(1), 1)
    # transformers 5 names the argument `cache`, 4.x `past_key_values`
    name = "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"
    config = getattr(unwrap(model), "config", None)
    # attention layers (full or sliding) get a cache from the config, in training mode too; a hybrid
    # model builds its own, of the state classes its transformers version has
    given = {name: DynamicCache(config=config)} if share and config is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask),
                use_cache=True, logits_to_keep=1, **given)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:  # e.g. FalconH1 under transformers 4.x, which only fills a cache it is given
        import transformers
        raise ConfigError(f"model: {type(unwrap(model)).__name__} returns no KV cache under transformers "
                          f"{transformers.__version__}, so it cannot be sampled here "
                          "(a newer transformers may)")
    logits = out.logits
    if rows is not None and len(distinct) < len(prompt_ids):
        cache.batch_select_indices(rows)
        logits = logits[rows]
    return logits, {name: cache}


def positions_of(mask):
    """Position ids of a left-padded attention mask [B, L]: 0 at each row's first real token."""
    return (mask.cumsum(1) - 1).clamp(min=0)


class Sampling(NamedTuple):
    """How to sample: up to max_new_tokens tokens, a row ending at any of eos_ids [S] (then pad_id);
    temperature 0 is greedy; the top_p nucleus; uniforms [B, max_new_tokens] in [0, 1) pick the
    tokens (drawn when None); share_prompt: repeated prompts are prefilled once (prefill_prompts)."""
    max_new_tokens: int
    eos_ids: torch.Tensor
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    uniforms: Optional[torch.Tensor] = None
    share_prompt: bool = True


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, how):
    """Sample completions for left-padded prompts [B, P] with the model's own KV cache, as `how`
    (Sampling) says -> Sampled, [B, T] each, T <= max_new_tokens (it stops once every row, on every
    rank, has an EOS); the sampler's log-prob of each token and the entropy of softmax(logits /
    temperature) at each position come free."""
    uniforms = draw_uniforms(prompt_ids, how) if how.uniforms is None else how.uniforms
    logits, cache = prefill_prompts(model, prompt_ids, prompt_mask, how.share_prompt)
    mask, positions = prompt_mask, positions_of(prompt_mask)

    def advance(token, t):  # the model's next logits after `token`, and the next pick
        nonlocal mask, positions
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **cache).logits[:, -1]
        return pick_and_score(logits.float(), how.temperature, how.top_p, uniforms[:, t + 1])
    first = pick_and_score(logits[:, -1].float(), how.temperature, how.top_p, uniforms[:, 0])
    return decode_loop(first, advance, how)


def draw_uniforms(prompt_ids, how):
    """The uniforms [B, max_new_tokens] that pick the tokens; greedy decoding draws none (zeros),
    so that it leaves the random stream as it was."""
    draw = torch.rand if how.temperature > 0 else torch.zeros
    return draw(len(prompt_ids), how.max_new_tokens, device=prompt_ids.device)


def decode_loop(first, advance, how):
    """The loop both sampling paths share. first: (token, log-prob, entropy), each [B], picked from
    the prompt's last logits; advance(token, t) gives the same for position t + 1. Tokens after a
    row's EOS are pad_id; it stops once every row, on every rank, has an EOS, checked every 8
    tokens as each check waits for the device -> Sampled."""
    token, logp, entropy = first
    done = torch.zeros(len(token), dtype=torch.bool, device=token.device)
    tokens, logps, entropies = [], [], []
    for t in range(how.max_new_tokens):
        token = torch.where(done, how.pad_id, token)
        tokens.append(token), logps.append(logp), entropies.append(entropy)
        done |= torch.isin(token, how.eos_ids)
        if t == how.max_new_tokens - 1 or (t % 8 == 7 and every_rank_done(done)):
            break
        token, logp, entropy = advance(token, t)
    return Sampled(torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(entropies, 1))


def pick_token(logits, temperature, top_p, uniform):
    """One token per row from logits [B, V]: argmax when temperature is 0, else a sample of
    softmax(logits / temperature) restricted to the top_p nucleus, by inverse CDF: the first token
    whose cumulative probability exceeds uniform [B] * total. As the uniforms are drawn per
    completion, a completion does not depend on which rank or batch it is sampled in."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps the top token always
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    cdf = probs.cumsum(-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=len(cdf[0]) - 1)  # never a token of probability 0


def completion_logprobs(model, input_ids, attention_mask, num_completion, temperature=1.0, share_prompt=False,
                        with_entropy=True):
    """log pi(o_t | q, o_<t) / temperature-scaled, for the last num_completion tokens of
    input_ids [B, L] (left-padded prompt + completion) -> logp [B, C] and entropy [B, C]
    (None unless with_entropy; both carry gradients where grad is enabled). Logits exist only at
    completion positions, and
    log-softmax is taken a block of rows at a time (at most 2^24 logits: one row of a large
    vocabulary, a whole batch of a small one), so the full-vocabulary log-probs of a large batch
    are never held at once.
    share_prompt: consecutive rows with the same prompt (a group) share one forward pass over it
    (prefill_prompts); the same result, fewer FLOPs. Not under gradient checkpointing, which
    keeps no KV cache. Whether to share is the caller's choice, not the data's, so that every rank
    makes the same number of forward calls (FSDP gathers weights in each)."""
    positions = positions_of(attention_mask)
    prompt_len = input_ids.size(1) - num_completion
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in unwrap(model).modules())
    if share_prompt and not checkpointed and can_share_prompts(model):
        first, cache = prefill_prompts(model, input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
        rest = model(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask, use_cache=True,
                     position_ids=positions[:, prompt_len:], logits_to_keep=num_completion, **cache).logits
        logits = torch.cat([first, rest[:, :-1]], 1)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False, logits_to_keep=num_completion + 1).logits[:, :-1]
    targets = input_ids[:, -num_completion:]
    logps, entropies = [], []
    rows = max(1, (1 << 24) // (num_completion * logits.size(-1)))
    for block, block_targets in zip(logits.split(rows), targets.split(rows)):
        block = block.float() / temperature
        lse = torch.logsumexp(block, -1)
        logps.append(block.gather(-1, block_targets[..., None]).squeeze(-1) - lse)
        if with_entropy:  # H = logsumexp - E_p[logit]: differentiable, and finite where p underflows to 0
            entropies.append(lse - (torch.softmax(block, -1) * block).sum(-1))
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


# ----------------------------------------------------------------------------
# the fast path: a KV cache the engine owns, one decode step that picks its own token


FAST_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def rotate_half(x):
    first, second = x.chunk(2, -1)
    return torch.cat([-second, first], -1)


class StaticDecoder:
    """Decoding with a preallocated KV cache for the Llama-shaped families (FAST_FAMILIES): every
    row's keys and values live at the same cache slots (a left-padded prompt's pads are masked),
    attention reads the cache with grouped-query heads as they are (no K/V copied per query
    head), and one decode step embeds, attends, picks the next token from its uniform and records
    that token's log-prob and the entropy, all on the device. It reuses the Hugging Face model's
    own modules (projections, norms, MLP, rotary), so it always samples the current weights.
    compile: torch.compile the decode step (on CUDA with CUDA graphs, "reduce-overhead"); prompts
    are then left-padded to a multiple of `bucket` tokens so that a new prompt length does not
    compile again."""

    def __init__(self, model, compile=False, bucket=64):
        self.model = unwrap(model)
        self.body, self.bucket = self.model.model, bucket if compile else 1
        self.step = self.decode_step
        if compile:
            mode = "reduce-overhead" if self.model.device.type == "cuda" else None
            self.step = torch.compile(self.decode_step, mode=mode, dynamic=False)

    @staticmethod
    def unsupported(model, length):
        """Why `model` cannot be decoded here for sequences of `length` tokens, or None."""
        config = unwrap(model).config
        if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5):
            return "torch < 2.5 has no grouped-query attention in scaled_dot_product_attention"
        if config.model_type not in FAST_FAMILIES:
            return f"{config.model_type} is not one of {', '.join(FAST_FAMILIES)}"
        window = getattr(config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"])
        if window and sliding and getattr(config, "use_sliding_window", True) and window < length:
            return f"its sliding window ({window} tokens) is shorter than prompt + completion ({length})"
        return None

    def forward(self, ids, positions, mask, caches, slots):
        """Logits [B, V] after the last of tokens ids [B, S] at positions [B, S], whose keys and
        values are written at cache `slots` [S]; mask [B, 1, S, L]: the cache slots each query sees."""
        B, S = ids.shape
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        for layer, (k_cache, v_cache) in zip(self.body.layers, caches):
            attention, h = layer.self_attn, layer.input_layernorm(x)
            q = attention.q_proj(h).view(B, S, -1, attention.head_dim)
            k = attention.k_proj(h).view(B, S, -1, attention.head_dim)
            if hasattr(attention, "q_norm"):  # Qwen3 normalises each head
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = attention.v_proj(h).view(B, S, -1, attention.head_dim).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
            out = torch.nn.functional.scaled_dot_product_attention(q, k_cache.to(q.dtype),
                                                                   v_cache.to(q.dtype),
                                                                   attn_mask=mask, scale=attention.scaling,
                                                                   enable_gqa=True)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(B, S, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.body.norm(x[:, -1]))

    def decode_step(self, token, position, slot, cache, uniform, pick):
        """One token for every row: the model's next-token logits after `token` [B] at `position`
        [B], stored at cache `slot` [1]; cache: (key mask [B, L], each layer's (K, V)); pick:
        (temperature, top_p) -> (next token [B], its log-prob [B] and the entropy [B] of
        softmax(logits / temperature))."""
        key_mask, caches = cache
        key_mask.index_fill_(1, slot, True)
        logits = self.forward(token[:, None], position[:, None], key_mask[:, None, None, :], caches,
                              slot).float()
        return pick_and_score(logits, *pick, uniform)

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, how):
        """As `sample` (the same tokens for the same uniforms) -> Sampled."""
        uniforms = draw_uniforms(prompt_ids, how) if how.uniforms is None else how.uniforms
        # left-pad to the bucket: one compile per bucket
        width = -(-prompt_ids.size(1) // self.bucket) * self.bucket
        prompt_ids = torch.nn.functional.pad(prompt_ids, (width - prompt_ids.size(1), 0), value=how.pad_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (width - prompt_mask.size(1), 0))
        both = torch.cat([prompt_ids, prompt_mask], 1)
        distinct, rows = (torch.unique_consecutive(both, dim=0, return_inverse=True) if how.share_prompt
                          else (both, None))
        ids, mask = distinct.split(width, 1)
        length, device = width + how.max_new_tokens, prompt_ids.device
        caches = self.new_caches(len(ids), length, device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # pads see themselves
        seen = (mask.bool()[:, None, :] & causal) | torch.eye(width, dtype=torch.bool, device=device)
        seen = torch.nn.functional.pad(seen, (0, how.max_new_tokens))[:, None]
        slots = torch.arange(width, device=device)
        logits = self.forward(ids, positions_of(mask), seen, caches, slots).float()
        if rows is not None:
            caches, logits = [(k[rows], v[rows]) for k, v in caches], logits[rows]
        key_mask = torch.nn.functional.pad(prompt_mask.bool(), (0, how.max_new_tokens))
        position = positions_of(prompt_mask)[:, -1]

        def advance(token, t):
            nonlocal position
            position = position + 1
            slot = torch.tensor([width + t], device=device)
            return self.step(token, position, slot, (key_mask, caches), uniforms[:, t + 1],
                             (how.temperature, how.top_p))
        first = pick_and_score(logits, how.temperature, how.top_p, uniforms[:, 0])
        return decode_loop(first, advance, how)

    def new_caches(self, rows, length, device):
        config, attention = self.model.config, self.body.layers[0].self_attn
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.model.dtype)
        shape = (rows, config.num_key_value_heads, length, attention.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device),
                 torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.body.layers]


def pick_and_score(logits, temperature, top_p, uniform):
    """pick_token, and the picked token's log-prob and the entropy under softmax(logits /
    temperature) (temperature 0: the plain softmax) -> three [B] tensors."""
    token = pick_token(logits, temperature, top_p, uniform)
    scaled = logits / (temperature or 1.0)
    entropy = torch.special.entr(torch.softmax(scaled, -1)).sum(-1)
    return token, torch.log_softmax(scaled, -1).gather(-1, token[:, None]).squeeze(-1), entropy
