#!/usr/bin/env python3
"""CI smoke client for an MCP Streamable HTTP server, using the official Python SDK (mcp==2.3.0).

usage:
  python client.py URL [--token TOKEN] [--mode legacy|auto|2026-07-28]
                              [--tool NAME] [--args JSON] [--expect-version V]
  (token falls back to $MCP_TOKEN)

--mode legacy      -> 2025-11-25 era: initialize + notifications/initialized, Mcp-Session-Id, DELETE on exit
--mode auto        -> SDK default: probe server/discover @2026-07-28, fall back to initialize on any error
--mode 2026-07-28  -> stateless era pinned: no probe, no initialize, per-request _meta + Mcp-Method/Mcp-Name
Exit code 0 on success; prints one JSON document to stdout.
"""
import argparse
import asyncio
import json
import os
import sys

import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client


def dump(model):
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--token", default=os.environ.get("MCP_TOKEN"))
    p.add_argument("--mode", default="legacy", help="legacy | auto | 2026-07-28")
    p.add_argument("--tool", default=None, help="tool to call (default: first listed tool)")
    p.add_argument("--args", default="{}", help="JSON object of tool arguments")
    p.add_argument("--expect-version", default=None)
    a = p.parse_args()

    headers = {"Authorization": f"Bearer {a.token}"} if a.token else {}
    # The SDK does not manage a caller-supplied httpx2 client: own it with `async with`.
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0)) as http:
        transport = streamable_http_client(a.url, http_client=http)  # terminate_on_close=True -> DELETE at exit
        async with Client(transport, mode=a.mode, read_timeout_seconds=30) as client:
            out = {
                "mode": a.mode,
                "protocolVersion": client.protocol_version,
                "serverInfo": dump(client.server_info) if client.server_info else None,
                "capabilities": dump(client.server_capabilities),
            }
            tools = await client.list_tools()
            out["tools"] = [dump(t) for t in tools.tools]
            name = a.tool or (tools.tools[0].name if tools.tools else None)
            if name is not None:
                try:
                    res = await client.call_tool(name, json.loads(a.args))
                    out["call"] = {"name": name, "result": dump(res)}
                except MCPError as e:  # protocol-level error (unknown tool, bad params, ...)
                    out["call"] = {"name": name, "error": {"code": e.code, "message": str(e)}}
    print(json.dumps(out, indent=2))
    if a.expect_version and out["protocolVersion"] != a.expect_version:
        print(f"expected protocol {a.expect_version}, got {out['protocolVersion']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
