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
(the built-in calculator inline; each tool of yours in a worker process, usercode.Workers, up to
tool_workers at once), and their results are appended as tokens. A row ends at EOS, at
max_new_tokens, or in a round that writes no call. The uniforms that pick a completion's tokens are
indexed by position in the whole transcript, so the built-in samplers give the same transcript for
the same uniforms, and a group's G completions have the same prompt and the same tools.

What the trainer sees: the sampler's own output with `mask` [B, T], 1 on the policy's own tokens
(engine.Engine.sample ends it at the first stop), and the figures of the transcripts in `info`
(calls, errors, each one's runs): grpo.train never mentions tools. The loss, KL, entropy, clip and
mismatch statistics, and the loss denominators count only the policy's tokens; results are context
in every forward pass. Rewards read the whole transcript. A tool that raises, returns no string
(or text that is not valid Unicode), runs past tool_timeout or returns more than max_tool_chars
characters gives `<result>error: ...</result>`, counted in `tool_errors`; the run goes on. A tool of yours
cannot reach the trainer: a call past tool_timeout is killed with its process (a busy loop, a
catastrophic regex), and a tool that ends its process or changes directory ends or moves only its
worker, which is started anew. Each worker imports your file itself (within tool_timeout), so module
state is per worker; Python's `random` is seeded before each call from the run seed and the call's
text, so a call's result does not depend on which worker ran it. A call costs a round trip to a
worker, 0.1-0.2 ms (bench/tool_calls.py).
"""
import dataclasses
import os
import re

import torch

import distributed
import usercode
from configurator import ConfigError, unread
from rewards import evaluate_arithmetic


@dataclasses.dataclass
class ToolOptions:
    # tools inside a completion (tools.py)
    tools: str = ""                # "calculator,FILE.py:FUNCTION": (text) -> str each; "" = none
    tool_tags: tuple = ("<tool>", "</tool>", "<result>", "</result>")  # a call's open, close; its result's
    max_tool_calls: int = 4        # calls run per completion; later ones stay plain text
    tool_timeout: float = 5.0      # seconds a call (and the import) of a tool of yours may take
    max_tool_chars: int = 1000     # a longer result is an error
    tool_workers: int = 8          # processes running tools of yours at once (each imports your file)

    def checks(self):
        tags, format_tags = self.tool_tags, ("<think>", "</think>", "<answer>", "</answer>")
        written = all(isinstance(t, str) and len(t) > 2 and t[0] == "<" and t[-1] == ">" for t in tags)
        rules = [(len(tags) == 4 and len(set(tags)) == 4 and written,
                  "tool_tags: four different tags written <...>: a call's open and close, its result's"),
                 (not set(tags) & set(format_tags),
                  f"tool_tags: {', '.join(t for t in tags if t in format_tags)} is a tag of the answer's "
                  "format (<think>, <answer>): a tool would write what the rewards grade"),
                 (not any(t in self.prefill for t in tags if isinstance(t, str)),
                  "prefill: holds a tool tag; a call is the policy's to write, not the prompt's"),
                 (self.max_tool_calls >= 0, "max_tool_calls: must not be negative"),
                 (0 < self.tool_timeout <= MAX_TIMEOUT,
                  f"tool_timeout: must be positive and at most {MAX_TIMEOUT:g} seconds"),
                 (self.max_tool_chars >= 1, "max_tool_chars: must be at least 1"),
                 (self.tool_workers >= 1, "tool_workers: must be at least 1"),
                 *unread(self, not self.tools.strip(), ("max_tool_calls", "max_tool_chars"),
                         "no tool is given"),
                 *unread(self, ":" not in self.tools, ("tool_timeout", "tool_workers"),
                         "no tool of yours is given (FILE.py:FUNCTION)")]
        if all(ok for ok, _ in rules):  # then import the tools of yours, each in a worker, as a run will
            try:
                check_tools(parse_tools(self.tools), self.tool_timeout)
            except ValueError as err:
                rules.append((False, f"tools: {err}"))
        return rules


MAX_TIMEOUT = 3600.0  # seconds: an hour per call


def calculator(text):
    """The value of an arithmetic expression of integers, + - * / and parentheses, as text: "1786",
    or "3.5" (10 significant digits) where it is not whole. Parsed by rewards.evaluate_arithmetic,
    the countdown reward's evaluator, which never executes it; anything else raises ValueError."""
    value = evaluate_arithmetic(text)
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


TOOLS = {"calculator": calculator}  # name -> function: built in, bounded and pure, so run inline


def parse_tools(spec):
    """'calculator,my_tools.py:lookup' -> [("calculator", calculator), ("lookup", ("/abs/my_tools.py",
    "lookup"))]: the names a call may give, and a built-in function or a tool of yours, SOURCE:FUNCTION
    (a .py file, its path made absolute, or an importable module), a function (text) -> str that
    runs in a worker process. Raises ValueError naming the bad part."""
    parts = [part.strip() for part in spec.split(",")]
    if spec.strip() and not any(parts):
        raise ValueError(f"{spec!r} names no tool (tools=\"\" for none)")
    tools = []
    for part in filter(None, parts):
        source, _, function = part.rpartition(":")
        if part not in TOOLS and not source:
            raise ValueError(f"unknown tool {part!r} (built in: {', '.join(sorted(TOOLS))}; "
                             "or FILE.py:FUNCTION)")
        if source.endswith(".py"):
            source = os.path.abspath(os.path.expanduser(source))
        tools.append((function, TOOLS[part]) if part in TOOLS else (function, (source, function)))
    names = [name for name, _ in tools]
    if len(set(names)) < len(names):
        raise ValueError(f"two tools are named {next(n for n in names if names.count(n) > 1)!r}")
    return tools


def check_tools(tools, timeout):
    """Import each source of the tools of yours among `tools` (parse_tools') in a worker process, as
    a run will, within `timeout` seconds; ValueError saying why one cannot load."""
    mine = [tool for _, tool in tools if not callable(tool)]
    for source in dict.fromkeys(source for source, _ in mine):
        usercode.Worker([tool for tool in mine if tool[0] == source], 0, 1).loaded(timeout).stop()


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


def run_calls(calls, options, workers=None):
    """Each (tool, input) of `calls` run -> [(output text, failed)]. A built-in tool (a function) runs
    inline; a tool of yours (an index into workers' functions) on `workers` (usercode.Workers), in
    processes at once, each call killed with its process past tool_timeout. A call that raises
    anything, returns no string of at most max_tool_chars characters, overruns or ends its process
    has failed: its output says why."""
    answers = [None] * len(calls)
    for i, (tool, text) in enumerate(calls):
        if callable(tool):
            try:
                answers[i] = usercode.plain_text(tool(text), options.max_tool_chars)
            except Exception as err:
                answers[i] = None, usercode.failure(err)
    mine = [i for i, (tool, _) in enumerate(calls) if not callable(tool)]
    for i, answer in zip(mine, workers.map([calls[i] for i in mine]) if mine else []):
        answers[i] = answer  # checked in the worker (usercode.plain_text)
    return [(output, False) if why is None else ("error: " + why, True) for output, why in answers]


class Toolbox:
    """The tools of `options` (ToolOptions; None: its defaults, no tools) and the rounds of sampling that call
    them (see the module's docstring), for the tokenizer the policy writes with. Without tools a
    sampler runs once, and the calls its completions write are counted all the same."""

    def __init__(self, tokenizer, eos_ids, options=None):
        self.options, self.tokenizer = options or ToolOptions(), tokenizer
        tools = parse_tools(self.options.tools)
        options = self.options
        mine = [tool for _, tool in tools if not callable(tool)]  # (source, function): in workers, by index
        self.tools = [(name, tool if callable(tool) else mine.index(tool)) for name, tool in tools]
        self.workers = usercode.Workers(mine, options.tool_timeout, options.max_tool_chars,
                                        options.tool_workers, getattr(options, "seed", 0)) if mine else None
        self.banned = set(eos_ids.tolist()) | {tokenizer.pad_token_id}  # a result never ends the completion
        open_tag, close_tag = map(re.escape, options.tool_tags[:2])
        self.call = re.compile(open_tag + "(.*?)" + close_tag, re.DOTALL)

    def route(self, text):
        """(function, input) of a call's text: the tool it names before a colon, else the first."""
        name, colon, rest = text.partition(":")
        named = dict(self.tools).get(name.strip()) if colon else None
        return (named, rest.strip()) if named is not None else (self.tools[0][1], text.strip())

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
        for greedy) -> {tokens, logp, entropy, mask, info}: [B, T] each (logp and entropy 0 on
        results; mask 1 on the policy's own tokens, 0 on results) and info, the figures of the
        transcripts for the logs: tool_calls [B] (the calls each writes, run or not), tool_errors
        [B] (those that failed) and with tools each one's runs, segments: [["policy", text],
        ["tool", result text], ...]."""
        if not self.tools:
            out = sample_once(prompt_ids, prompt_mask, how)
            texts = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
            calls = count_calls(texts, self.options.tool_tags).to(out.tokens.device)
            return {**out._asdict(), "mask": torch.ones_like(out.logp),
                    "info": {"tool_calls": calls, "tool_errors": torch.zeros_like(calls)}}
        B, T, device, uniforms = len(prompt_ids), how.max_new_tokens, prompt_ids.device, how.uniforms
        prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids, prompt_mask)]
        rows = [{"tokens": [], "logp": [], "entropy": [], "policy": [], "segments": []} for _ in range(B)]
        errors, going, stops = [0] * B, list(range(B)), set(how.eos_ids.tolist())
        for made in range(self.options.max_tool_calls + 1):  # every row going has made `made` calls
            going = [i for i in going if len(rows[i]["tokens"]) < T]
            # under torchrun every rank samples each round, for as many tokens: the samplers' stop
            # checks are collectives; a rank with no row going samples a stand-in, then drops it
            room = max((T - len(rows[i]["tokens"]) for i in going), default=0)
            room = distributed.sampling_check(torch.tensor(room, device=device))
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
            for i, (output, failed) in zip(still, run_calls(calls, self.options, self.workers)):
                result = self.result_ids(output)[:T - len(rows[i]["tokens"])]
                self.append(rows[i], result, [0.0] * len(result), [0.0] * len(result), policy=0.0)
                errors[i] += failed
            going = still
        width = max(len(row["tokens"]) for row in rows)
        fills = {"tokens": how.pad_id, "logp": 0.0, "entropy": 0.0, "policy": 0.0}
        out = {key: torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows], device=device)
               for key, fill in fills.items()}
        texts = self.tokenizer.batch_decode(out["tokens"], skip_special_tokens=True)
        info = {"tool_calls": count_calls(texts, self.options.tool_tags).to(device),
                "tool_errors": torch.tensor(errors, device=device),
                "segments": [row["segments"] for row in rows]}
        out["mask"] = out.pop("policy")
        return {**out, "info": info}

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
    """The Toolbox of options.tools (without tools, `tools=""`, one that counts the calls written). A
    tag that is a special token of the tokenizer is refused, tools or not: decoding drops it, so no
    call could be read or counted."""
    specials = [tag for tag in getattr(options, "tool_tags", ()) if tag in tokenizer.all_special_tokens]
    if specials:
        raise ConfigError(f"tool_tags: {specials[0]} is a special token of this tokenizer, which decoding "
                          "drops: no call could be read")
    try:
        return Toolbox(tokenizer, eos_ids, options)
    except ValueError as err:
        raise ConfigError(f"tools: {err}") from None
