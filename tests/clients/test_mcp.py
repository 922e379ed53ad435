"""The official MCP Python SDK (PyPI `mcp`) as a client of forkbox's MCP server, over
stdio (`forkbox mcp`) and over streamable HTTP (`/mcp` of the server): it lists the
tools and runs create → run_code → fork → merge → delete, and reads a sandbox as a
resource."""
import asyncio
import json
import os

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client

URL = os.environ["FORKBOX_TEST_URL"]
FORKBOX = os.environ.get("FORKBOX_BIN", "target/debug/forkbox")

TOOLS = {
    "create_sandbox", "list_sandboxes", "run_code", "exec", "read_file", "write_file",
    "list_files", "fork", "merge", "delete_sandbox",
}


async def call(session, name, **args):
    r = await session.call_tool(name, args)
    text = "".join(c.text for c in r.content if c.type == "text")
    assert not r.isError, f"{name}: {text}"
    try:
        return json.loads(text)
    except ValueError:
        return text


async def round_trip(session):
    await session.initialize()
    tools = {t.name for t in (await session.list_tools()).tools}
    assert TOOLS <= tools, tools
    sbx = (await call(session, "create_sandbox"))["id"]
    ran = await call(session, "run_code", sandbox_id=sbx, code="x = 41\nprint(x + 1)")
    assert (ran["stdout"], ran["exit_code"]) == ("42\n", 0), ran
    await call(session, "write_file", sandbox_id=sbx, path="/root/note.txt", content="hi")
    assert await call(session, "read_file", sandbox_id=sbx, path="/root/note.txt") == "hi"
    listed = await call(session, "list_files", sandbox_id=sbx, path="/root")
    assert "note.txt" in [e["name"] for e in listed["entries"]], listed
    out = await call(session, "exec", sandbox_id=sbx, cmd="echo $((6 * 7))")
    assert out["stdout"] == "42\n", out
    # The sandbox is a resource.
    resources = (await session.list_resources()).resources
    uri = f"forkbox://sandboxes/{sbx}"
    assert uri in [str(r.uri) for r in resources], resources
    read = await session.read_resource(uri)
    assert json.loads(read.contents[0].text)["id"] == sbx
    # Fork, change a child, merge it back: the parent's id then has the child's state.
    forked = await call(session, "fork", sandbox_id=sbx, n=2)
    kids = forked["children"]
    assert len(kids) == 2, forked
    await call(session, "run_code", sandbox_id=kids[1], code="x = 99")
    await call(session, "merge", parent_id=sbx, child_id=kids[1])
    ran = await call(session, "run_code", sandbox_id=sbx, code="print(x)")
    assert ran["stdout"] == "99\n", ran
    # A refusal is a tool error the model can read, not a protocol failure.
    bad = await session.call_tool("run_code", {"sandbox_id": "sbx-nope", "code": "1"})
    assert bad.isError and "404" in bad.content[0].text, bad
    for k in [kids[0], sbx]:
        assert "deleted" in await call(session, "delete_sandbox", sandbox_id=k)


def test_stdio():
    """`forkbox mcp` over stdio: tools, create, run_code, files, exec, fork, merge, delete, resources"""
    params = StdioServerParameters(command=FORKBOX, args=["mcp", "--url", URL])

    async def main():
        async with stdio_client(params) as (r, w):
            async with ClientSession(r, w) as session:
                await round_trip(session)

    asyncio.run(main())


def test_streamable_http():
    """`/mcp` over streamable HTTP: the same round trip"""

    async def main():
        async with streamablehttp_client(URL + "/mcp") as (r, w, _):
            async with ClientSession(r, w) as session:
                await round_trip(session)

    asyncio.run(main())
