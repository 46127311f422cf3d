"""
usercode.py: functions of yours that the trainer calls by name, SOURCE:FUNCTION (rewards, tools).

Loading: `load_function` imports a .py file, or a module outside Python's standard library, and
checks that the function can take the arguments it will be given. A callable of the standard library
or a builtin is refused, however it is named: model text must never reach exec, eval or a shell, and
`builtins:exec` or `os:system` would take it there.

Running: `Workers` runs functions in processes of their own (tools of yours), each importing your
file itself, so that a function can neither slow the trainer (a call past its timeout is killed with
its process), nor stop it (os._exit, a crash), nor move it (os.chdir, sys.path, signal handlers).
A worker that dies or overruns is started anew for the next call. Messages are JSON, never pickles,
so nothing a function returns runs code in the trainer. This module imports only the standard
library (and configurator.py, which does too): a worker starts in a tenth of a second, not in the
seconds torch takes.
"""
import contextlib
import functools
import importlib
import importlib.util
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
import weakref
from multiprocessing.connection import Connection, wait

from configurator import encodable

STDLIB = frozenset(sys.stdlib_module_names) | {"builtins"}
STDLIB_DIRS = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")}


def load_function(source, function, takes):
    """The function `function` of SOURCE, a .py file (a path) or an importable module, that can take
    the arguments `takes` names. A file that fails or exits at import, a missing function, one of
    Python's own, or one that cannot take `takes`: ValueError saying so."""
    file = source.endswith(".py")
    if file and os.path.isfile(source) and python_own(os.path.realpath(source)):
        raise ValueError(f"{source} is a file of Python's standard library, not a file of yours")
    if not file and source.split(".")[0] in STDLIB:
        raise ValueError(f"{source}:{function} is Python's own, not a function of yours; "
                         "name one in your own file, FILE.py:FUNCTION")
    try:
        if file:
            spec = importlib.util.spec_from_file_location(f"usercode_{abs(hash(source))}", source)
            if spec is None or not os.path.isfile(source):
                raise FileNotFoundError("no such file")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # a missing file or module, one that fails to import, or calls sys.exit
        why = f"it exits at import (SystemExit: {err.code})" if isinstance(err, SystemExit) else (
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise ValueError(f"cannot load {source}: {why}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"{source} has no function {function!r}")
    if defining_module(fn).split(".")[0] in STDLIB:  # `from os import system` in a file of yours
        raise ValueError(f"{source}:{function} is Python's own "
                         f"({defining_module(fn)}.{getattr(fn, '__qualname__', function)}), "
                         "not a function of yours")
    try:
        inspect.signature(fn).bind(*takes)
    except TypeError:
        raise ValueError(f"{source}:{function} must take ({', '.join(takes)}); "
                         f"it takes {inspect.signature(fn)}") from None
    except ValueError:  # no signature to read (a callable of C code not of the standard library)
        pass
    return fn


def defining_module(fn):
    """The module whose code `fn` runs: through partials and bound methods, else its class's."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__module__", None) or type(fn).__module__ or ""


def python_own(path):
    return any(path.startswith(folder + os.sep) and "site-packages" not in path for folder in STDLIB_DIRS)


# ----------------------------------------------------------------------------
# worker processes


class Worker:
    """One process that imports `functions` ([(source, function)], each taking one text) and runs one
    call at a time, Python's `random` seeded from (seed, the call's text) before each, so that a
    call's result depends on neither the worker nor the order; its results are plain strings of at
    most max_chars characters. Started here; `loaded` waits for its import."""

    def __init__(self, functions, seed, max_chars):
        self.sources = ", ".join(dict.fromkeys(source for source, _ in functions))
        mine, theirs = os.pipe(), os.pipe()  # (parent reads, worker writes), (worker reads, parent writes)
        try:
            self.process = subprocess.Popen(  # a session of its own: what it starts is killed with it
                [sys.executable, os.path.abspath(__file__), str(theirs[0]), str(mine[1]), str(os.getpid())],
                pass_fds=(theirs[0], mine[1]), stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as err:  # no memory, no file descriptors, no processes left
            for fd in (*mine, *theirs):
                os.close(fd)
            raise ValueError(f"cannot start a process for {self.sources}: {err.strerror}") from None
        os.close(theirs[0])
        os.close(mine[1])
        self.inbox, self.outbox = Connection(mine[0], writable=False), Connection(theirs[1], readable=False)
        self.send({"path": sys.path, "functions": functions, "seed": seed, "max_chars": max_chars})

    def loaded(self, timeout):
        """Wait up to `timeout` seconds for the import -> self; ValueError (the worker stopped) when it
        fails, ends the process or takes longer."""
        if not self.inbox.poll(max(0.0, timeout)):
            self.stop()
            raise ValueError(f"cannot load {self.sources}: its import took longer than {timeout:g} s")
        answer = self.receive(0)
        if "error" in answer:
            raise ValueError(f"cannot load {self.sources}: the process importing it ended "
                             f"(exit code {self.stop()})")
        if "refused" in answer:
            self.stop()
            raise ValueError(answer["refused"])
        return self

    def send(self, message):
        try:
            self.outbox.send_bytes(json.dumps(message).encode())
        except OSError:  # it has ended: receive() says how
            pass

    def receive(self, timeout):
        """The worker's next message, or {"error": why} when none comes within `timeout` seconds (the
        worker is then stopped) or the worker has ended."""
        if not self.inbox.poll(timeout):
            self.stop()
            return {"error": f"no answer within {timeout:g} s"}
        try:
            return json.loads(self.inbox.recv_bytes())
        except (EOFError, OSError, ValueError):
            return {"error": f"the process running it ended (exit code {self.stop()})"}

    def stop(self):
        """Kill the process and every process it started (if they still run) -> its exit code."""
        if self.process.returncode is None:  # not reaped yet, so its group id is still its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.inbox.close()
        self.outbox.close()
        return self.process.wait()


class Workers:
    """Up to `size` worker processes, each with every function of `functions` ([(source, function)])
    imported, started when first needed (their imports at once, each within `timeout` seconds) and
    kept for later calls. map() runs calls on them at once, each with its own `timeout` seconds from
    when a worker takes it. seed: what each call's `random` is seeded from, with its text."""

    def __init__(self, functions, timeout, max_chars, size, seed=0):
        self.functions, self.timeout, self.max_chars, self.size = functions, timeout, max_chars, size
        self.seed, self.idle = seed, []
        weakref.finalize(self, stop_all, self.idle)  # and at exit

    def map(self, calls):
        """calls [(function index, text)] -> [(output, None) | (None, why it failed)], in order. An
        output is a plain str; whatever else the function did (raise, return no string or a longer
        one, overrun, end its process) is why it failed."""
        answers, pending, busy = [None] * len(calls), list(enumerate(calls))[::-1], {}
        late = f"no result within tool_timeout={self.timeout:g} s"
        try:
            broken = self.fill(min(self.size, len(calls)))  # why no worker starts, if none does
            while pending or busy:
                while pending and len(busy) < self.size and not broken:
                    broken = None if self.idle else self.fill(1)  # one killed at a timeout is replaced
                    if broken:
                        break
                    i, (index, text) = pending.pop()
                    worker = self.idle.pop()
                    worker.send({"function": index, "text": text})
                    busy[worker] = i, time.monotonic() + self.timeout
                if broken and not busy:  # no worker left to run what is pending
                    for i, _ in pending:
                        answers[i] = None, broken
                    pending = []
                soonest = min(deadline for _, deadline in busy.values()) if busy else time.monotonic()
                ready = wait([worker.inbox for worker in busy], max(0.0, soonest - time.monotonic()))
                for worker, (i, deadline) in list(busy.items()):
                    if worker.inbox in ready:
                        answer = worker.receive(0)
                        answers[i] = answer.get("output"), answer.get("error")
                    elif time.monotonic() >= deadline:
                        worker.stop()
                        answers[i] = None, late
                    else:
                        continue
                    del busy[worker]
                    if worker.process.poll() is None:
                        self.idle.append(worker)
                    else:
                        worker.stop()
        finally:  # an interrupt: no call of ours goes on running
            stop_all(list(busy))
        return answers

    def fill(self, count):
        """At least `count` idle workers (dead ones dropped, new ones started, their imports waited on
        together) -> None, or why none could start."""
        for worker in [w for w in self.idle if w.process.poll() is not None]:
            self.idle.remove(worker)
            worker.stop()
        deadline, problem, new = time.monotonic() + self.timeout, None, []
        try:
            for _ in range(count - len(self.idle)):
                new.append(Worker(self.functions, self.seed, self.max_chars))
        except ValueError as err:  # no process starts
            stop_all(new)
            return f"cannot start the tool: {err}"
        for worker in new:
            try:
                self.idle.append(worker.loaded(deadline - time.monotonic()))
            except ValueError as err:  # the file changed since it was checked, say
                problem = f"cannot start the tool: {err}"
        return problem if not self.idle else None

    def close(self):
        stop_all(self.idle)


