# claw's sandbox harness: the fixed Python every sandboxed program runs under.
#
#   python -I -B -c <this file> MODE NONCE_FD VERDICT_FD    (input on stdin)
#
# The verdict is a random nonce, read from NONCE_FD, written to VERDICT_FD (an
# unlinked file) only when the run succeeded; claw compares it with the one it
# sent. Exiting early (os._exit(0), SystemExit) or printing a marker therefore
# never passes.
#
# MODE "program": stdin is a program, run as __main__ in this process; the
# nonce is written when it returns. Code built to attack this harness could
# find the nonce in this process (its frames): good for "did it run to its
# end", not for a verdict worth forging.
#
# MODE "check": stdin is JSON {candidate, prelude, test, entry_point}. The
# candidate (untrusted: a model's completion) runs in a forked process that
# never holds the nonce or the verdict descriptor; this process (made
# undumpable first, so the candidate cannot ptrace it or read its memory) runs
# the prelude and the test code, whose check(candidate) calls the candidate's
# function through pipes. Arguments and results cross as the text of plain
# values (None, bool, int, float, complex, str, bytes, tuple, list, set,
# frozenset, dict), rebuilt here by a parser that evaluates nothing, so the
# test compares real values: an object whose __eq__ always says True does not
# survive the trip. The nonce is read after the fork and written once check()
# has returned here.

import os, sys


def main():
    mode, nonce_fd, verdict_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    source = read_all(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    if mode == "program":
        nonce = os.read(nonce_fd, 256)
        os.close(nonce_fd)
        run_as_main(source.decode("utf-8", "replace"), "program.py")
        finish(verdict_fd, nonce)
    elif mode == "check":
        import json

        check(json.loads(source), nonce_fd, verdict_fd)
    else:
        sys.exit("claw harness: unknown mode " + repr(mode))


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def show_only(filename):
    """Tracebacks show only the frames of `filename` (not the harness's)."""
    import traceback

    def excepthook(kind, value, tb):
        while tb is not None and tb.tb_frame.f_code.co_filename != filename:
            tb = tb.tb_next
        traceback.print_exception(kind, value, tb)

    sys.excepthook = excepthook


def run_as_main(text, filename):
    """Runs `text` as the __main__ module; returns the module."""
    import linecache, types

    show_only(filename)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    main = types.ModuleType("__main__")
    main.__file__ = filename
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [filename]
    exec(compile(text, filename, "exec"), main.__dict__)
    return main


def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def finish(verdict_fd, nonce):
    flush()
    os.write(verdict_fd, nonce)
    os._exit(0)


# ------------------------------------------------------------------ check mode

MAX_FRAME = 16 << 20
# The candidate's exit status when its module raised (its traceback says why).
LOAD_FAILED = 97


def send(fd, payload):
    data = len(payload).to_bytes(8, "big") + payload
    while data:
        data = data[os.write(fd, data) :]


def recv(fd):
    """One frame, or None at the end of the stream."""
    head = read_exactly(fd, 8)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_FRAME:
        raise ValueError("a message of %d bytes, over the limit" % size)
    body = read_exactly(fd, size)
    if body is None:
        return None
    return body


def read_exactly(fd, size):
    parts, left = [], size
    while left:
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def plain(value):
    """`value` as built-in types only (subclasses such as Counter or a
    namedtuple become dict and tuple), or TypeError."""
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind in (int, float, complex, str, bytes):
        return value
    for base in (bool, int, float, complex, str, bytes):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, frozenset):
        return frozenset(plain(v) for v in value)
    if isinstance(value, set):
        return {plain(v) for v in value}
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    raise TypeError("a %s is not a plain value" % kind.__name__)


