"""Pieces shared by the sync and async clients: configuration, errors, events."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional

DEFAULT_URL = "http://127.0.0.1:7070"


def env_first(*names: str) -> Optional[str]:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def base_url(explicit: Optional[str]) -> str:
    return (explicit or env_first("FORKBOX_URL", "PODFLARE_URL") or DEFAULT_URL).rstrip("/")


def api_key(explicit: Optional[str]) -> Optional[str]:
    return explicit or env_first("FORKBOX_API_KEY", "PODFLARE_API_KEY")


def traceparent(explicit: Optional[str]) -> Optional[str]:
    return explicit or env_first("FORKBOX_TRACEPARENT", "PODFLARE_TRACEPARENT")


def headers(key: Optional[str], trace: Optional[str]) -> Dict[str, str]:
    h = {"user-agent": "forkbox-python/0.1.0"}
    if key:
        h["authorization"] = f"Bearer {key}"
    if trace:
        h["traceparent"] = trace
    return h


class ForkboxError(Exception):
    """An error answered by the server: its message, HTTP status and stable code."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class BadRequest(ForkboxError):
    """400: the request was invalid."""


class NotFound(ForkboxError):
    """404: no such sandbox, file, process or snapshot."""


class Conflict(ForkboxError):
    """409: the sandbox is not in a state that allows the call."""


class Gone(ForkboxError):
    """410: the sandbox ended (deleted, expired, failed, merged, lost)."""


class TooLarge(ForkboxError):
    """413: the body is over the limit."""


class ServerError(ForkboxError):
    """5xx: the server or the sandbox's agent failed."""


_BY_STATUS = {400: BadRequest, 404: NotFound, 409: Conflict, 410: Gone, 413: TooLarge}


def error_for(status: int, body: bytes) -> ForkboxError:
    try:
        v = json.loads(body or b"{}")
        message, code = v.get("error", ""), v.get("code", "")
    except ValueError:
        message, code = body.decode("utf-8", "replace"), ""
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ForkboxError)
    return cls(message or f"HTTP {status}", status, code)


@dataclass
class Event:
    """One event of an exec or run_code stream."""

    type: str
    data: Any
    seq: int
    ts: int

    @property
    def code(self) -> Optional[int]:
        """The exit code, on `exit` events."""
        return self.data if self.type == "exit" else None

    @staticmethod
    def parse(line: str) -> "Event":
        v = json.loads(line)
        return Event(v["type"], v.get("data"), v.get("seq", 0), v.get("ts", 0))


@dataclass
class Execution:
    """The collected result of a command or cell."""

    stdout: str = ""
    stderr: str = ""
    exit_code: int = -1
    events: List[Event] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.stdout

    def add(self, ev: Event) -> None:
        self.events.append(ev)
        if ev.type == "stdout":
            self.stdout += ev.data
        elif ev.type == "stderr":
            self.stderr += ev.data
        elif ev.type == "exit":
            self.exit_code = ev.data


def ndjson_lines(chunks: Iterable[str]) -> Iterator[str]:
    buf = ""
    for c in chunks:
        buf += c
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


@dataclass
class SseMessage:
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class SseParser:
    """Incremental Server-Sent Events parser."""

    def __init__(self) -> None:
        self.buf = ""

    def feed(self, text: str) -> List[SseMessage]:
        self.buf += text.replace("\r\n", "\n")
        out = []
        while "\n\n" in self.buf:
            raw, self.buf = self.buf.split("\n\n", 1)
            event, data = "message", []
            for line in raw.split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
            if data:
                out.append(SseMessage(event, "\n".join(data)))
        return out


def code_body(code: str, language: Optional[str], timeout: Optional[float], context: Any) -> Dict[str, Any]:
    """The exec body of a cell: in the REPL of `language` (default python), or in code
    context `context` (a context or its id; its language unless one is named)."""
    body: Dict[str, Any] = {"code": code}
    if context is not None:
        body["context"] = context if isinstance(context, str) else context.id
        if language is not None:
            body["language"] = language
    else:
        body["language"] = language or "python"
    if timeout is not None:
        body["timeout"] = timeout
    return body


def sandbox_body(
    template: Optional[str],
    cpu: Optional[float],
    memory_mb: Optional[int],
    timeout: Optional[int],
    env: Optional[Dict[str, str]],
    metadata: Optional[Dict[str, str]],
    on_timeout: Optional[str],
    snapshot: Optional[str],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    for k, v in [
        ("template", template),
        ("cpu", cpu),
        ("memory_mb", memory_mb),
        ("timeout", timeout),
        ("env", env),
        ("metadata", metadata),
        ("on_timeout", on_timeout),
        ("snapshot", snapshot),
    ]:
        if v is not None:
            body[k] = v
    return body
