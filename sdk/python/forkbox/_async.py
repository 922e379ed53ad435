"""The asynchronous client (same shapes as the synchronous one, with `await`)."""
from __future__ import annotations

from typing import Any, AsyncIterator, Dict, List, Optional, Union

import httpx

from ._common import (
    Event,
    Execution,
    code_body as _code_body,
    api_key,
    base_url,
    error_for,
    headers,
    sandbox_body,
    traceparent,
)


class AsyncClient:
    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        traceparent: Optional[str] = None,
        timeout: float = 300.0,
    ) -> None:
        self.base_url = _base(base_url)
        self.traceparent = _trace(traceparent)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers(_key(api_key), self.traceparent),
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = await self._http.request(method, path, **kw)
        if r.status_code >= 400:
            raise error_for(r.status_code, r.content)
        return r

    async def json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        r = await self.request(method, path, json=body if body is not None else {}, **kw)
        return r.json() if r.content else None


_base, _key, _trace = base_url, api_key, traceparent


class AsyncSandbox:
    """`async with AsyncSandbox() as s:` creates on enter and deletes on exit."""

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
        client: Optional[AsyncClient] = None,
        traceparent: Optional[str] = None,
        id: Optional[str] = None,
    ) -> None:
        self._own_client = client is None
        self.client = client or AsyncClient(traceparent=traceparent)
        self._body = sandbox_body(template, cpu, memory_mb, timeout, env, metadata, on_timeout, snapshot)
        self.id: Optional[str] = id
        self.info: Dict[str, Any] = {}

    async def create(self) -> "AsyncSandbox":
        if self.id is None:
            self.info = await self.client.json("POST", "/v1/sandboxes", self._body)
            self.id = self.info["id"]
        return self

    async def __aenter__(self) -> "AsyncSandbox":
        return await self.create()

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.kill()
        finally:
            if self._own_client:
                await self.client.aclose()

    async def _path(self, suffix: str = "") -> str:
        await self.create()
        return f"/v1/sandboxes/{self.id}{suffix}"

    async def kill(self) -> None:
        if self.id is None:
            return
        try:
            await self.client.request("DELETE", await self._path())
        except Exception as e:
            if getattr(e, "status", 0) not in (404, 410):
                raise

    async def refresh(self) -> Dict[str, Any]:
        self.info = (await self.client.request("GET", await self._path())).json()
        return self.info

    async def pause(self) -> Dict[str, Any]:
        return await self.client.json("POST", await self._path("/pause"))

    async def resume(self) -> Dict[str, Any]:
        return await self.client.json("POST", await self._path("/resume"))

    async def hibernate(self) -> Dict[str, Any]:
        return await self.client.json("POST", await self._path("/hibernate"))

    async def wake(self) -> Dict[str, Any]:
        return await self.client.json("POST", await self._path("/wake"))

    async def snapshot(self, name: str) -> Dict[str, Any]:
        return await self.client.json("POST", await self._path("/snapshot"), {"name": name})

    async def fork(self, n: int = 1) -> List["AsyncSandbox"]:
        v = await self.client.json("POST", await self._path("/fork"), {"n": n})
        return [AsyncSandbox(client=self.client, id=c) for c in v["children"]]

    async def merge_into(self, winner: Union["AsyncSandbox", str]) -> Dict[str, Any]:
        """Makes `winner`'s state (a fork descendant of this sandbox) this sandbox's."""
        wid = winner if isinstance(winner, str) else (await winner.create()).id
        return await self.client.json("POST", await self._path(f"/merge_into/{wid}"))

    async def _events(self, body: Dict[str, Any]) -> AsyncIterator[Event]:
        async with self.client._http.stream("POST", await self._path("/exec"), json=body) as r:
            if r.status_code >= 400:
                raise error_for(r.status_code, await r.aread())
            buf = ""
            async for chunk in r.aiter_text():
                buf += chunk
                while "\n" in buf:
                    line, buf = buf.split("\n", 1)
                    if line.strip():
                        yield Event.parse(line)

    def run_code_stream(
        self,
        code: str,
        language: Optional[str] = None,
        timeout: Optional[float] = None,
        context: "Union[AsyncContext, str, None]" = None,
    ) -> AsyncIterator[Event]:
        return self._events(_code_body(code, language, timeout, context))

    async def run_code(
        self,
        code: str,
        language: Optional[str] = None,
        timeout: Optional[float] = None,
        context: "Union[AsyncContext, str, None]" = None,
    ) -> Execution:
        out = Execution()
        async for ev in self.run_code_stream(code, language, timeout, context):
            out.add(ev)
        return out

    async def exec(self, cmd: str, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None, timeout: Optional[float] = None) -> Execution:
        body: Dict[str, Any] = {"cmd": cmd}
        for k, v in [("cwd", cwd), ("env", env), ("timeout", timeout)]:
            if v is not None:
                body[k] = v
        out = Execution()
        async for ev in self._events(body):
            out.add(ev)
        return out

    async def create_context(self, language: str = "python", cwd: Optional[str] = None) -> "AsyncContext":
        """A code context: a REPL of its own in the sandbox (`python` or
        `javascript`), with its own variables and working directory (default /root)."""
        body: Dict[str, Any] = {"language": language}
        if cwd is not None:
            body["cwd"] = cwd
        v = await self.client.json("POST", await self._path("/contexts"), body)
        return AsyncContext(self, v["id"], v.get("language", language))

    def context(self, context_id: str) -> "AsyncContext":
        return AsyncContext(self, context_id)

    async def ports(self) -> List[Dict[str, Any]]:
        return (await self.client.request("GET", await self._path("/ports"))).json()["ports"]

    async def public_link(self, port: int, expires_in: Optional[int] = None) -> Dict[str, Any]:
        """A link that opens `port` without a key until it expires or the sandbox ends."""
        body: Dict[str, Any] = {"port": port}
        if expires_in is not None:
            body["expires_in"] = expires_in
        return (await self.client.request("POST", await self._path("/previews"), json=body)).json()

    async def read_file(self, path: str) -> bytes:
        return (await self.client.request("GET", await self._path("/files"), params={"path": path})).content

    async def write_file(self, path: str, data: Union[bytes, str]) -> Dict[str, Any]:
        if isinstance(data, str):
            data = data.encode()
        r = await self.client.request("PUT", await self._path("/files"), params={"path": path}, content=data)
        return r.json()

    async def list_files(self, path: str = "/root") -> List[Dict[str, Any]]:
        r = await self.client.request("GET", await self._path("/files/ls"), params={"path": path})
        return r.json()["entries"]


class AsyncContext:
    """A code context: its own variables, apart from other contexts and the REPL's."""

    def __init__(self, sb: AsyncSandbox, context_id: str, language: Optional[str] = None) -> None:
        self._sb = sb
        self.id = context_id
        self.language = language or ("javascript" if context_id.startswith("ctxjs-") else "python")

    async def run(self, code: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        body: Dict[str, Any] = {"code": code}
        if timeout is not None:
            body["timeout"] = timeout
        return await self._sb.client.json("POST", await self._sb._path(f"/contexts/{self.id}/run"), body)

    async def close(self) -> None:
        await self._sb.client.request("DELETE", await self._sb._path(f"/contexts/{self.id}"))