def parse(text):
    """The plain value `text` (a repr) spells; evaluates nothing."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant):
            if type(node.value) in (int, float, complex, str, bytes, bool, type(None)):
                return node.value
        elif isinstance(node, ast.Name) and node.id in ("inf", "nan"):
            return float(node.id)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = value(node.operand)
            if type(operand) in (int, float, complex):
                return -operand if isinstance(node.op, ast.USub) else operand
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = value(node.left), value(node.right)
            if type(left) in (int, float) and type(right) is complex:
                return left + right if isinstance(node.op, ast.Add) else left - right
        elif isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        elif isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        elif isinstance(node, ast.Set):
            return {value(e) for e in node.elts}
        elif isinstance(node, ast.Dict) and None not in node.keys:
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("set", "frozenset")
            and not node.keywords
            and len(node.args) <= 1
        ):
            items = value(node.args[0]) if node.args else ()
            return set(items) if node.func.id == "set" else frozenset(items)
        raise ValueError("not a plain value: " + ast.dump(node)[:200])

    return value(ast.parse(text, mode="eval").body)


def describe(error):
    try:
        return "%s: %s" % (type(error).__name__, error)
    except Exception:
        return type(error).__name__


def serve_candidate(job, requests, replies):
    """The candidate's process: loads its module, then answers calls of its
    entry point until the checker closes the pipe."""
    try:
        module = run_as_main(job["candidate"], "program.py")
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        flush()
        os._exit(LOAD_FAILED)
    send(replies, b"ready")
    entry = job["entry_point"]
    while True:
        request = recv(requests)
        if request is None:
            flush()
            os._exit(0)
        try:
            args, kwargs = parse(request.decode())
            function = module.__dict__.get(entry)
            if function is None:
                raise NameError("name %r is not defined" % entry)
            reply = b"ok" + repr(plain(function(*args, **kwargs))).encode()
        except BaseException as error:
            try:
                sys.excepthook(type(error), error, error.__traceback__)
            except BaseException:
                pass
            reply = b"er" + describe(error).encode("utf-8", "replace")
        flush()
        send(replies, reply)


class CandidateError(Exception):
    """The candidate failed (its error's own words are the message)."""


def wait_status(pid):
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def ended_early(status):
    if status is not None and os.WIFSIGNALED(status):
        return CandidateError("the program was killed by signal %d" % os.WTERMSIG(status))
    if status is not None and os.WIFEXITED(status):
        return CandidateError(
            "the program ended (exit status %d) before its tests did" % os.WEXITSTATUS(status)
        )
    return CandidateError("the program ended before its tests did")


class Candidate:
    """The candidate's function, as the tests call it: through the pipes."""

    def __init__(self, pid, requests, replies):
        self.pid, self.requests, self.replies = pid, requests, replies

    def __call__(self, *args, **kwargs):
        try:
            send(self.requests, repr((args, kwargs)).encode())
        except BrokenPipeError:
            raise ended_early(wait_status(self.pid)) from None
        reply = recv(self.replies)
        if reply is None:
            raise ended_early(wait_status(self.pid))
        kind, text = reply[:2], reply[2:].decode("utf-8", "replace")
        if kind == b"ok":
            try:
                return parse(text)
            except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError):
                raise CandidateError("the program returned something other than a plain value")
        raise CandidateError(text)


def prelude_code(text):
    """The prelude compiled; a prompt that ends in a bare `def f():` line
    (the body is the completion's) gets a `pass` body."""
    try:
        return compile(text, "prompt.py", "exec")
    except SyntaxError:
        return compile(text + "    pass\n", "prompt.py", "exec")


def undumpable():
    """Nothing of the same user may ptrace this process or read its memory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_DUMPABLE = 4
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


def check(job, nonce_fd, verdict_fd):
    undumpable()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # before any of the candidate's code: no nonce, no verdict, no way back
        for fd in (nonce_fd, verdict_fd, requests_w, replies_r):
            os.close(fd)
        serve_candidate(job, requests_r, replies_w)
    for fd in (requests_r, replies_w):
        os.close(fd)
    nonce = os.read(nonce_fd, 256)
    os.close(nonce_fd)
    show_only("check.py")

    def excepthook(kind, value, tb):
        if isinstance(value, CandidateError):
            sys.stderr.write("%s\n" % value)
        else:
            shown(kind, value, tb)

    shown, sys.excepthook = sys.excepthook, excepthook
    if recv(replies_r) != b"ready":
        status = wait_status(pid)
        if status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == LOAD_FAILED:
            os._exit(1)  # its traceback is the last word
        raise ended_early(status)
    candidate = Candidate(pid, requests_w, replies_r)
    scope = {"__name__": "__check__", "__builtins__": __builtins__}
    exec(prelude_code(job["prelude"]), scope)
    scope[job["entry_point"]] = candidate
    text = job["test"]
    import linecache

    linecache.cache["check.py"] = (len(text), None, text.splitlines(True), "check.py")
    exec(compile(text, "check.py", "exec"), scope)
    scope["check"](candidate)
    finish(verdict_fd, nonce)


main()
