#!/usr/bin/env node
// CI smoke client using the official TypeScript SDK (@modelcontextprotocol/sdk@1.32.2).
// usage: node client.mjs URL [TOKEN] [TOOL] [ARGS_JSON]     (TOKEN falls back to $MCP_TOKEN)
// SDK 1.32.2 speaks only the handshake era (LATEST_PROTOCOL_VERSION = 2025-11-25): initialize,
// notifications/initialized, Mcp-Session-Id, MCP-Protocol-Version, optional GET SSE stream.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const [url, tokenArg, toolArg, argsArg] = process.argv.slice(2);
if (!url) { console.error('usage: node client.mjs URL [TOKEN] [TOOL] [ARGS_JSON]'); process.exit(2); }
const token = tokenArg || process.env.MCP_TOKEN;

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: token ? { Authorization: `Bearer ${token}` } : {} },
});
// Non-fatal transport errors (e.g. GET stream problems); the abort of the GET stream on close() is expected noise.
transport.onerror = (e) => { if (!/abort/i.test(String(e?.message ?? e))) console.error('[transport error]', e?.message ?? e); };

const client = new Client({ name: 'ci-ts-client', version: '1.0.0' });
const out = {};
try {
  await client.connect(transport);                 // initialize + notifications/initialized (+ GET SSE attempt)
  out.protocolVersion = transport.protocolVersion; // negotiated version, echoed in MCP-Protocol-Version
  out.sessionId = transport.sessionId;
  out.serverInfo = client.getServerVersion();
  out.capabilities = client.getServerCapabilities();
  const { tools } = await client.listTools();
  out.tools = tools;
  const name = toolArg || tools[0]?.name;
  if (name) {
    try {
      out.call = { name, result: await client.callTool({ name, arguments: JSON.parse(argsArg || '{}') }) };
    } catch (e) {                                   // McpError for JSON-RPC errors
      out.call = { name, error: { code: e.code, message: e.message } };
    }
  }
  await client.ping();
  await transport.terminateSession();               // DELETE with Mcp-Session-Id (405 tolerated)
} finally {
  await client.close();
}
console.log(JSON.stringify(out, null, 2));