def stop_all(workers):
    while workers:
        workers.pop().stop()


# ----------------------------------------------------------------------------
# inside a worker process


def serve(inbox, outbox, parent):
    """A worker's life: import the functions the first message names, then answer each call
    {"function", "text"} with {"output"} or {"error"}, each in the directory the worker started in."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's: it stops when it chooses
    die_with(parent)
    first = json.loads(inbox.recv_bytes())
    sys.path[:] = first["path"]
    home = os.getcwd()
    try:
        functions = [load_function(source, name, takes=("text",)) for source, name in first["functions"]]
    except ValueError as err:
        outbox.send_bytes(json.dumps({"refused": str(err)}).encode())
        return
    outbox.send_bytes(b"{}")
    while True:
        try:
            call = json.loads(inbox.recv_bytes())
        except EOFError:  # the trainer has gone
            return
        random.seed(f"{first['seed']}:{call['text']}")  # the same result for the same call, in any worker
        answer = run_one(functions[call["function"]], call["text"], first["max_chars"])
        outbox.send_bytes(json.dumps(answer).encode())
        os.chdir(home)


def run_one(fn, text, max_chars):
    """fn(text) -> {"output": a plain str of at most max_chars characters} or {"error": why}; a
    function that raises anything (SystemExit too) or returns anything else has failed."""
    try:
        output, why = plain_text(fn(text), max_chars)
    except BaseException as err:  # the tool's failure is its result
        output, why = None, failure(err)
    return {"output": output} if why is None else {"error": why}


def plain_text(output, max_chars):
    """(output as a plain str, None) for text of at most max_chars characters that UTF-8 can encode,
    else (None, why it is not): what a tool's result must be, in a worker or inline."""
    if not isinstance(output, str):
        return None, f"the tool returned {type(output).__name__}, not a string"
    output = str.__str__(output)  # a plain copy: a subclass's own methods are not asked
    if len(output) > max_chars:
        return None, f"the tool returned {len(output)} characters, over max_tool_chars={max_chars}"
    if not encodable(output):
        bad = next(c for c in output if not encodable(c))
        return None, f"the tool returned text that is not valid Unicode ({bad!r})"
    return output, None


def failure(err):
    """'Type: message' of an exception, whose own __str__ may fail too."""
    try:
        message = str(err).strip()[:200]
    except BaseException:
        message = ""
    return f"{type(err).__name__}: {message}".rstrip(": ")


def die_with(parent):
    """End this process when the trainer's ends (Linux: the kernel sends SIGKILL), even mid-call."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:  # it ended before that was set
        os._exit(1)


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False),
          int(sys.argv[3]))
