# forkbox code contexts: namespaces of their own inside the sandbox's Python REPL, for
# the PandaStack dialect's `repl/sessions` (crates/api/src/contexts.rs). Installed once
# per REPL as builtins.__forkbox_ctx__; each call ends with one line on stdout:
# "\n" + nonce + JSON.
def __forkbox_ctx__(op, ctx, code, nonce):
    import ast, base64, builtins, io, json, os, sys, traceback
    reg = builtins.__dict__.setdefault("__forkbox_ctx_ns__", {})

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
        os.environ.setdefault("MPLBACKEND", "Agg")
        reg[ctx] = {"__name__": "__main__", "__builtins__": builtins}
        return emit({"ok": True})
    if op == "del":
        return emit({"ok": reg.pop(ctx, None) is not None})
    ns = reg.get(ctx)
    if ns is None:
        return emit({"missing": True})
    results, error = [], None
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), ns)
        value = eval(compile(last, "<cell>", "eval"), ns) if last is not None else None
        if value is not None:
            results.append(bundle(value))
        figures(results)
    except Exception as e:
        # Without this helper's own frame.
        tb = e.__traceback__.tb_next if e.__traceback__ else None
        error = "".join(traceback.format_exception(type(e), e, tb))
    emit({"results": results, "error": error})
