"""A PGCacheWatch 0.4.2 service, unchanged and with its defaults: its own
``PGEventQueue`` listening on its default channel (``ch_pgcachewatch_table_change``),
its ``Greedy`` strategy and its ``cache`` decorator. The table it caches has the
triggers of ``pgcachewatch install --pgcachewatch-compat``, not PGCacheWatch's.

Usage: python pgeventqueue_client.py DSN TABLE

Prints (one line each, flushed): ``cached <loader calls after two calls>`` and
``ready`` once listening; then, after a write to TABLE (the test makes it), the
event PGCacheWatch parsed from the payload as JSON and ``invalidated <loader
calls once the cache dropped its entry>``. Events of other tables are ignored.
Exits non-zero on any failure, or after 30 s without the invalidation.
"""

import asyncio
import json
import sys

import asyncpg
from pgcachewatch import decorators, listeners, models, strategies


def out(line: str) -> None:
    print(line, flush=True)


async def main(dsn: str, table: str) -> None:
    connection = await asyncpg.connect(dsn)
    queue = listeners.PGEventQueue()
    await queue.connect(connection)  # the default channel
    seen: list[models.Event] = []

    def ours(event: models.Event) -> bool:
        if event.table != table:
            return False
        seen.append(event)
        return True

    calls = 0

    @decorators.cache(strategy=strategies.Greedy(listener=queue, predicate=ours))
    async def load() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert queue.connection_healthy()
    await load()
    await load()
    out(f"cached {calls}")
    out("ready")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while calls < 2:
        if loop.time() > deadline:
            raise SystemExit(f"no invalidation within 30 s (events seen: {seen})")
        await asyncio.sleep(0.02)
        await load()
    event = seen[0]
    out(json.dumps({
        "channel": event.channel,
        "operation": event.operation,
        "table": event.table,
        "sent_at": event.sent_at.isoformat(),
    }))
    out(f"invalidated {calls}")
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
