"""Config plumbing for grpo.py: defaults -> --config FILE -> --key=value, typed and checked.

A config file is data: lines of `key = literal` (numbers, strings, booleans, None, tuples),
read with `ast` and never executed. Every value is checked against the dataclass field's type;
an unknown key, a wrong type or a file that is not plain assignments raises ConfigError naming
the key (and file and line) before anything else happens.
"""
import ast
import dataclasses
import difflib
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
import typing


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key or file."""


def coerce(cls, key, value, from_text):
    """`value` (a literal from a file, or text from the command line) as the type of cls.key."""
    kind = typing.get_type_hints(cls)[key]
    optional = typing.get_origin(kind) is typing.Union
    kind = typing.get_args(kind)[0] if optional else kind
    if from_text and kind is bool and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if from_text and kind is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key}: cannot read {value!r} as {kind.__name__}") from None
    if value is None and optional:
        return None
    if kind is float and type(value) is int:
        value = float(value)
    if kind is tuple and type(value) is list:
        value = tuple(value)
    if type(value) is not kind:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def check_key(cls, key, where=""):
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        hint = difflib.get_close_matches(key, names, 1)
        raise ConfigError(f"{where}unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))


def read_config_file(cls, path):
    """{key: value} from a file of `key = literal` lines (a docstring and comments allowed)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: {err.msg}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is tree.body[0]:
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed")
        key, where = node.targets[0].id, f"{path}:{node.lineno}: "
        check_key(cls, key, where)
        try:
            values[key] = coerce(cls, key, ast.literal_eval(node.value), from_text=False)
        except ValueError as err:  # a non-literal, or a ConfigError from coerce
            raise ConfigError(where + (str(err) if isinstance(err, ConfigError) else f"{key}: not a literal")) from None
    return values


def parse_args(cls, argv, saved_config_name):
    """An instance of the dataclass `cls` from [--config FILE] [--key=value ...]. With
    --resume=DIR the run's saved config (DIR/saved_config_name) replaces defaults and file."""
    if argv and argv[0] == "--config":
        argv = ["--config=" + (argv[1] if len(argv) > 1 else "")] + list(argv[2:])
    values, overrides = {}, {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(cls))
            raise SystemExit(0)
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        if key == "config":
            values.update(read_config_file(cls, text))
        else:
            check_key(cls, key)
            overrides[key] = coerce(cls, key, text, from_text=True)
    if overrides.get("resume"):
        path = os.path.join(overrides["resume"], saved_config_name)
        if not os.path.isfile(path):
            raise ConfigError(f"resume: {path} not found")
        with open(path) as f:
            values = {k: coerce(cls, k, v, from_text=False) for k, v in json.load(f).items()}
    return cls(**{**values, **overrides})


