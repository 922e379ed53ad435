# forkbox python kernel driver. Messages arrive NUL-terminated on fd 3, each starting
# with a kind byte: b"c" + a cell, or b"f" + the fork children's adopt tokens, one per
# line. After a cell the driver writes "<status>\n" to fd 3; after a fork, per child
# "x" + its error as hex UTF-8 ("x" alone for success), comma-separated, then "\n".
# Output goes to the real stdout/stderr (unbuffered).
#
# Only C modules the interpreter has loaded anyway, or nearly: each Python module
# imported here (ast, json, socket, traceback and what they pull in: re, enum,
# selectors, ...) is memory in every warm REPL, ~2.5 MB of its ~5.5 MB in all.
import _ast, _socket, builtins, os, sys


def _forkbox_recv_fds(sock, bufsize, maxfds):
    """socket.recv_fds on a bare _socket.socket."""
    msg, ancdata, _, _ = sock.recvmsg(bufsize, _socket.CMSG_LEN(maxfds * 4))
    fds = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            end = len(data) - len(data) % 4
            fds += [int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
                    for i in range(0, end, 4)]
    return msg, fds


def _forkbox_become_child(cwd, token, report):
    """Runs in a fork copy, which the agent's carry helper (carry.rs) has already moved
    into the child sandbox's namespaces, without any capability, before the copy's
    first instruction: fork into the child's PID namespace and get adopted by its
    agent. Returns in the grandchild only, as the child's kernel; the copy exits."""
    if os.fork() != 0:
        os._exit(0)
    # Now inside the child's PID namespace.
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(b"\0forkbox-adopt")
    s.sendall(token.encode() + b"\n")
    msg, fds = _forkbox_recv_fds(s, 16, 3)
    if msg != b"ok\n" or len(fds) != 3:
        raise OSError("the child's agent did not adopt this kernel")
    s.close()
    for i, fd in enumerate(fds):
        os.dup2(fd, i + 1)
        os.close(fd)
    # Open files and sockets of the parent's REPL point into the parent: not carried.
    os.closerange(4, report)
    os.closerange(report + 1, 1 << 20)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/root")
    os.close(report)


def _forkbox_fork(tokens, fds):
    """Returns ("child", None) in a copy that became a child's kernel, else
    ("parent", per-child errors). `fds` are the children's namespaces, which the carry
    helper finds in each copy (by inode) to join them."""
    started = []
    # Seven namespaces per child, then the carry helper's sealed code.
    if len(fds) != 7 * len(tokens) + 1:
        raise OSError("expected %d fds, got %d" % (7 * len(tokens) + 1, len(fds)))
    # The copies' cwd: joining a mount namespace moves them to its root.
    cwd = os.getcwd()
    for token in tokens:
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            started.append((None, None, str(e)))
            continue
        if pid == 0:
            os.close(r)
            try:
                _forkbox_become_child(cwd, token, w)
            except BaseException as e:
                try:
                    os.write(w, (str(e) or type(e).__name__).encode())
                finally:
                    os._exit(1)
            return "child", None
        os.close(w)
        started.append((pid, r, None))
    errors = []
    for pid, r, err in started:
        if err is not None:
            errors.append(err)
            continue
        msg = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            msg += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if not msg and status != 0:
            msg = b"fork helper exited with status %d" % status
        errors.append(msg.decode("utf-8", "replace"))
    return "parent", errors


def _forkbox_main():
    ns = {"__name__": "__main__", "__builtins__": builtins}
    ctl = _socket.socket(fileno=3)
    pending = b""
    fds = []
    while True:
        while b"\0" not in pending:
            chunk, got = _forkbox_recv_fds(ctl, 65536, 253)
            fds.extend(got)
            if not chunk:
                return
            pending += chunk
        raw, pending = pending.split(b"\0", 1)
        kind, raw = raw[:1], raw[1:]
        if kind == b"f":
            try:
                tokens = raw.decode().split("\n") if raw else []
                role, errors = _forkbox_fork(tokens, fds)
            except BaseException as e:
                role, errors = "parent", None
                failure = str(e)
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            fds = []
            if role == "child":
                pending = b""
                continue
            if errors is None:
                errors = [failure]
            reply = ",".join("x" + e.encode("utf-8", "replace").hex() for e in errors)
            os.write(3, reply.encode() + b"\n")
            continue
        status = 0
        try:
            tree = compile(raw.decode("utf-8", "replace"), "<cell>", "exec", _ast.PyCF_ONLY_AST)
            last = None
            if tree.body and isinstance(tree.body[-1], _ast.Expr):
                last = _ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<cell>", "exec"), ns)
            if last is not None:
                value = eval(compile(last, "<cell>", "eval"), ns)
                if value is not None:
                    builtins._ = value
                    print(repr(value))
        except SystemExit as e:
            code = e.code
            if code is None:
                status = 0
            elif isinstance(code, int):
                status = code
            else:
                print(code, file=sys.stderr)
                status = 1
        except BaseException as e:
            tb = e.__traceback__
            # Hide the driver's own frame.
            if tb is not None and tb.tb_frame.f_code is _forkbox_main.__code__:
                tb = tb.tb_next
            # The interpreter's own display (and a hook the cell installed), as
            # `python3 file.py` would show it; it shows the exception's own traceback.
            e.__traceback__ = tb
            try:
                sys.excepthook(type(e), e, tb)
            except BaseException:
                sys.__excepthook__(type(e), e, tb)
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os.write(3, b"%d\n" % (status & 0xFFFFFFFF if status >= 0 else 1))

_forkbox_main()
