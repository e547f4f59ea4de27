"""A PGCacheWatch 0.4.2 service, unchanged, reading events from pgcachewatch's
WebSocket server through its own ``WSEventQueue``, ``Greedy`` strategy and
``cache`` decorator.

Usage: python wseventqueue_client.py WS_URL CHANNEL EVENTS [TOKEN]

With TOKEN, the handshake carries ``Authorization: Bearer TOKEN``: the one line
a service adds to reach a token-protected server.

Prints (one line each, flushed): ``ready``; then each event received as JSON;
``cached <loader calls after two calls>`` while connected; and, once the server
closes the connection, ``closed healthy=<bool> bypass <loader calls after two
more calls>``. Exits non-zero on any failure or timeout.
"""

import asyncio
import json
import sys

import websockets.legacy.client
from pgcachewatch import decorators, listeners, strategies


def out(line: str) -> None:
    print(line, flush=True)


async def main(url: str, channel: str, expected: int, token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # WSEventQueue reads `ws.closed`, which only websockets' legacy client has.
    ws = await websockets.legacy.client.connect(url, extra_headers=headers)
    queue = listeners.WSEventQueue()
    await queue.connect(ws, channel)
    out("ready")

    events = []
    for _ in range(expected):
        event = await asyncio.wait_for(queue.get(), timeout=30)
        events.append(event)
        out(json.dumps({
            "channel": event.channel,
            "operation": event.operation,
            "table": event.table,
            "sent_at": event.sent_at.isoformat(),
        }))

    calls = 0

    @decorators.cache(strategy=strategies.Greedy(listener=queue))
    async def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert queue.connection_healthy()
    await load()
    await load()
    out(f"cached {calls}")

    # The server closes the connection (the test makes the source lose its
    # PostgreSQL connection): WSEventQueue notices, and the cache bypasses.
    for _ in range(300):
        if not queue.connection_healthy():
            break
        await asyncio.sleep(0.1)
    before = calls
    await load()
    await load()
    out(f"closed healthy={queue.connection_healthy()} bypass {calls - before}")


if __name__ == "__main__":
    token = sys.argv[4] if len(sys.argv) > 4 else None
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), token), timeout=90))
