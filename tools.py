"""
tools.py: tools the policy calls in the middle of a completion, under every sampler the engine has.

The protocol: the policy opens a call with a tag, writes the tool's input and closes the tag,
`<tool>47*38</tool>`. Sampling of that row pauses, the tool runs on the input, and its output is
appended inside result tags, `<result>1786</result>`: tokens the world wrote, not the policy.
Sampling then goes on, up to max_tool_calls calls per completion; calls past that stay plain text.
The tags are plain text inside the completion: with the think/answer format a call sits inside
<think> (the format reward reads past it), and under a chat template the whole transcript is one
assistant turn. max_new_tokens caps the whole transcript, results included; a result cut at the cap
ends the completion there (truncated, no EOS). A call goes to the tool it names before a colon
(`<tool>lookup: Paris</tool>`), else to the first tool listed.

How: rounds of sampling. Each round samples every row still going, its prompt followed by its
transcript so far as the new prompt; a row is cut after the first whole call it wrote, the calls run
(each tool of your own in a thread, waited on for tool_timeout seconds), and their results are
appended as tokens. A row ends at EOS, at max_new_tokens, or in a round that writes no call. The
uniforms that pick a completion's tokens are indexed by position in the whole transcript, so the
built-in samplers give the same transcript for the same uniforms, and a group's G completions have
the same prompt and the same tools.

What the trainer sees: `policy` [B, T], 1 on the policy's own tokens. The loss, KL, entropy, clip
and mismatch statistics, and the loss denominators count only those; results are context in every
forward pass. Rewards read the whole transcript. A tool that raises, returns no string, runs past
tool_timeout or returns more than max_tool_chars characters gives `<result>error: ...</result>`,
counted in `tool_errors`; the run goes on. A tool stuck inside C code that holds Python's lock
(a catastrophic regex, say) cannot be waited out; one stuck in Python or I/O is left running.
"""
import dataclasses
import re
import threading
import time

import torch

import runs
from configurator import ConfigError
from rewards import evaluate_arithmetic, load_reward


@dataclasses.dataclass
class ToolOptions:
    # tools inside a completion (tools.py)
    tools: str = ""                # "calculator,FILE.py:FUNCTION": (text) -> str each; "" = none
    tool_tags: tuple = ("<tool>", "</tool>", "<result>", "</result>")  # a call's open, close; its result's
    max_tool_calls: int = 4        # calls run per completion; later ones stay plain text
    tool_timeout: float = 5.0      # seconds a tool of your own may take; past it the call is an error
    max_tool_chars: int = 1000     # a longer result is an error

    def checks(self):
        try:
            problem = parse_tools(self.tools) and ""
        except ValueError as err:
            problem = f"tools: {err}"
        tags = self.tool_tags
        written = all(isinstance(t, str) and len(t) > 2 and t[0] == "<" and t[-1] == ">" for t in tags)
        return [(not problem, problem),
                (len(tags) == 4 and len(set(tags)) == 4 and written,
                 "tool_tags: four different tags written <...>: a call's open and close, its result's"),
                (self.max_tool_calls >= 0, "max_tool_calls: must not be negative"),
                (self.tool_timeout > 0, "tool_timeout: must be positive"),
                (self.max_tool_chars >= 1, "max_tool_chars: must be at least 1")]


def calculator(text):
    """The value of an arithmetic expression of integers, + - * / and parentheses, as text: "1786",
    or "3.5" (10 significant digits) where it is not whole. Parsed by rewards.evaluate_arithmetic,
    the countdown reward's evaluator, which never executes it; anything else raises ValueError."""
    value = evaluate_arithmetic(text)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


TOOLS = {"calculator": calculator}  # name -> function; a tool of your own joins as "FILE.py:FUNCTION"
BUILTIN = frozenset(TOOLS.values())  # bounded and pure: run inline, without a thread
BUILTIN_NAMES = tuple(TOOLS)


def parse_tools(spec):
    """'calculator,my_tools.py:lookup' -> [("calculator", calculator), ("lookup", lookup)]: the
    names a call may give and the functions. A tool of your own is SOURCE:FUNCTION (a .py file or
    an importable module), a function (text) -> str. Raises ValueError naming the bad part."""
    tools = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part not in TOOLS:
            source, _, function = part.rpartition(":")
            if not source:
                raise ValueError(f"unknown tool {part!r} (built in: {', '.join(sorted(BUILTIN_NAMES))}; "
                                 "or FILE.py:FUNCTION)")
            TOOLS[part] = load_reward(source, function, takes=("text",))
        tools.append((part.rpartition(":")[2], TOOLS[part]))
    names = [name for name, _ in tools]
    if len(set(names)) < len(names):
        raise ValueError(f"two tools are named {next(n for n in names if names.count(n) > 1)!r}")
    return tools


