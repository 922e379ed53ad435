# forkbox python kernel driver: cells arrive NUL-terminated on fd 3; after each cell the
# driver writes "<status>\n" to fd 3. Output goes to the real stdout/stderr (unbuffered).
import ast, builtins, os, sys, traceback

def _forkbox_main():
    ns = {"__name__": "__main__", "__builtins__": builtins}
    pending = b""
    while True:
        while b"\0" not in pending:
            chunk = os.read(3, 65536)
            if not chunk:
                return
            pending += chunk
        raw, pending = pending.split(b"\0", 1)
        status = 0
        try:
            tree = ast.parse(raw.decode("utf-8", "replace"), "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
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
            traceback.print_exception(type(e), e, tb)
            status = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os.write(3, b"%d\n" % (status & 0xFFFFFFFF if status >= 0 else 1))

_forkbox_main()
