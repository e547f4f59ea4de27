"""A consumer of the pgcachewatch relay's stream (contract version 2) with nats-py.

It keeps the promise a cache needs: every change is either delivered or
covered by a flush. It prints what a cache would do, one JSON line each:

    {"invalidate": {"schema": "public", "table": "users", "keys": [{"id": 7}]}}
    {"flush": "epoch changed"}
    {"position": 36983296}          # read-your-writes: every change up to it is seen
    {"healthy": false}              # no heartbeat for 5 s, or the relay's source is down

Usage: python3 consumer.py NATS_URL [STREAM [PREFIX]]   (pip install nats-py)
"""

import asyncio
import json
import sys
import time

import nats
from nats.js.api import DeliverPolicy

HEARTBEAT_TIMEOUT = 5.0  # seconds without a relay heartbeat: unhealthy


def say(**what):
    print(json.dumps(what), flush=True)


async def main(url, stream="PGCACHEWATCH", prefix="pgcachewatch"):
    nc = await nats.connect(url)
    js = nc.jetstream()
    # Every subject of the relay's stream, in stream order, from now on (a new
    # consumer starts with an empty cache). The ordered consumer resumes by
    # itself after a disconnect.
    sub = await js.subscribe(
        f"{prefix}.>", stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    say(ready=True)
    epoch, next_seq, healthy, last_beat = None, None, None, time.monotonic()

    def set_health(now_healthy):
        nonlocal healthy
        if now_healthy != healthy:
            healthy = now_healthy
            say(healthy=healthy)  # unhealthy: bypass the cache

    while True:
        try:
            msg = await sub.next_msg(timeout=1.0)
        except nats.errors.TimeoutError:
            if time.monotonic() - last_beat > HEARTBEAT_TIMEOUT:
                set_health(False)
            continue
        seq = msg.metadata.sequence.stream
        if next_seq is not None and seq > next_seq:
            # Skipped sequences: replaced heartbeats and records (normal), or
            # messages the stream's limits discarded before we read them.
            info = await js.stream_info(stream)
            if info.state.first_seq > next_seq:
                say(flush="the stream discarded messages not yet read")
        next_seq = seq + 1

        m = json.loads(msg.data)
        if m.get("v", 1) > 2:
            sys.exit(f"relay message version {m['v']}: this consumer knows 2")
        if m["epoch"] != epoch:
            if epoch is not None and "gap" not in m:
                say(flush="epoch changed")
            epoch = m["epoch"]
        if "event" in m:
            e = m["event"]
            say(invalidate={"schema": e.get("schema"), "table": e["table"], "keys": e.get("keys")})
        elif "gap" in m:
            say(flush=m["gap"]["reason"])
        elif "progress" in m:
            say(position=m["progress_u64"])  # compare numbers, never the "0/16B3748" text
        elif "health" in m:
            last_beat = time.monotonic()
            set_health(m["health"] == "healthy")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