def calls_in(text, tags):
    """The calls written in a completion's text: whole open...close pairs of the call tags (tags
    inside a tool's result are defused, so these are the policy's)."""
    return len(re.findall(re.escape(tags[0]) + ".*?" + re.escape(tags[1]), text, re.DOTALL))


def count_calls(texts, tags):
    """calls_in of each text -> [B]: the calls it writes, run or not (without tools, or past
    max_tool_calls)."""
    return torch.tensor([calls_in(text, tags) for text in texts])


def defused(output, tags):
    """A tool's output with each of the protocol's tags in it written &lt;...>, so that a result
    cannot open or close a call or end itself."""
    for tag in tags:
        output = output.replace(tag, "&lt;" + tag[1:])
    return output


def checked(output, limit):
    """(output, None) for a string of at most `limit` characters, else (None, why it is not)."""
    if not isinstance(output, str):
        return None, f"the tool returned {type(output).__name__}, not a string"
    if len(output) > limit:
        return None, f"the tool returned {len(output)} characters, over max_tool_chars={limit}"
    return output, None


def run_calls(calls, options):
    """Each (function, input) of `calls` run -> [(output text, failed)]. Tools of your own run in
    daemon threads at once, all waited on until tool_timeout seconds after the start; the built-in
    ones inline. An exception of any kind (SystemExit too) is a failed call."""
    answers = [None] * len(calls)

    def work(i, fn, text):
        try:
            answers[i] = checked(fn(text), options.max_tool_chars)
        except BaseException as err:  # the tool's failure is its result, never the run's end
            answers[i] = None, f"{type(err).__name__}: {str(err).strip()[:200]}".rstrip(": ")
    threads = []
    for i, (fn, text) in enumerate(calls):
        if fn in BUILTIN:
            work(i, fn, text)
        else:
            threads.append(threading.Thread(target=work, args=(i, fn, text), daemon=True))
            threads[-1].start()
    deadline = time.monotonic() + options.tool_timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = f"no result within tool_timeout={options.tool_timeout:g} s"
    return [(output, False) if output is not None else ("error: " + why, True)
            for output, why in (answer or (None, late) for answer in answers)]


