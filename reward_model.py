"""
reward_model.py: rewards learned from preferences, the RLHF half of DeepSeek-R1 (its phase 4).

A reward model (RM) reads a prompt and a completion and gives one number. Annotators (people, or
a rule standing in for them) mark which of two completions of a prompt is better; the RM learns
to score the `chosen` one above the `rejected` one (InstructGPT, arXiv 2203.02155), and GRPO then
optimises the policy against it as against any reward: `--rewards=rm:PATH` (rewards.py).

  python r1.py reward_model --model=tiny --data_path=prefs.jsonl --out_dir=runs/rm   # learn one
  python grpo.py --rewards=accuracy:1,rm:runs/rm:0.5                                # RL with it

Preference rows are TRL's: {"prompt", "chosen", "rejected"} as plain text, or as lists of chat
messages, and an optional "margin" (how much better chosen is). The RM is a transformers
sequence-classification model with one output, saved as a folder plain `transformers` loads: a
causal LM backbone reads the last token that is not padding, an encoder (BERT, MiniLM) its [CLS].
"""
import dataclasses
import math
import os

import torch
import torch.nn.functional as F

import runs
from configurator import ConfigError


@dataclasses.dataclass
class RewardModelOptions:
    # training a reward model (r1.py reward_model; reward_model.py)
    rm_steps: int = 300            # optimizer steps over the preference pairs
    rm_batch_size: int = 16        # pairs per step (TRL: 8 per device)
    rm_lr: float = 1e-4            # AdamW peak lr, warmup then cosine (InstructGPT: 9e-6 at 6B)
    rm_center_coef: float = 0.0    # c * mean((r_chosen + r_rejected)^2) keeps scores near 0 (TRL: 0.01)
    rm_max_tokens: int = 512       # tokens of prompt + completion the RM reads (the completion's end kept)

    def checks(self):
        return [(self.rm_steps >= 1, "rm_steps: must be at least 1"),
                (self.rm_batch_size >= 1, "rm_batch_size: must be at least 1"),
                (self.rm_lr >= 0, "rm_lr: must not be negative"),
                (self.rm_center_coef >= 0, "rm_center_coef: must not be negative"),
                (self.rm_max_tokens >= 8, "rm_max_tokens: must be at least 8")]


# ----------------------------------------------------------------------------
# the math


def bradley_terry_loss(chosen, rejected, margin=None, center_coef=0.0):
    """-log sigmoid(r_chosen - r_rejected - margin), the mean over pairs: the negative
    log-likelihood of the annotators' choices under the Bradley-Terry model P(chosen > rejected) =
    sigmoid(r_chosen - r_rejected) (InstructGPT eq. 1; the margin: Llama 2), plus center_coef *
    mean((r_chosen + r_rejected)^2), which pins the scores' free offset near 0 (TRL's
    center_rewards_coefficient). chosen, rejected, margin: [B] -> a scalar."""
    difference = chosen - rejected - (0 if margin is None else margin)
    loss = -F.logsigmoid(difference).mean()
    return loss + center_coef * ((chosen + rejected) ** 2).mean() if center_coef else loss


def pairwise_accuracy(chosen, rejected):
    """The share of pairs the RM orders as the annotators did, r_chosen > r_rejected; a tie counts
    one half (a coin flip). [B], [B] -> a float."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


# ----------------------------------------------------------------------------
# reading (prompt, completion) and scoring it


def rm_text(tokenizer, prompt, completion):
    """What the RM reads: with a chat template, the conversation (user: prompt, assistant:
    completion; lists of messages are taken as they are); without one, the prompt, a newline and
    the completion. Training and scoring both read it this way."""
    if not tokenizer.chat_template:
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise ValueError("chat messages need a tokenizer with a chat template")
        return prompt + "\n" + completion
    user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    assistant = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    return tokenizer.apply_chat_template(user + assistant, tokenize=False)


def encode(tokenizer, texts, max_tokens, device):
    """Texts -> the model's inputs (ids and attention mask, right-padded), at most max_tokens each:
    a decoder's cut keeps the end (where it reads the score), an encoder's the start (its [CLS])."""
    tokenizer.truncation_side = "right" if tokenizer.cls_token else "left"
    chat = bool(tokenizer.chat_template)  # the template writes its own special tokens
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt",
                      add_special_tokens=not chat)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def scores(model, tokenizer, prompts, completions, max_tokens, batch_size=64):
    """The RM's score [N] (float32, on the model's device) of each (prompt, completion), without
    gradients, batch_size at a time, under bf16 autocast on CUDA."""
    device, out = model.device, []
    texts = [rm_text(tokenizer, p, c) for p, c in zip(prompts, completions)]
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(texts), batch_size):
            out.append(model(**encode(tokenizer, texts[i:i + batch_size], max_tokens, device)).logits[:, 0])
    return torch.cat(out).float() if out else torch.zeros(0, device=device)


def fit_context(model, max_tokens):
    """max_tokens within the model's context (max_position_embeddings), where it has one."""
    return min(max_tokens, getattr(model.config, "max_position_embeddings", None) or max_tokens)


def check_reward_model(path):
    """What keeps `path` from serving as a reward model, in one line, or None: a folder that is no
    model or is damaged, a model that is not for sequence classification, more than one output."""
    from transformers import AutoConfig
    if path.startswith((".", "/")) and not os.path.isdir(path):  # a local path, not a hub name
        return "no such directory"
    problem = runs.damaged_weights(path) if os.path.isdir(path) else None
    if problem:
        return problem
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:  # no such folder, offline, unknown architecture
        return str(err).strip().splitlines()[0]
    kinds = config.architectures or ["no architecture"]
    if not any(kind.endswith("ForSequenceClassification") for kind in kinds):
        return (f"a {kinds[0]}, not a reward model (a sequence-classification model; "
                f"train one with `r1.py reward_model --model={path}`)")
    if config.num_labels != 1:
        return f"the model has {config.num_labels} outputs; a reward model has one (num_labels=1)"
    return None


