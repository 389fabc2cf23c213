"""The box's tools for AI agents: one registry, served over MCP and as OpenAI function schemas.

    tools.py    every tool: name, JSON Schema, which command it needs, what it does through the hub
    fence.py    what a model saw, fenced so it cannot pose as instructions
    hubline.py  the tools' way to the hub: one short-lived control client per call
    server.py   the MCP server (the `mcp` SDK's low-level Server): stdio, and Streamable HTTP with a bearer token
    service.py  `edgeroom-mcp`: the HTTP server as a service of the box (off unless [mcp] enabled)
    spec.py     its catalog entry and its [mcp] config section

docs/agent-tools.md has the tools, the fence and the security model.
"""