class Toolbox:
    """The tools of `options` (ToolOptions) and the rounds of sampling that call them (see the
    module's docstring), for the tokenizer the policy writes with."""

    def __init__(self, options, tokenizer, eos_ids):
        self.options, self.tokenizer, self.tools = options, tokenizer, parse_tools(options.tools)
        self.banned = set(eos_ids.tolist()) | {tokenizer.pad_token_id}  # a result never ends the completion
        open_tag, close_tag = map(re.escape, options.tool_tags[:2])
        self.call = re.compile(open_tag + "(.*?)" + close_tag, re.DOTALL)

    def route(self, text):
        """(function, input) of a call's text: the tool it names before a colon, else the first."""
        name, colon, rest = text.partition(":")
        named = dict(self.tools).get(name.strip()) if colon else None
        return (named, rest.strip()) if named else (self.tools[0][1], text.strip())

    def first_call(self, ids):
        """(length of the shortest prefix of `ids` whose text holds a whole call, the call's input),
        or None when the text holds none."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not self.call.search(text):
            return None
        low, high = 1, len(ids)
        while low < high:  # the text of a longer prefix holds every call a shorter one does
            middle = (low + high) // 2
            low, high = (low, middle) if self.call.search(self.tokenizer.decode(
                ids[:middle], skip_special_tokens=True)) else (middle + 1, high)
        return low, self.call.search(self.tokenizer.decode(ids[:low], skip_special_tokens=True)).group(1)

    def result_ids(self, output):
        """The token ids of a result: its tags around the defused output, special tokens spelled
        out as text and any stop or pad id left out, so that it cannot end the completion."""
        tags = self.options.tool_tags
        text = tags[2] + defused(output, tags) + tags[3]
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [i for i in ids if i not in self.banned]

    @torch.no_grad()
    def sample(self, sample_once, prompt_ids, prompt_mask, how):
        """Transcripts for left-padded prompts [B, P], sampled by rounds of sample_once(ids, mask,
        how) (the engine's sampler) with `how` (engine.Sampling, its uniforms [B, T] drawn: zeros
        for greedy) -> {tokens, logp, entropy, policy, tool_errors, segments}: [B, T] each (logp
        and entropy 0 on results), tool_errors [B], and each transcript's runs, [["policy", text],
        ["tool", result text], ...]."""
        B, T, device, uniforms = len(prompt_ids), how.max_new_tokens, prompt_ids.device, how.uniforms
        prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_mask)]
        rows = [{"tokens": [], "logp": [], "entropy": [], "policy": [], "segments": []} for _ in range(B)]
        errors, going, stops = [0] * B, list(range(B)), set(how.eos_ids.tolist())
        for made in range(self.options.max_tool_calls + 1):  # every row going has made `made` calls
            going = [i for i in going if len(rows[i]["tokens"]) < T]
            # under torchrun every rank samples each round, for as many tokens: the samplers' stop
            # checks are collectives; a rank with no row going samples a stand-in, then drops it
            room = max((T - len(rows[i]["tokens"]) for i in going), default=0)
            room = int(runs.gather(torch.tensor([room], device=device)).max())
            if room == 0:
                break
            order, so_far = going or [0], [rows[i]["tokens"] for i in going] or [[]]  # [0]: the stand-in
            ids, mask = left_padded([prompts[i] + done for i, done in zip(order, so_far)], how.pad_id, device)
            picks = torch.stack([padded(uniforms[i, len(done):], room) for i, done in zip(order, so_far)])
            out = sample_once(ids, mask, how._replace(max_new_tokens=room, uniforms=picks))
            calls, still = [], []
            for j, i in enumerate(going):
                new = out.tokens[j, :T - len(rows[i]["tokens"])].tolist()
                stop = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
                call = self.first_call(new[:stop]) if made < self.options.max_tool_calls else None
                keep = call[0] if call else stop
                self.append(rows[i], new[:keep], out.logp[j, :keep].tolist(), out.entropy[j, :keep].tolist())
                if call:
                    calls.append(self.route(call[1]))
                    still.append(i)
            for i, (output, failed) in zip(still, run_calls(calls, self.options)):
                result = self.result_ids(output)[:T - len(rows[i]["tokens"])]
                self.append(rows[i], result, [0.0] * len(result), [0.0] * len(result), policy=0.0)
                errors[i] += failed
            going = still
        width = max(len(row["tokens"]) for row in rows)
        fills = {"tokens": how.pad_id, "logp": 0.0, "entropy": 0.0, "policy": 0.0}
        out = {key: torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows], device=device)
               for key, fill in fills.items()}
        return {**out, "tool_errors": torch.tensor(errors, device=device),
                "segments": [row["segments"] for row in rows]}

    def append(self, row, tokens, logp, entropy, policy=1.0):
        """Tokens onto a transcript, the policy's (policy=1) or a tool's, and their text as a segment."""
        row["tokens"] += tokens
        row["logp"] += logp
        row["entropy"] += entropy
        row["policy"] += [policy] * len(tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text:
            row["segments"].append(["policy" if policy else "tool", text])


def left_padded(rows, pad_id, device):
    """Token lists -> left-padded ids [B, L] and attention mask [B, L]."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def padded(values, width):
    """values [n] cut or zero-padded to [width]."""
    return torch.nn.functional.pad(values[:width], (0, max(0, width - len(values))))


def written_mask(tokenizer, texts, tags, shape):
    """[B, T] 1 on the tokens of worked solutions the model is taught to write, 0 inside each
    result that follows a call (`</tool><result>...</result>`): in a demonstration too, a result
    is the world's text, not the policy's. texts tokenized as data.encode_completions does."""
    mask = torch.ones(shape)
    result = re.compile(re.escape(tags[1]) + "(" + re.escape(tags[2]) + ".*?" + re.escape(tags[3]) + ")",
                        re.DOTALL)
    for i, text in enumerate(texts):
        spans = [m.span(1) for m in result.finditer(text)]
        if spans:
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            for j, (start, _) in enumerate(offsets):
                mask[i, j] = 0.0 if any(a <= start < b for a, b in spans) else 1.0
    return mask


def open_toolbox(options, tokenizer, eos_ids):
    """The Toolbox of options.tools, or None without tools (`tools=""`)."""
    try:
        return Toolbox(options, tokenizer, eos_ids) if getattr(options, "tools", "") else None
    except ValueError as err:
        raise ConfigError(f"tools: {err}") from None
