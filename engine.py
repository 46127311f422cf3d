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

import torch

from runs import ConfigError, every_rank_done


def load_model(path, device, dtype="float32", attn_implementation="sdpa"):
    """(model, tokenizer) from a hub name or local path, weights in `dtype`. The policy trains in
    float32 (master weights, bf16 compute under autocast); bfloat16 is for frozen copies (the
    reference model) and inference. A tokenizer without a pad token pads with EOS, which is safe:
    masks count only the first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
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


def add_lora(model, rank, alpha, dropout, target_modules, adapter=None):
    """LoRA adapters on `model`'s linear layers, in place (peft): the model's own forward then
    computes W x + (alpha / rank) B A x with W frozen and only A, B trainable, so the engine's
    sampling and log-prob paths need no change. target_modules: "all-linear" (every linear layer
    but the output head) or comma-separated module names. adapter: a saved adapter folder to go
    on from (a resumed run). -> the PeftModel (for WithoutAdapters, saving and merged_weights)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora_rank: LoRA needs the peft package (pip install peft)") from None
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads an attribute that transformers 5 renamed
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        try:
            lora = (peft.PeftModel.from_pretrained(model, adapter, is_trainable=True) if adapter else
                    peft.get_peft_model(model, config))
        except ValueError as err:  # no module of that name
            raise ConfigError(f"lora_target_modules: {str(err).strip().splitlines()[0]}") from None
    if not any(p.requires_grad for p in model.parameters()):  # never a silent run that trains nothing
        raise ConfigError(f"lora_target_modules: {target_modules!r} leaves no trainable parameter in the model")
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
    state = {key.replace(".base_layer.", "."): value for key, value in base.state_dict().items() if ".lora_" not in key}
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
    def sample(self, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_p=1.0, uniforms=None,
               return_stats=False):
        """Completions [B, T] of the policy for left-padded prompts [B, P] (see `sample`); with
        return_stats also the sampler's log-prob of each token and the entropy, [B, T] each."""
        self.model.eval()
        with self.autocast():
            if self.uses_static(prompt_ids.size(1) + max_new_tokens):
                out = self.decoder.sample(prompt_ids, prompt_mask, max_new_tokens, self.eos_ids, self.pad_id,
                                          temperature, top_p, uniforms, self.share_prompt)
                return out if return_stats else out[0]
            return sample(self.model, prompt_ids, prompt_mask, max_new_tokens, self.eos_ids, self.pad_id, temperature,
                          top_p, uniforms, self.share_prompt, return_stats)

    def logprobs(self, ids, attention, num_completion, temperature=1.0, model=None, micro_batch_size=None,
                 share_prompt=None, with_entropy=False):
        """log-probs [B, C] of the last num_completion tokens of ids [B, L] under `model` (the
        policy when None), with gradients unless micro_batch_size is given: then without, a
        micro-batch at a time (the old policy's and the reference's log-probs). share_prompt:
        None = the engine's setting (see completion_logprobs). with_entropy: (log-probs, entropy
        [B, C]), both with gradients (for an entropy bonus)."""
        model = self.model if model is None else model
        share = self.share_prompt if share_prompt is None else share_prompt
        if micro_batch_size is None:
            with self.autocast():
                out = completion_logprobs(model, ids, attention, num_completion, temperature, share, with_entropy)
            return out if with_entropy else out[0]
        with torch.no_grad():
            return torch.cat([self.logprobs(ids[i:i + micro_batch_size], attention[i:i + micro_batch_size],
                                            num_completion, temperature, model, share_prompt=share)
                              for i in range(0, len(ids), micro_batch_size)])


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
                          f"{transformers.__version__}, so it cannot be sampled here (a newer transformers may)")
    logits = out.logits
    if rows is not None and len(distinct) < len(prompt_ids):
        cache.batch_select_indices(rows)
        logits = logits[rows]
    return logits, {name: cache}


