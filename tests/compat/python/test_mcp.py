"""Darkroom's MCP server, driven by the official MCP Python SDK (`mcp`).

Two transports: Streamable HTTP at ``{server}/mcp`` on the session's Darkroom (the
``darkroom`` fixture's server, with its client key), and stdio through
``darkroom mcp --url … --key …`` started by the SDK's stdio client.  Each app
endpoint is a tool (``darkroom/diagnostics`` → ``darkroom__diagnostics``) that runs
through the queue.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

if TYPE_CHECKING:
    from conftest import Darkroom

TOOL = "darkroom__diagnostics"


def _ssl_context(dr: Darkroom) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if dr.ca_cert:
        ctx.load_verify_locations(cafile=dr.ca_cert)
    return ctx


def _texts(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _http_session(dr: Darkroom, body: Any) -> Any:
    """Opens a Streamable HTTP session on /mcp with the fixture's key and runs `body(session)`."""
    headers = {"Authorization": f"Key {dr.fal_key}"}
    async with httpx2.AsyncClient(
        headers=headers,
        verify=_ssl_context(dr),
        trust_env=False,
        timeout=httpx2.Timeout(30.0, read=120.0),
    ) as http:
        async with streamable_http_client(f"{dr.url}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.server_info.name == "darkroom", init
                return await body(session)


def _check_diagnostics_tool(tools: Any) -> None:
    by_name = {t.name: t for t in tools.tools}
    assert TOOL in by_name, sorted(by_name)
    tool = by_name[TOOL]
    assert tool.input_schema.get("type") == "object", tool.input_schema
    assert "echo" in tool.input_schema.get("properties", {}), tool.input_schema
    assert "darkroom/diagnostics" in (tool.description or ""), tool.description


def _check_echo(result: Any, echo: Any) -> None:
    text = _texts(result)
    assert not result.is_error, text
    assert result.structured_content is not None, result
    assert result.structured_content.get("echo") == echo, result.structured_content
    assert json.loads(text.splitlines()[0])["echo"] == echo, text


def test_mcp_http_tools_progress_and_validation(darkroom: Darkroom) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def body(session: ClientSession) -> tuple[Any, Any, Any]:
        tools = await session.list_tools()
        ok = await session.call_tool(
            TOOL,
            {"echo": {"hi": 1}, "sleep_ms": 300, "parts": 3},
            progress_callback=on_progress,
        )
        bad = await session.call_tool(TOOL, {"sleep_ms": -5})
        return tools, ok, bad

    tools, ok, bad = _run(_http_session(darkroom, body))
    _check_diagnostics_tool(tools)
    _check_echo(ok, {"hi": 1})
    # Progress notifications, when the server sent any, increase and carry messages.
    values = [p[0] for p in progress]
    assert values == sorted(values) and len(set(values)) == len(values), progress
    assert all(isinstance(p[2], str) and p[2] for p in progress), progress
    assert progress, "the server sent no progress notification for a 300 ms request"

    assert bad.is_error, bad
    text = _texts(bad)
    assert "validation" in text and "sleep_ms" in text, text


def _png_data_uri() -> str:
    import base64
    import io
    import os

    from PIL import Image

    buf = io.BytesIO()
    # Noise, so that the PNG (and the inline output's data URI) stays a few kB.
    Image.frombytes("RGB", (32, 24), os.urandom(32 * 24 * 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_mcp_http_file_outputs(darkroom: Darkroom) -> None:
    """Output files come back as resource links (stored files) or inline images (`sync_mode` data URIs)."""
    image = _png_data_uri()

    async def body(session: ClientSession) -> tuple[Any, Any]:
        stored = await session.call_tool(
            "darkroom__image-utils", {"image_url": image, "operation": "convert", "output_format": "jpeg"}
        )
        inline = await session.call_tool(
            "darkroom__image-utils", {"image_url": image, "operation": "convert", "sync_mode": True}
        )
        return stored, inline

    stored, inline = _run(_http_session(darkroom, body))
    assert not stored.is_error, _texts(stored)
    out = stored.structured_content["image"]
    links = [c for c in stored.content if c.type == "resource_link"]
    assert [(link.uri, link.mime_type) for link in links] == [(out["url"], "image/jpeg")], stored.content
    assert out["url"].startswith("http"), out

    assert not inline.is_error, _texts(inline)
    assert inline.structured_content["image"]["url"].startswith("data:image/png;base64,")
    images = [c for c in inline.content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png", inline.content
    assert "attached" in _texts(inline)


def test_mcp_http_unknown_tool_and_bad_key(darkroom: Darkroom) -> None:
    async def body(session: ClientSession) -> Any:
        try:
            result = await session.call_tool("no__such__tool", {})
        except Exception as exc:  # the SDK raises the JSON-RPC error (invalid params)
            return exc
        return result

    outcome = _run(_http_session(darkroom, body))
    assert isinstance(outcome, Exception) or outcome.is_error, outcome
    assert "no__such__tool" in str(outcome) or "no__such__tool" in _texts(outcome), outcome

    async def list_with(authorization: str) -> int:
        async with httpx2.AsyncClient(verify=_ssl_context(darkroom), trust_env=False) as http:
            r = await http.post(
                f"{darkroom.url}/mcp",
                headers={
                    "Authorization": authorization,
                    "Accept": "application/json, text/event-stream",
                    "Content-Type": "application/json",
                },
                content=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            )
            return r.status_code

    # A wrong key fails at the HTTP level; `Bearer <key>` (what many MCP clients send) works like `Key <key>`.
    assert _run(list_with("Key nope:nope")) == 401
    assert _run(list_with(f"Bearer {darkroom.fal_key}")) == 200


async def _wait_cancelled(dr: Darkroom, echo: str) -> dict[str, Any]:
    """Waits until the diagnostics request whose input echoes `echo` is COMPLETED; returns its summary."""
    headers = {"Authorization": f"Key {dr.fal_key}"}
    async with httpx2.AsyncClient(verify=_ssl_context(dr), trust_env=False, headers=headers) as http:
        deadline = asyncio.get_running_loop().time() + 15
        seen: list[Any] = []
        while asyncio.get_running_loop().time() < deadline:
            r = await http.get(f"{dr.url}/v1/requests", params={"app_id": "darkroom/diagnostics", "limit": 20})
            assert r.status_code == 200, r.text
            seen = r.json()["requests"]
            for req in seen:
                if req["status"] != "COMPLETED":
                    continue
                detail = await http.get(f"{dr.url}/v1/requests/{req['request_id']}")
                if echo in detail.text:
                    return req
            await asyncio.sleep(0.2)
        raise AssertionError(f"the cancelled request did not complete: {seen}")


def _stdio_params(dr: Darkroom, tmp_path: Path) -> StdioServerParameters:
    args = ["mcp", "--url", dr.url, "--key", dr.fal_key]
    if dr.ca_cert:
        args += ["--ca-cert", dr.ca_cert]
    # A data folder of its own, so nothing is read from the server's.
    args += ["--data-dir", str(tmp_path / "none")]
    return StdioServerParameters(command=str(dr.bin), args=args, env={"DARKROOM_LOG": "info"})


def test_mcp_stdio(darkroom: Darkroom, tmp_path: Path) -> None:
    params = _stdio_params(darkroom, tmp_path)
    log_path = tmp_path / "darkroom-mcp.log"
    marker = f"cancel-me-{tmp_path.name}"

    async def run() -> tuple[Any, Any]:
        with open(log_path, "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    assert init.server_info.name == "darkroom", init
                    tools = await session.list_tools()
                    result = await session.call_tool(TOOL, {"echo": [1, "two"], "logs": ["hello"]})
                    # A call the client gives up on is cancelled in Darkroom too (notifications/cancelled).
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(session.call_tool(TOOL, {"echo": marker, "sleep_ms": 30000}), 1.5)
                    cancelled = await _wait_cancelled(darkroom, marker)
                    return tools, result, cancelled

    try:
        tools, result, cancelled = _run(run())
    except BaseException:
        print("--- darkroom mcp stderr ---\n" + log_path.read_text(errors="replace"))
        raise
    _check_diagnostics_tool(tools)
    _check_echo(result, [1, "two"])
    assert cancelled["error_type"] == "request_cancelled", cancelled


def test_mcp_http_disconnect_cancels(darkroom: Darkroom, tmp_path: Path) -> None:
    """A tool call whose HTTP client goes away cancels its request."""
    marker = f"disconnect-{tmp_path.name}"

    async def body(session: ClientSession) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.call_tool(TOOL, {"echo": marker, "sleep_ms": 30000}), 1.5)

    async def run() -> dict[str, Any]:
        await _http_session(darkroom, body)  # leaving the session closes its connections
        return await _wait_cancelled(darkroom, marker)

    cancelled = _run(run())
    assert cancelled["error_type"] == "request_cancelled", cancelled
