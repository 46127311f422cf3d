"""Config plumbing for grpo.py: defaults -> --config FILE -> --key=value, typed and checked.

A config file is data: lines of `key = literal` (numbers, strings, booleans, None, tuples),
read with `ast` and never executed. Every value is checked against the dataclass field's type;
an unknown key, a wrong type or a file that is not plain assignments raises ConfigError naming
the key (and file and line) before anything else happens. A field declared Literal[...] takes one
of its values, and --help lists them. This module knows nothing of GRPO: grpo.py's rules for
values (ranges, files, devices) are beside its Config.
"""
import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import math
import os
import stat
import sys
import typing


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key or file."""


Path = typing.NewType("Path", str)  # a str field naming a file or folder: ~ means the home directory


def choices(cls, key):
    """The allowed values of a field declared Literal[...], else None."""
    kind = typing.get_type_hints(cls)[key]
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


def coerce(cls, key, value, from_text):
    """`value` (a literal from a file, or text from the command line) as the type of cls.key."""
    allowed = choices(cls, key)
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        return value
    kind = typing.get_type_hints(cls)[key]
    optional = typing.get_origin(kind) is typing.Union
    kind = typing.get_args(kind)[0] if optional else kind
    path, kind = kind is Path, str if kind is Path else kind
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
    numbers = value if kind is tuple else (value,)
    if any(type(v) is float and not math.isfinite(v) for v in numbers):  # 1e999 reads as inf
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if any(type(v) is int and not -2**63 <= v < 2**63 for v in numbers):
        raise ConfigError(f"{key}: {value} does not fit in 64 bits")
    if any(type(v) is str and not encodable(v) for v in numbers):  # "\ud800", or bytes no UTF-8 reads
        raise ConfigError(f"{key}: {value!r} is not valid Unicode text")
    return os.path.expanduser(value) if path else value


def encodable(text):
    """Whether UTF-8 can encode `text` (no lone surrogate): what a tokenizer and a JSON file take."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_key(cls, key, where=""):
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        hint = difflib.get_close_matches(key, names, 1)
        raise ConfigError(f"{where}unknown config key '{key}'"
                          + (f" (did you mean '{hint[0]}'?)" if hint else ""))


MAX_FILE = 1 << 22  # bytes of a config or run file read whole: 4 MiB


def read_text(path):
    """The text of a regular UTF-8 file of at most MAX_FILE bytes; anything else (a device, a FIFO, a
    file too large, not UTF-8) raises ConfigError naming the file (and line)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # /dev/zero never ends, a FIFO never opens
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from None
    if len(raw) > MAX_FILE:
        raise ConfigError(f"{path}: larger than {MAX_FILE >> 20} MiB, too large for a config")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None


MAX_DEPTH = 100  # nesting of a value in a config file (a list of lists is 3)


def depth(node):
    """How deeply the syntax tree under `node` nests, counted without recursion."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return deepest


def read_config_file(cls, path):
    """{key: value} from a file of `key = literal` lines (a docstring and comments allowed)."""
    try:
        tree = ast.parse(read_text(path), path)
    except SyntaxError as err:
        raise ConfigError(f"{path}:{err.lineno}: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    values, lines = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is tree.body[0]:
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed")
        key, where = node.targets[0].id, f"{path}:{node.lineno}: "
        check_key(cls, key, where)
        if depth(node.value) > MAX_DEPTH:  # the same answer at any stack depth
            raise ConfigError(f"{path}: nested too deeply to be a config")
        if key in lines:
            raise ConfigError(f"{where}{key} is set twice (lines {lines[key]} and {node.lineno})")
        try:
            values[key], lines[key] = (coerce(cls, key, ast.literal_eval(node.value), from_text=False),
                                       node.lineno)
        except (ValueError, RecursionError) as err:  # a non-literal, or a ConfigError from coerce
            raise ConfigError(where + (str(err) if isinstance(err, ConfigError)
                                       else f"{key}: not a literal")) from None
    return values


def parse_args(cls, argv, saved_config=None, fixed=()):
    """An instance of the dataclass `cls` from [--config FILE] [--key=value ...]. With
    --resume=DIR, saved_config(DIR) -> (the run's saved {key: value}, the file it came from)
    replaces defaults and file; an override may not change a key of `fixed` (what a resumed
    checkpoint cannot honour)."""
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
        if key == "config" and not text:
            raise ConfigError("config: no file named (--config FILE)")
        if key == "config":
            values.update(read_config_file(cls, text))
        else:
            check_key(cls, key)
            overrides[key] = coerce(cls, key, text, from_text=True)
    if overrides.get("resume"):
        if values:
            raise ConfigError("config: a resumed run keeps its saved config; give changes as --key=value")
        saved, source = saved_config(overrides["resume"])
        values = {}
        for key, value in saved.items():
            check_key(cls, key, f"{source}: ")
            try:
                values[key] = coerce(cls, key, value, from_text=False)
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
        for key in fixed:
            if key in overrides and key in values and overrides[key] != values[key]:
                raise ConfigError(f"{key}: the run was trained with {key}={values[key]!r}; "
                                  "its checkpoint cannot "
                                  f"continue with {overrides[key]!r} (start a new run in another out_dir)")
    cfg = cls(**{**values, **overrides})
    cfg.given = set(overrides) | (set() if overrides.get("resume") else set(values))  # what unread() reads
    return cfg


def unread(cfg, ignored, keys, why):
    """Rules that refuse, where the config as resolved does not read `keys` (ignored is True), each
    one given (in a config file or on the command line) with a value other than its default: `why`
    says why it would be ignored. A resumed run's saved values count as given where the command line
    repeats them."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return [(not ignored or key not in getattr(cfg, "given", ()) or getattr(cfg, key) == defaults[key],
             f"{key}: {getattr(cfg, key)!r} would be ignored: {why}") for key in keys]


def fields_in_order(cfg):
    """(name, value) of every field of the dataclass instance `cfg`, its own class's first, then
    those of the classes it gathers, in their order (the order --help shows)."""
    names = [name for c in type(cfg).__mro__ if dataclasses.is_dataclass(c)
             for name in vars(c).get("__annotations__", {})]
    return [(name, getattr(cfg, name)) for name in dict.fromkeys(names)]


def help_text(cls):
    """Every field with its default and its comment, read from the dataclasses' sources: the
    class's own fields first, then those of the classes it gathers."""
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [--config FILE] [--key=value ...]", ""]
    sources = [inspect.getsource(c).splitlines()[1:] for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    fields = [line.strip() for source in sources
              for line in itertools.takewhile(lambda line: not line.strip().startswith(("def ", "@")),
                                              source)]
    for line in fields:  # each class's fields end where its methods begin
        if line.startswith("#"):
            lines.append(line)
        elif ":" in line and "=" in line:
            name, rest = line.split(":", 1)
            default, _, comment = rest.split("=", 1)[1].partition("#")
            allowed = choices(cls, name)
            comment = (f"{{{' | '.join(allowed)}}} " if allowed else "") + comment.strip()
            lines.append(f"  {'--' + name + '=' + default.strip():<36} {comment}")
    return "\n".join(lines)