def positions_of(mask):
    """Position ids of a left-padded attention mask [B, L]: 0 at each row's first real token."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature=1.0, top_p=1.0, uniforms=None,
           share_prompt=True, return_stats=False):
    """Sample completions for left-padded prompts [B, P] with a KV cache; temperature 0 is greedy.
    uniforms [B, max_new_tokens] in [0, 1) pick the tokens (drawn here when None). Returns [B, T]
    with T <= max_new_tokens (it stops once every row, on every rank, has an EOS); tokens after a
    row's EOS are pad_id. share_prompt: repeated prompts are prefilled once (prefill_prompts).
    return_stats: also the sampler's log-prob of each token and the entropy of softmax(logits /
    temperature) at each position, both [B, T] and free here (mask them with completion_mask)."""
    uniforms = draw_uniforms(prompt_ids, max_new_tokens, temperature) if uniforms is None else uniforms
    logits, cache = prefill_prompts(model, prompt_ids, prompt_mask, share_prompt)
    mask, positions = prompt_mask, positions_of(prompt_mask)

    def advance(token, t):  # the model's next logits after `token`, and the next pick
        nonlocal mask, positions
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                       use_cache=True, **cache).logits[:, -1]
        return pick_and_score(logits.float(), temperature, top_p, uniforms[:, t + 1])
    first = pick_and_score(logits[:, -1].float(), temperature, top_p, uniforms[:, 0])
    tokens, logps, entropies = decode_loop(first, advance, max_new_tokens, eos_ids, pad_id)
    return (tokens, logps, entropies) if return_stats else tokens


def draw_uniforms(prompt_ids, max_new_tokens, temperature):
    """The uniforms [B, max_new_tokens] that pick the tokens; greedy decoding draws none (zeros),
    so that it leaves the random stream as it was."""
    draw = torch.rand if temperature > 0 else torch.zeros
    return draw(len(prompt_ids), max_new_tokens, device=prompt_ids.device)


def decode_loop(first, advance, max_new_tokens, eos_ids, pad_id):
    """The loop both sampling paths share. first: (token, log-prob, entropy), each [B], picked from
    the prompt's last logits; advance(token, t) gives the same for position t + 1. Tokens after a
    row's EOS are pad_id; it stops once every row, on every rank, has an EOS, checked every 8
    tokens as each check waits for the device -> (tokens, log-probs, entropies), each [B, T]."""
    token, logp, entropy = first
    done = torch.zeros(len(token), dtype=torch.bool, device=token.device)
    tokens, logps, entropies = [], [], []
    for t in range(max_new_tokens):
        token = torch.where(done, pad_id, token)
        tokens.append(token), logps.append(logp), entropies.append(entropy)
        done |= torch.isin(token, eos_ids)
        if t == max_new_tokens - 1 or (t % 8 == 7 and every_rank_done(done)):
            break
        token, logp, entropy = advance(token, t)
    return torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(entropies, 1)


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
    (None unless with_entropy; both carry gradients where grad is enabled). Logits exist only at completion positions, and
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
            out = torch.nn.functional.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype),
                                                                   attn_mask=mask, scale=attention.scaling,
                                                                   enable_gqa=True)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(B, S, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.body.norm(x[:, -1]))

    def decode_step(self, token, position, key_mask, slot, caches, uniform, temperature, top_p):
        """One token for every row: the model's next-token logits after `token` [B] at `position`
        [B], stored at cache `slot` [1] -> (next token [B], its log-prob [B] and the entropy [B]
        of softmax(logits / temperature))."""
        key_mask.index_fill_(1, slot, True)
        logits = self.forward(token[:, None], position[:, None], key_mask[:, None, None, :], caches, slot).float()
        return pick_and_score(logits, temperature, top_p, uniform)

    @torch.no_grad()
    def sample(self, prompt_ids, prompt_mask, max_new_tokens, eos_ids, pad_id, temperature=1.0, top_p=1.0,
               uniforms=None, share_prompt=True):
        """As `sample` (same tokens for the same uniforms), plus the sampler's log-prob of each
        sampled token -> (tokens [B, T], logp [B, T], entropy [B, T])."""
        uniforms = draw_uniforms(prompt_ids, max_new_tokens, temperature) if uniforms is None else uniforms
        width = -(-prompt_ids.size(1) // self.bucket) * self.bucket  # left-pad to the bucket: one compile per bucket
        prompt_ids = torch.nn.functional.pad(prompt_ids, (width - prompt_ids.size(1), 0), value=pad_id)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (width - prompt_mask.size(1), 0))
        both = torch.cat([prompt_ids, prompt_mask], 1)
        distinct, rows = torch.unique_consecutive(both, dim=0, return_inverse=True) if share_prompt else (both, None)
        ids, mask = distinct.split(width, 1)
        length, device = width + max_new_tokens, prompt_ids.device
        caches = self.new_caches(len(ids), length, device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        seen = (mask.bool()[:, None, :] & causal) | torch.eye(width, dtype=torch.bool, device=device)  # pads see themselves
        seen = torch.nn.functional.pad(seen, (0, max_new_tokens))[:, None]
        slots = torch.arange(width, device=device)
        logits = self.forward(ids, positions_of(mask), seen, caches, slots).float()
        if rows is not None:
            caches, logits = [(k[rows], v[rows]) for k, v in caches], logits[rows]
        key_mask = torch.nn.functional.pad(prompt_mask.bool(), (0, max_new_tokens))
        position = positions_of(prompt_mask)[:, -1]

        def advance(token, t):
            nonlocal position
            position = position + 1
            slot = torch.tensor([width + t], device=device)
            return self.step(token, position, key_mask, slot, caches, uniforms[:, t + 1], temperature, top_p)
        first = pick_and_score(logits, temperature, top_p, uniforms[:, 0])
        return decode_loop(first, advance, max_new_tokens, eos_ids, pad_id)

    def new_caches(self, rows, length, device):
        config, attention = self.model.config, self.body.layers[0].self_attn
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.model.dtype
        shape = (rows, config.num_key_value_heads, length, attention.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in self.body.layers]


def pick_and_score(logits, temperature, top_p, uniform):
    """pick_token, and the picked token's log-prob and the entropy under softmax(logits /
    temperature) (temperature 0: the plain softmax) -> three [B] tensors."""
    token = pick_token(logits, temperature, top_p, uniform)
    scaled = logits / (temperature or 1.0)
    entropy = torch.special.entr(torch.softmax(scaled, -1)).sum(-1)
    return token, torch.log_softmax(scaled, -1).gather(-1, token[:, None]).squeeze(-1), entropy
