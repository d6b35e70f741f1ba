"""The relay core: llmtap's proxy port.

- server.py    the client side: HTTP/1.1 over asyncio transports, parsed by llhttp
- client.py    the upstream side: a keep-alive pool, responses pushed to the exchange
- exchange.py  one request: admit → prepare → open upstream → pump → conclude
- upstream.py  the `Upstream` interface, and the sidecar's single upstream
- admission.py the checks before relaying (key, body length, pin, waiting limit)
- outcome.py   how an exchange ends, and what llmtap answers when it must
- observers.py everything that consumes a finished request
- proxy.py     the pieces put together for one listening port

Nothing here is imported by this file, so modules low in the stack (state, telemetry) can use
`exporter.relay.observers` without pulling in the rest.
"""