def load(path, device, dtype="float32", new_head=False):
    """(model, tokenizer) of a sequence-classification model at `path`, in eval mode.
    new_head: `path` is a backbone (a causal LM, an encoder) given a fresh one-output head. A
    tokenizer without a pad token pads with EOS; the model is told which id pads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()
    problem = (runs.damaged_weights(path) if os.path.isdir(path) else None) if new_head else \
        check_reward_model(path)
    if problem:
        raise ConfigError(f"rm: {path}: {problem}")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a backbone's new head is said below, not as a warning
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), **({"num_labels": 1} if new_head else {}))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"rm: {path}: {str(err).strip().splitlines()[0]}") from None
    finally:
        logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"rm: {path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model.to(device).eval(), tokenizer


class RewardModel:
    """A reward of rewards.REWARDS that scores a step's completions in one batch: `rm:PATH`. The
    folder is checked when the spec is read (before any model loads); the weights load once, on the
    first call, on the run's device (bf16 on CUDA). Each call scores (question, completion)."""
    batched = True  # rewards.score calls it with every completion at once

    def __init__(self, path, max_tokens=1024, batch_size=64):
        problem = check_reward_model(path)
        if problem:
            raise ValueError(f"rm:{path}: {problem}")
        self.path, self.max_tokens, self.batch_size, self.model = path, max_tokens, batch_size, None

    def __call__(self, completions, examples, device):
        if self.model is None:
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
            self.model, self.tokenizer = load(self.path, device, dtype)
            self.max_tokens = fit_context(self.model, self.max_tokens)
        prompts = [example["question"] for example in examples]
        values = scores(self.model, self.tokenizer, prompts, completions, self.max_tokens, self.batch_size)
        return values.tolist()


# ----------------------------------------------------------------------------
# preference pairs and training


def preference_pairs(rows, path):
    """Pairs from the (line number, row) of a JSONL file `path` (data.read_jsonl's): {"prompt",
    "chosen", "rejected"[, "margin"]}, text or lists of chat messages {"role", "content"}; a bad row
    raises ConfigError naming the file and line."""
    pairs = []
    for lineno, row in rows:
        for key in ("prompt", "chosen", "rejected"):
            value = row.get(key)
            messages = isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value)
            text = isinstance(value, str) and (value.strip() or key != "prompt")  # an empty answer can lose
            if not text and not messages:
                raise ConfigError(f"{path}:{lineno}: `{key}` must be text or a list of chat messages")
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ConfigError(f"{path}:{lineno}: `margin` must be a finite number")
        pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                      "margin": float(margin), "source": f"{path}:{lineno}"})
    if not pairs:
        raise ConfigError(f"{path}: no rows")
    return pairs


def pair_scores(model, tokenizer, pairs, max_tokens):
    """(r_chosen [B], r_rejected [B]) of pairs, with gradients where they are enabled: one forward."""
    texts = [rm_text(tokenizer, p["prompt"], p[side]) for side in ("chosen", "rejected") for p in pairs]
    with torch.autocast(model.device.type, torch.bfloat16, enabled=model.device.type == "cuda"):
        r = model(**encode(tokenizer, texts, max_tokens, model.device)).logits[:, 0].float()
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs, max_tokens, batch_size=64):
    """Held-out pairwise accuracy and the mean Bradley-Terry loss of the RM on `pairs`."""
    model.eval()
    chosen, rejected = zip(*(pair_scores(model, tokenizer, pairs[i:i + batch_size], max_tokens)
                             for i in range(0, len(pairs), batch_size)))
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"pairwise_accuracy": pairwise_accuracy(chosen, rejected),
            "loss": bradley_terry_loss(chosen, rejected).item(),
            "margin_mean": (chosen - rejected).mean().item()}


def train(model, tokenizer, batches, cfg, lr_at, on_step):
    """An AdamW step of the Bradley-Terry loss on each batch of pairs (a list) of `batches`,
    gradient norm clipped at grad_clip; lr_at(step) the learning rate; on_step(step, row) gets each
    step's metrics."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.rm_lr, weight_decay=cfg.weight_decay)
    for step, batch in enumerate(batches):
        model.train()
        margin = torch.tensor([p["margin"] for p in batch], device=model.device)
        chosen, rejected = pair_scores(model, tokenizer, batch, cfg.rm_max_tokens)
        loss = bradley_terry_loss(chosen, rejected, margin, cfg.rm_center_coef)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip or float("inf")).item()
        if math.isfinite(norm) and math.isfinite(loss.item()):
            optimizer.step()
        on_step(step + 1, {"step": step + 1, "loss": loss.item(), "lr": lr_at(step), "grad_norm": norm,
                           "accuracy": pairwise_accuracy(chosen.detach(), rejected.detach()),
                           "score_mean": torch.cat([chosen, rejected]).mean().item()})
    model.eval()
    return model


def split_pairs(pairs, held_out, seed):
    """(train, test) from one file's pairs: a seeded `held_out` of them for testing, at most half."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n = min(held_out, len(pairs) // 2)
    return [pairs[i] for i in order[n:]], [pairs[i] for i in order[:n]]
