"""The relay core: llmtap's proxy port.

- server.py     the proxy port: listening, the connection cap, shutdown
- connection.py one client connection: llhttp parsing, flow control, deadlines, closing
- request.py    a request head, and the HTTP rules it must pass to be read
- body.py       a request body, read whole or streamed on
- client.py     the upstream side: a keep-alive pool, responses pushed to the exchange
- exchange.py   one request: admit → prepare → open upstream → pump → conclude
- upstream.py   the `Upstream` interface, and the sidecar's single upstream
- admission.py  the checks before relaying (key, target, body length, pin, waiting limit)
- outcome.py    how an exchange ends, and what llmtap answers when it must
- observers.py  everything that consumes a request: started, first token, finished
- deadline.py   deadlines, and the one timer that watches them all
- http1.py      header filtering and head serialisation
- proxy.py      the pieces put together for one listening port

Nothing here is imported by this file, so modules low in the stack (state, telemetry) can use
`exporter.relay.observers` without pulling in the rest.
"""
