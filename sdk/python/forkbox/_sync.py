"""The synchronous client."""
from __future__ import annotations

import os
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Union

import httpx

from ._common import (
    Event,
    Execution,
    code_body as _code_body,
    SseParser,
    api_key,
    base_url,
    error_for,
    headers,
    ndjson_lines,
    sandbox_body,
    traceparent,
)


class Client:
    """A connection to a forkbox server, reused across sandboxes."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        traceparent: Optional[str] = None,
        timeout: float = 300.0,
    ) -> None:
        self.base_url = _base(base_url)
        self.traceparent = _trace(traceparent)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers(_key(api_key), self.traceparent),
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            raise error_for(r.status_code, r.content)
        return r

    def stream(self, method: str, path: str, **kw: Any):
        return _Stream(self._http, method, path, kw)

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        r = self.request(method, path, json=body if body is not None else {}, **kw)
        return r.json() if r.content else None

    def sandboxes(self, status: Optional[str] = None, limit: int = 100) -> List[Dict[str, Any]]:
        """Every sandbox (live ones by default), following pagination."""
        out: List[Dict[str, Any]] = []
        token = None
        while True:
            params: Dict[str, Any] = {"limit": limit}
            if status:
                params["status"] = status
            if token:
                params["next_token"] = token
            page = self.request("GET", "/v1/sandboxes", params=params).json()
            out.extend(page["sandboxes"])
            token = page.get("next_token")
            if not token:
                return out

    def snapshots(self) -> List[Dict[str, Any]]:
        return self.request("GET", "/v1/snapshots").json()["snapshots"]

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.request("DELETE", f"/v1/snapshots/{snapshot_id}")


_base, _key, _trace = base_url, api_key, traceparent


class _Stream:
    """A streamed response whose errors raise typed exceptions."""

    def __init__(self, http: httpx.Client, method: str, path: str, kw: Dict[str, Any]) -> None:
        self._cm = http.stream(method, path, **kw)

    def __enter__(self) -> httpx.Response:
        r = self._cm.__enter__()
        if r.status_code >= 400:
            body = r.read()
            self._cm.__exit__(None, None, None)
            raise error_for(r.status_code, body)
        return r

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


class Sandbox:
    """A sandbox. As a context manager it is created on enter and deleted on exit
    (also when the block raises). Pass `id=` to attach to an existing one."""

    def __init__(
        self,
        template: Optional[str] = None,
        *,
        cpu: Optional[float] = None,
        memory_mb: Optional[int] = None,
        timeout: Optional[int] = None,
        env: Optional[Dict[str, str]] = None,
        metadata: Optional[Dict[str, str]] = None,
        on_timeout: Optional[str] = None,
        snapshot: Optional[str] = None,
        client: Optional[Client] = None,
        traceparent: Optional[str] = None,
        id: Optional[str] = None,
    ) -> None:
        self._own_client = client is None
        self.client = client or Client(traceparent=traceparent)
        self._trace = traceparent
        self._body = sandbox_body(template, cpu, memory_mb, timeout, env, metadata, on_timeout, snapshot)
        self.id: Optional[str] = id
        self.info: Dict[str, Any] = {}
        self.files = Files(self)
        self.commands = Commands(self)

    # --- lifecycle -------------------------------------------------------------------
    def create(self) -> "Sandbox":
        if self.id is None:
            self.info = self.client.json("POST", "/v1/sandboxes", self._body, headers=self._h())
            self.id = self.info["id"]
        return self

    def __enter__(self) -> "Sandbox":
        return self.create()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.kill()
        finally:
            if self._own_client:
                self.client.close()

    def _h(self) -> Dict[str, str]:
        return {"traceparent": self._trace} if self._trace else {}

    def _path(self, suffix: str = "") -> str:
        self.create()
        return f"/v1/sandboxes/{self.id}{suffix}"

    def refresh(self) -> Dict[str, Any]:
        self.info = self.client.request("GET", self._path()).json()
        return self.info

    @property
    def status(self) -> str:
        return self.refresh()["status"]

    def kill(self) -> None:
        """Deletes the sandbox (idempotent)."""
        if self.id is None:
            return
        try:
            self.client.request("DELETE", self._path())
        except Exception as e:  # already gone is fine
            if getattr(e, "status", 0) not in (404, 410):
                raise

    delete = close = kill

    def set_timeout(self, seconds: int) -> Dict[str, Any]:
        self.info = self.client.json("POST", self._path("/timeout"), {"timeout": seconds})
        return self.info

    def pause(self) -> Dict[str, Any]:
        return self.client.json("POST", self._path("/pause"))

    def resume(self) -> Dict[str, Any]:
        return self.client.json("POST", self._path("/resume"))

    def hibernate(self) -> Dict[str, Any]:
        return self.client.json("POST", self._path("/hibernate"))

    def wake(self) -> Dict[str, Any]:
        return self.client.json("POST", self._path("/wake"))

    def snapshot(self, name: str) -> Dict[str, Any]:
        return self.client.json("POST", self._path("/snapshot"), {"name": name})

    def fork(self, n: int = 1) -> List["Sandbox"]:
        """`n` children starting from this sandbox's exact state (files and REPL)."""
        v = self.client.json("POST", self._path("/fork"), {"n": n})
        return [Sandbox(client=self.client, id=c, traceparent=self._trace) for c in v["children"]]

    def merge_into(self, winner: Union["Sandbox", str]) -> Dict[str, Any]:
        """Makes `winner`'s state (a fork descendant of this sandbox) this sandbox's;
        `winner`'s id is consumed (the order of Podflare's API)."""
        wid = winner if isinstance(winner, str) else winner.create().id
        return self.client.json("POST", self._path(f"/merge_into/{wid}"))

    # --- running code ----------------------------------------------------------------
    def _events(self, body: Dict[str, Any]) -> Iterator[Event]:
        with self.client.stream("POST", self._path("/exec"), json=body, headers=self._h()) as r:
            for line in ndjson_lines(r.iter_text()):
                yield Event.parse(line)

    def run_code_stream(
        self,
        code: str,
        language: Optional[str] = None,
        timeout: Optional[float] = None,
        context: "Union[Context, str, None]" = None,
    ) -> Iterator[Event]:
        """Events of a cell in the sandbox's persistent REPL (or in code context
        `context`), as they happen."""
        return self._events(_code_body(code, language, timeout, context))

    def run_code(
        self,
        code: str,
        language: Optional[str] = None,
        timeout: Optional[float] = None,
        context: "Union[Context, str, None]" = None,
    ) -> Execution:
        out = Execution()
        for ev in self.run_code_stream(code, language, timeout, context):
            out.add(ev)
        return out

    def exec_stream(
        self,
        cmd: str,
        cwd: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[Event]:
        body: Dict[str, Any] = {"cmd": cmd}
        for k, v in [("cwd", cwd), ("env", env), ("timeout", timeout)]:
            if v is not None:
                body[k] = v
        return self._events(body)

    def exec(self, cmd: str, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> Execution:
        out = Execution()
        for ev in self.exec_stream(cmd, cwd, env, timeout):
            out.add(ev)
        return out

    def create_context(self, language: str = "python", cwd: Optional[str] = None) -> "Context":
        """A code context: a REPL of its own in the sandbox (`python` or
        `javascript`), with its own variables and working directory (default /root)."""
        body: Dict[str, Any] = {"language": language}
        if cwd is not None:
            body["cwd"] = cwd
        v = self.client.json("POST", self._path("/contexts"), body)
        return Context(self, v["id"], v.get("language", language))

    def context(self, context_id: str) -> "Context":
        """A context made earlier (a fork's children have their parent's)."""
        return Context(self, context_id)

    def ports(self) -> List[Dict[str, Any]]:
        """TCP ports something listens on in the sandbox, with where each is reached."""
        return self.client.request("GET", self._path("/ports")).json()["ports"]

    def port_url(self, port: int, path: str = "/") -> str:
        """The URL of `port` by path on this server (the API's auth applies)."""
        return f"{self.client.base_url}{self._path(f'/ports/{port}')}/{path.lstrip('/')}"

    def public_link(self, port: int, expires_in: Optional[int] = None) -> Dict[str, Any]:
        """A link that opens `port` without a key until it expires (seconds; default a
        day) or the sandbox ends: `{"port", "host", "url", "expires_at"}`."""
        body: Dict[str, Any] = {"port": port}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return self.client.request("POST", self._path("/previews"), json=body).json()

    def events(self, follow: bool = False, tail: int = 200) -> Iterator[Dict[str, Any]]:
        """Lifecycle events (created, paused, forked, …)."""
        params = {"follow": int(follow), "tail": tail}
        with self.client.stream("GET", self._path("/events"), params=params) as r:
            p = SseParser()
            for chunk in r.iter_text():
                for m in p.feed(chunk):
                    yield m.json()


class Context:
    """A code context: its own variables, apart from other contexts and the REPL's."""

    def __init__(self, sb: Sandbox, context_id: str, language: Optional[str] = None) -> None:
        self._sb = sb
        self.id = context_id
        self.language = language or ("javascript" if context_id.startswith("ctxjs-") else "python")

    def run(self, code: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Runs a cell: `results` (MIME bundles of the last expression), `stdout`,
        `stderr`, `error` (a traceback or None), `exit_code`."""
        body: Dict[str, Any] = {"code": code}
        if timeout is not None:
            body["timeout"] = timeout
        return self._sb.client.json("POST", self._sb._path(f"/contexts/{self.id}/run"), body)

    def close(self) -> None:
        self._sb.client.request("DELETE", self._sb._path(f"/contexts/{self.id}"))


class Files:
    """A sandbox's files (paths absolute or relative to /root)."""

    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    def read(self, path: str) -> bytes:
        return self._sb.client.request("GET", self._sb._path("/files"), params={"path": path}).content

    def read_text(self, path: str) -> str:
        return self.read(path).decode()

    def write(self, path: str, data: Union[bytes, str]) -> Dict[str, Any]:
        if isinstance(data, str):
            data = data.encode()
        return self._sb.client.request("PUT", self._sb._path("/files"), params={"path": path}, content=data).json()

    def upload(self, local: Union[str, os.PathLike, BinaryIO], path: str) -> Dict[str, Any]:
        """Streams a local file (up to 500 MiB) without reading it whole."""
        f = open(local, "rb") if isinstance(local, (str, os.PathLike)) else local
        try:
            def chunks() -> Iterator[bytes]:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        return
                    yield b
            return self._sb.client.request("PUT", self._sb._path("/files/raw"), params={"path": path}, content=chunks()).json()
        finally:
            if f is not local:
                f.close()

    def download(self, path: str, local: Union[str, os.PathLike]) -> int:
        """Streams a file into `local`; returns its size."""
        n = 0
        with self._sb.client.stream("GET", self._sb._path("/files/raw"), params={"path": path}) as r, open(local, "wb") as f:
            for b in r.iter_bytes():
                f.write(b)
                n += len(b)
        return n

    def list(self, path: str = "/root") -> List[Dict[str, Any]]:
        return self._sb.client.request("GET", self._sb._path("/files/ls"), params={"path": path}).json()["entries"]

    def stat(self, path: str) -> Dict[str, Any]:
        return self._sb.client.request("GET", self._sb._path("/files/stat"), params={"path": path}).json()

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except Exception as e:
            if getattr(e, "status", 0) == 404:
                return False
            raise

    def mkdir(self, path: str) -> Dict[str, Any]:
        return self._sb.client.json("POST", self._sb._path("/files/mkdir"), {"path": path})

    def rename(self, src: str, dst: str) -> Dict[str, Any]:
        return self._sb.client.json("POST", self._sb._path("/files/rename"), {"from": src, "to": dst})

    def remove(self, path: str, recursive: bool = False) -> None:
        params: Dict[str, Any] = {"path": path}
        if recursive:
            params["recursive"] = "true"
        self._sb.client.request("DELETE", self._sb._path("/files"), params=params)

    def watch(self, path: str, recursive: bool = False) -> Iterator[Dict[str, Any]]:
        """Changes under `path` as they happen (create, modify, delete, …)."""
        params = {"path": path, "recursive": int(recursive)}
        with self._sb.client.stream("GET", self._sb._path("/files/watch"), params=params) as r:
            p = SseParser()
            for chunk in r.iter_text():
                for m in p.feed(chunk):
                    yield m.json()


class Command:
    """A background command."""

    def __init__(self, sb: Sandbox, info: Dict[str, Any]) -> None:
        self._sb = sb
        self.pid: int = info["pid"]
        self.info = info

    def _p(self, suffix: str = "") -> str:
        return self._sb._path(f"/commands/{self.pid}{suffix}")

    def wait(self) -> int:
        return self._sb.client.request("GET", self._p("/wait")).json()["exit_code"]

    def send_stdin(self, data: str, close: bool = False) -> None:
        self._sb.client.request("POST", self._p("/stdin"), json={"data": data, "close": close})

    def signal(self, sig: Union[int, str] = "SIGTERM") -> None:
        self._sb.client.request("POST", self._p("/signal"), json={"signal": sig})

    def kill(self) -> None:
        self._sb.client.request("DELETE", self._p())

    def output(self, follow: bool = True) -> Iterator[Event]:
        with self._sb.client.stream("GET", self._p("/output"), params={"follow": int(follow)}) as r:
            for line in ndjson_lines(r.iter_text()):
                yield Event.parse(line)


class Commands:
    def __init__(self, sb: Sandbox) -> None:
        self._sb = sb

    def start(self, cmd: str, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> Command:
        body: Dict[str, Any] = {"cmd": cmd, "background": True}
        for k, v in [("cwd", cwd), ("env", env), ("timeout", timeout)]:
            if v is not None:
                body[k] = v
        return Command(self._sb, self._sb.client.json("POST", self._sb._path("/exec"), body))

    def list(self) -> List[Dict[str, Any]]:
        return self._sb.client.request("GET", self._sb._path("/commands")).json()["commands"]