def help_text(cls):
    """Every field with its default and its comment, read from the dataclass's source."""
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--config FILE] [--key=value ...]", ""]
    sources = [inspect.getsource(c).splitlines()[1:] for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c)]
    fields = [line.strip() for source in sources
              for line in itertools.takewhile(lambda line: not line.strip().startswith(("def ", "@")), source)]
    for line in fields:  # each class's fields end where its methods begin
        if line.startswith("#"):
            lines.append(line)
        elif ":" in line and "=" in line:
            name, rest = line.split(":", 1)
            default, _, comment = rest.split("=", 1)[1].partition("#")
            lines.append(f"  {'--' + name + '=' + default.strip():<36} {comment.strip()}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# grpo.Config's rules

CHOICES = {"scale_rewards": ("group", "batch", "none"),
           "loss_type": ("grpo", "dapo", "dr_grpo"), "prompt_overflow": ("truncate", "reject"),
           "dtype": ("float32", "bfloat16"), "sharding": ("ddp", "fsdp"), "attn_implementation": ("sdpa", "eager", "flash_attention_2")}
AT_LEAST_ONE = ("max_steps", "prompts_per_step", "max_new_tokens", "micro_batch_size", "num_iterations",
                "eval_batch_size", "save_every", "keep_checkpoints", "sft_batch_size", "max_bad_steps", "digits")
NON_NEGATIVE = ("clip_eps_low", "clip_eps_high", "beta", "adv_eps", "lr", "sft_lr", "weight_decay", "grad_clip",
                "warmup_steps", "sft_steps", "sft_examples", "eval_size", "eval_every", "log_samples_every",
                "ref_sync_every", "overlong_buffer", "max_prompt_tokens", "eval_k")


def cuda_devices():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def validate(cfg):
    """Reject impossible values of grpo.Config before anything is loaded, naming the key."""
    import data
    import rewards as R
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    choices = dict(CHOICES, task=data.TASKS, template=data.TEMPLATES)
    problems = [f"{k}: {getattr(cfg, k)!r} is not one of {', '.join(v)}" for k, v in choices.items() if getattr(cfg, k) not in v]
    problems += [f"{k}: must be at least 1" for k in AT_LEAST_ONE if getattr(cfg, k) < 1]
    problems += [f"{k}: must not be negative" for k in NON_NEGATIVE if getattr(cfg, k) < 0]
    checks = [
        (cfg.group_size >= 2, "group_size: must be at least 2 (advantages compare completions within a group)"),
        (cfg.clip_eps_low < 1, "clip_eps_low: must be below 1 (the ratio is clipped at 1 - clip_eps_low)"),
        (cfg.temperature > 0, "temperature: must be positive"),
        (cfg.digits <= 3, "digits: at most 3 (every pair of operands is enumerated)"),
        (0 < cfg.top_p <= 1, "top_p: must be in (0, 1]"),
        (0 < cfg.ref_sync_alpha <= 1, "ref_sync_alpha: must be in (0, 1]"),
        (0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio: must be in [0, 1]"),
        (len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas), "adam_betas: two numbers in [0, 1)"),
        (cfg.language in R.SCRIPTS, f"language: {cfg.language!r} is not one of {', '.join(R.SCRIPTS)}"),
        (cfg.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", cfg.device), f"device: {cfg.device!r} is not auto, cpu or cuda[:N]"),
        (not cfg.device.startswith("cuda") or cuda_devices() > int(cfg.device.partition(":")[2] or 0),
         f"device: {cfg.device!r}, but " + (f"this machine has {cuda_devices()} CUDA device(s)" if cuda_devices() else
                                           "torch sees no CUDA device here (a CPU build, or no GPU); use --device=cpu")),
        (cfg.dtype != "bfloat16" or cfg.bf16 is not False, "bf16: dtype=bfloat16 computes in bf16; bf16=False contradicts it"),
        (cfg.task in ("arithmetic", "countdown") or cfg.data_path, f"data_path: task {cfg.task} needs a JSONL file"),
        (not cfg.data_path or os.path.isfile(cfg.data_path) or data.is_hub_dataset(cfg.data_path),
         f"data_path: {cfg.data_path}: no such file" + ("" if importlib.util.find_spec("datasets") else
                                                          " (hub datasets need the `datasets` package)")),
        (not cfg.eval_data_path or os.path.isfile(cfg.eval_data_path) or data.is_hub_dataset(cfg.eval_data_path),
         f"eval_data_path: {cfg.eval_data_path}: no such file" + ("" if importlib.util.find_spec("datasets") else
                                                                " (hub datasets need the `datasets` package)")),
        (not cfg.model.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(cfg.model)),
         f"model: {cfg.model}: no such directory"),
        (not cfg.wandb or importlib.util.find_spec("wandb"), "wandb: the wandb package is not installed"),
        (cfg.attn_implementation != "flash_attention_2" or importlib.util.find_spec("flash_attn"),
         "attn_implementation: flash_attention_2 needs the flash-attn package"),
        (cfg.prompts_per_step % ranks == 0, f"prompts_per_step: {cfg.prompts_per_step} does not divide among "
                                            f"{ranks} ranks (each rank samples whole groups)"),
        (cfg.sft_steps == 0 or cfg.sft_batch_size % ranks == 0,
         f"sft_batch_size: {cfg.sft_batch_size} does not divide among {ranks} ranks"),
    ]
    problems += [message for ok, message in checks if not ok]
    try:
        R.parse_reward_spec(cfg.rewards)
    except ValueError as err:
        problems.append(f"rewards: {err}")
    if problems:
        raise ConfigError(problems[0])
