# forkbox code contexts: namespaces of their own inside the sandbox's Python REPL, each
# with its own working directory (crates/core/src/manager/contexts.rs). Installed once
# per REPL as builtins.__forkbox_ctx_v2__. Ops `new`, `del`, `has` and `run` end with
# one line on stdout: "\n" + nonce + JSON; `exec` runs a cell as the REPL runs one
# (prints the last expression's repr, a traceback on stderr and status 1 on error).
def __forkbox_ctx_v2__(op, ctx, code, nonce, cwd):
    import ast, base64, builtins, io, json, os, sys, traceback
    reg = builtins.__dict__.setdefault("__forkbox_ctx_ns__", {})
    cwds = builtins.__dict__.setdefault("__forkbox_ctx_cwd__", {})

    def emit(d):
        sys.stderr.flush()
        sys.stdout.flush()
        sys.stdout.write("\n" + nonce + json.dumps(d) + "\n")
        sys.stdout.flush()

    def bundle(value):
        b = {"text/plain": repr(value)}
        for meth, mime in (("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"),
                           ("_repr_svg_", "image/svg+xml"), ("_repr_json_", "application/json"),
                           ("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg")):
            f = getattr(value, meth, None)
            if not callable(f):
                continue
            try:
                data = f()
            except Exception:
                continue
            if data is None:
                continue
            if isinstance(data, bytes):
                data = base64.b64encode(data).decode()
            elif not isinstance(data, str):
                data = json.dumps(data)
            b[mime] = data
        return b

    def figures(results):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            buf = io.BytesIO()
            plt.figure(num).savefig(buf, format="png")
            results.append({"image/png": base64.b64encode(buf.getvalue()).decode(),
                            "text/plain": "<Figure %d>" % num})
        plt.close("all")

    if op == "new":
        if not os.path.isdir(cwd):
            return emit({"invalid": "cwd %s is not a directory in the sandbox" % cwd})
        os.environ.setdefault("MPLBACKEND", "Agg")
        reg[ctx] = {"__name__": "__main__", "__builtins__": builtins}
        cwds[ctx] = cwd
        return emit({"ok": True})
    if op == "del":
        cwds.pop(ctx, None)
        return emit({"ok": reg.pop(ctx, None) is not None})
    if op == "has":
        return emit({"ok": ctx in reg})
    ns = reg.get(ctx)
    if ns is None:
        if op == "exec":
            sys.stderr.write("forkbox: code context %s not found\n" % ctx)
            raise SystemExit(1)
        return emit({"missing": True})
    here = os.getcwd()
    try:
        os.chdir(cwds.get(ctx, here))
    except OSError:
        pass
    results, error, value = [], None, None
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), ns)
        value = eval(compile(last, "<cell>", "eval"), ns) if last is not None else None
        if op == "run":
            if value is not None:
                results.append(bundle(value))
            figures(results)
    except KeyboardInterrupt:
        raise  # the cell's timeout: the REPL answers it
    except BaseException as e:
        if op == "exec" and isinstance(e, SystemExit):
            raise  # as in the REPL: the cell exits with its code
        # Without this helper's own frame.
        tb = e.__traceback__.tb_next if e.__traceback__ else None
        error = "".join(traceback.format_exception(type(e), e, tb))
    finally:
        # The context keeps the directory its code moved to; the REPL keeps its own.
        cwds[ctx] = os.getcwd()
        os.chdir(here)
    if op == "exec":
        if error is not None:
            sys.stderr.write(error)
            raise SystemExit(1)
        if value is not None:
            print(repr(value))
        return None
    emit({"results": results, "error": error})
