"""forkbox: Python SDK for the self-hosted sandbox server for AI agents.

Sync: :class:`Sandbox`, :class:`Client`. Async: :class:`AsyncSandbox`,
:class:`AsyncClient`. Errors are :class:`ForkboxError` subclasses carrying the server's
message, HTTP status and stable code.
"""
from ._async import AsyncClient, AsyncContext, AsyncSandbox
from ._common import (
    BadRequest,
    Conflict,
    Event,
    Execution,
    ForkboxError,
    Gone,
    NotFound,
    ServerError,
    TooLarge,
)
from ._sync import Client, Command, Commands, Context, Files, Sandbox

__all__ = [
    "AsyncClient",
    "AsyncContext",
    "AsyncSandbox",
    "BadRequest",
    "Client",
    "Command",
    "Commands",
    "Conflict",
    "Context",
    "Event",
    "Execution",
    "Files",
    "ForkboxError",
    "Gone",
    "NotFound",
    "Sandbox",
    "ServerError",
    "TooLarge",
]
__version__ = "0.1.0"
