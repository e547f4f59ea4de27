"""Same-run baseline: PGCacheWatch 0.4.2 (the Python predecessor) on this machine.

Measures, through PGCacheWatch's own public API (``decorators.cache``,
``strategies.Greedy``, ``listeners.PGEventQueue``) and its own trigger
installer (``python -m pgcachewatch install --commit``; 0.4.2 ships no
``pgcachewatch`` console script):

1. cache-hit throughput, one asyncio task, 1000 warm keys;
2. write issued -> fresh value read through the cache, p50/p99 (next to the
   floor: a raw asyncpg LISTEN awaited directly plus one SELECT);
3. two caches sharing one listener: fresh or stale 2 s after an UPDATE;
4. what happens after ``pg_terminate_backend`` of the listener connection;
5. a write storm nobody reads: queue length and RSS growth.

Run: ``bash bench/python/run.sh`` (``DATABASE_URL``, default
``postgres://postgres@127.0.0.1:5432/test``). Each section has a timeout, so a
hanging library call is reported rather than waited on forever. Unique table and
channel names; triggers, function and tables are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import asyncpg
import pgcachewatch
from pgcachewatch import decorators, listeners, strategies

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/test"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_URL))
    p.add_argument("--keys", type=int, default=1000, help="warm keys for the hit benchmark")
    p.add_argument("--hit-calls", type=int, default=500_000, help="calls per hit-throughput run")
    p.add_argument("--hit-runs", type=int, default=5)
    p.add_argument("--updates", type=int, default=500, help="measured updates (>= 300)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--poll-sleep-us", type=int, default=0,
                   help="section 2: sleep between the reader's polls (0 = just yield)")
    p.add_argument("--storm-events", type=int, default=1_000_000,
                   help="notifications for the write-storm section (0 skips it)")
    return p.parse_args()


@dataclass
class Names:
    """Unique object names for this run."""

    suffix: str = field(default_factory=lambda: f"{os.getpid()}_{random.randrange(1 << 30)}")

    @property
    def table(self) -> str:
        return f"pcw_py_{self.suffix}"

    @property
    def floor_table(self) -> str:
        return f"pcw_py_floor_{self.suffix}"

    @property
    def channel(self) -> str:
        return f"pcw_py_ch_{self.suffix}"

    @property
    def floor_channel(self) -> str:
        return f"pcw_py_floor_ch_{self.suffix}"


async def cli(url: str, *args: str, timeout: float = 30.0) -> None:
    """Runs PGCacheWatch's own CLI (``python -m pgcachewatch ...``)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgcachewatch", *args, "--pg-dsn", url, "--commit",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        raise RuntimeError(f"pgcachewatch {' '.join(args)} timed out after {timeout} s")
    if proc.returncode != 0:
        raise RuntimeError(f"pgcachewatch {' '.join(args)} failed: {err.decode()}{out.decode()}")


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10)


async def new_listener(url: str, channel: str) -> tuple[listeners.PGEventQueue, asyncpg.Connection]:
    """A PGEventQueue LISTENing on its own connection, as the README shows."""
    conn = await connect(url)
    queue = listeners.PGEventQueue()
    await queue.connect(conn, channel)
    return queue, conn


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Loader:
    """The decorated function's body: one SELECT, counting how often it runs."""

    def __init__(self, conn: asyncpg.Connection, table: str) -> None:
        self.conn = conn
        self.sql = f"SELECT v FROM {table} WHERE id = $1"
        self.loads = 0

    async def __call__(self, key: int) -> int:
        self.loads += 1
        return await self.conn.fetchval(self.sql, key)


def cached(listener: listeners.PGEventQueue, loader: Loader,
           on_stat: Callable[[str], None] | None = None) -> Callable[[int], Awaitable[int]]:
    """Wraps ``loader`` in PGCacheWatch's ``@cache`` with a ``Greedy`` strategy."""
    strategy = strategies.Greedy(listener=listener)
    if on_stat is None:
        deco = decorators.cache(strategy=strategy)
    else:
        deco = decorators.cache(strategy=strategy, statistics_callback=on_stat)

    @deco
    async def get_v(key: int) -> int:
        return await loader(key)

    return get_v


# 1. ---------------------------------------------------------------------------
async def hit_throughput(args: argparse.Namespace, names: Names) -> None:
    listener, lconn = await new_listener(args.database_url, names.channel)
    reader = await connect(args.database_url)
    try:
        loader = Loader(reader, names.table)
        get_v = cached(listener, loader)
        keys = list(range(1, args.keys + 1))
        for k in keys:
            await get_v(k)
        assert loader.loads == len(keys), "warm-up did not load every key once"

        # Context: the same loop over a plain async function doing a dict lookup.
        plain = {k: k for k in keys}

        async def plain_get(key: int) -> int:
            return plain[key]

        async def run(fn: Callable[[int], Awaitable[int]]) -> float:
            rounds = max(1, args.hit_calls // len(keys))
            t0 = time.perf_counter()
            for _ in range(rounds):
                for k in keys:
                    await fn(k)
            return rounds * len(keys) / (time.perf_counter() - t0)

        loads_before = loader.loads
        rates = [await run(get_v) for _ in range(args.hit_runs)]
        misses = loader.loads - loads_before
        plain_rates = [await run(plain_get) for _ in range(args.hit_runs)]
        print("1. cache-hit throughput, one asyncio task, "
              f"{len(keys)} warm keys, {args.hit_runs} runs of "
              f"{max(1, args.hit_calls // len(keys)) * len(keys)} calls "
              "(await the @cache(Greedy)-decorated function, keys in a loop; no events arriving)")
        print(f"   PGCacheWatch @cache hits: median {statistics.median(rates) / 1e6:.3f} M/s "
              f"(best {max(rates) / 1e6:.3f}, worst {min(rates) / 1e6:.3f}); "
              f"misses during timed runs: {misses}")
        print(f"   context, plain async dict lookup in the same loop: "
              f"median {statistics.median(plain_rates) / 1e6:.3f} M/s")
    finally:
        await reader.close()
        await lconn.close()


# 2. ---------------------------------------------------------------------------
async def fresh_latency(args: argparse.Namespace, names: Names) -> None:
    url = args.database_url
    listener, lconn = await new_listener(url, names.channel)
    writer = await connect(url)
    reader = await connect(url)
    floor_conn = await connect(url)
    floor_q: asyncio.Queue[str] = asyncio.Queue()
    await floor_conn.add_listener(names.floor_channel, lambda *a: floor_q.put_nowait(a[-1]))
    try:
        loader = Loader(reader, names.table)
        get_v = cached(listener, loader)
        update = f"UPDATE {names.table} SET v = $1 WHERE id = 1"
        floor_update = f"UPDATE {names.floor_table} SET v = $1 WHERE id = 1"
        floor_select = f"SELECT v FROM {names.floor_table} WHERE id = 1"
        base = int(await reader.fetchval(f"SELECT v FROM {names.table} WHERE id = 1"))
        poll_sleep = args.poll_sleep_us / 1e6

        ours: list[float] = []
        floor: list[float] = []
        stale_reads = 0
        for i in range(1, args.warmup + args.updates + 1):
            v = base + i
            measured = i > args.warmup

            # Warm: the cache must hold v - 1 (two reads: the second is a hit).
            for _ in range(2):
                got = await get_v(1)
                if got != v - 1:
                    raise RuntimeError(f"warm read returned {got}, expected {v - 1}")

            # PGCacheWatch: write issued -> read through the cache until fresh.
            t0 = time.perf_counter()
            await writer.execute(update, v)
            stale = 0

            async def until_fresh() -> None:
                nonlocal stale
                while await get_v(1) != v:
                    stale += 1
                    # A hit never yields to the event loop (it awaits a done
                    # Future), so without this the listener could never enqueue
                    # the event: see the note printed below.
                    await asyncio.sleep(poll_sleep)

            await asyncio.wait_for(until_fresh(), 5.0)
            dt = time.perf_counter() - t0
            if measured:
                ours.append(dt)
                stale_reads += stale

            # Floor: raw asyncpg LISTEN awaited directly, then one SELECT.
            while not floor_q.empty():
                floor_q.get_nowait()
            t0 = time.perf_counter()
            await writer.execute(floor_update, v)
            await asyncio.wait_for(floor_q.get(), 5.0)
            got = await reader.fetchval(floor_select)
            dt = time.perf_counter() - t0
            if got != v:
                raise RuntimeError(f"floor read {got}, expected {v}")
            if measured:
                floor.append(dt)

        us = 1e6
        print(f"2. write issued -> fresh value read, {args.updates} updates (after {args.warmup} "
              "warm-up), interleaved with the floor; reader loops the cached call, "
              f"asyncio.sleep({poll_sleep}) between reads, until it returns the new value")
        print(f"   PGCacheWatch @cache(Greedy): p50 {pct(ours, .5) * us:7.0f} µs   "
              f"p99 {pct(ours, .99) * us:7.0f} µs   max {max(ours) * us:7.0f} µs   "
              f"(stale hits before fresh: {stale_reads / len(ours):.1f} per update)")
        print(f"   floor, raw asyncpg LISTEN + 1 SELECT: p50 {pct(floor, .5) * us:7.0f} µs   "
              f"p99 {pct(floor, .99) * us:7.0f} µs   max {max(floor) * us:7.0f} µs")

        # Note: the same wait without yielding between reads. Retried until the
        # write returns before its notification has been queued (else the first
        # read already drains it and nothing is shown).
        v = base + args.warmup + args.updates
        for _attempt in range(20):
            assert await get_v(1) == v
            v += 1
            await writer.execute(update, v)
            if listener.qsize() == 0:
                break
            assert await get_v(1) == v  # drained; try again
        queued_at_start = listener.qsize()
        spins, fresh = 0, False
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end:
            spins += 1
            if await get_v(1) == v:
                fresh = True
                break
        queued_after_spin = listener.qsize()
        await asyncio.sleep(0.05)
        queued_after_yield = listener.qsize()
        print(f"   note: a reader that never yields: fresh after 0.5 s of spinning: {fresh} "
              f"({spins} hits; events queued at start {queued_at_start}, after spinning "
              f"{queued_after_spin}, after one 50 ms yield {queued_after_yield}); a hit awaits a done "
              "Future and never yields, so asyncpg cannot run the listener callback")
        if not fresh:
            assert await get_v(1) == v
    finally:
        for c in (writer, reader, floor_conn, lconn):
            await c.close()


# 3. ---------------------------------------------------------------------------
async def shared_listener(args: argparse.Namespace, names: Names) -> None:
    url = args.database_url
    listener, lconn = await new_listener(url, names.channel)
    writer = await connect(url)
    reader = await connect(url)
    try:
        get_a = cached(listener, Loader(reader, names.table))
        get_b = cached(listener, Loader(reader, names.table))
        caches = {"A": get_a, "B": get_b}
        print("3. two @cache(Greedy) functions sharing one PGEventQueue: warm both on a key, "
              "UPDATE that row, then read both every 1 ms for 2 s (trial 2: other key, other order)")
        for trial, (key, order) in enumerate(((2, ("A", "B")), (4, ("B", "A"))), start=1):
            v = int(await reader.fetchval(f"SELECT v FROM {names.table} WHERE id = $1", key))
            for name in order:  # warm: both hold the current value
                for _ in range(2):
                    got = await caches[name](key)
                    if got != v:
                        raise RuntimeError(f"cache {name} warm read {got}, expected {v}")
            v += 1
            t0 = time.perf_counter()
            await writer.execute(f"UPDATE {names.table} SET v = $1 WHERE id = $2", v, key)
            fresh_at: dict[str, float | None] = {n: None for n in order}
            last: dict[str, int] = {}
            while time.perf_counter() - t0 < 2.0:
                for name in order:
                    last[name] = await caches[name](key)
                    if last[name] == v and fresh_at[name] is None:
                        fresh_at[name] = time.perf_counter() - t0
                if all(t is not None for t in fresh_at.values()):
                    break
                await asyncio.sleep(0.001)
            verdict = ", ".join(
                f"cache {n}: " + (f"fresh after {fresh_at[n] * 1e3:.1f} ms" if fresh_at[n] is not None
                                  else f"STALE at 2 s (returns {last[n]}, expected {v})")
                for n in sorted(order))
            print(f"   trial {trial} (key {key}, cache {order[0]} read first each round): {verdict}; "
                  f"events left in the shared queue: {listener.qsize()}")
    finally:
        for c in (writer, reader, lconn):
            await c.close()


# 4. ---------------------------------------------------------------------------
async def killed_connection(args: argparse.Namespace, names: Names) -> None:
    url = args.database_url
    listener, lconn = await new_listener(url, names.channel)
    admin = await connect(url)
    reader = await connect(url)
    counts = {"hit": 0, "miss": 0}

    def on_stat(kind: str) -> None:
        counts[kind] += 1

    try:
        loader = Loader(reader, names.table)
        get_v = cached(listener, loader, on_stat)
        v = int(await reader.fetchval(f"SELECT v FROM {names.table} WHERE id = 3"))
        for _ in range(2):
            assert await get_v(3) == v
        print("4. pg_terminate_backend of the listener's connection, then an UPDATE right away; "
              "read every 10 ms for 5 s, counting fresh/stale reads and @cache hit/miss/bypass")
        pid = lconn.get_server_pid()
        t_kill = time.perf_counter()
        await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        v += 1
        await admin.execute(f"UPDATE {names.table} SET v = $1 WHERE id = 3", v)
        t_upd = time.perf_counter()

        counts.update(hit=0, miss=0)
        loads0 = loader.loads
        unhealthy_at = None
        first_fresh = None
        fresh = stale = reads = 0
        while time.perf_counter() - t_upd < 5.0:
            if unhealthy_at is None and not listener.connection_healthy():
                unhealthy_at = time.perf_counter() - t_kill
            got = await get_v(3)
            reads += 1
            if got == v:
                fresh += 1
                if first_fresh is None:
                    first_fresh = time.perf_counter() - t_upd
            else:
                stale += 1
            await asyncio.sleep(0.01)
        loads = loader.loads - loads0
        bypassed = loads - counts["miss"]
        print("   listener connection_healthy() turned False "
              + (f"{unhealthy_at * 1e3:.1f} ms after the kill" if unhealthy_at is not None
                 else "never within 5 s") + f"; now {listener.connection_healthy()}")
        print(f"   (a) fresh values: {fresh}/{reads} reads fresh, {stale} stale"
              + (f"; first fresh {first_fresh * 1e3:.1f} ms after the UPDATE" if first_fresh is not None
                 else "; never fresh"))
        print(f"   (b) cache resumes: {counts['hit']} hits, {counts['miss']} misses, "
              f"{bypassed} bypassed calls (every call ran the SELECT) in 5 s -> "
              + ("caching resumed" if counts["hit"] > 0 else "caching did NOT resume (bypasses on every call)"))

        # The only reattach path the API offers is PGEventQueue.connect again.
        newconn = await connect(url)
        try:
            await listener.connect(newconn, names.channel)
            print("   reattach: PGEventQueue.connect(new connection) accepted")
        except RuntimeError as e:
            print(f"   reattach: PGEventQueue.connect(new connection) raises RuntimeError: "
                  f"\"{str(e)[:70]}...\"; no reconnect in 0.4.2, only a new queue + strategy "
                  "+ re-decorated function (a new, empty cache) recovers")
        finally:
            await newconn.close()
    finally:
        for c in (admin, reader):
            await c.close()
        if not lconn.is_closed():
            await lconn.close()


# 5. ---------------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def write_storm(args: argparse.Namespace, names: Names) -> None:
    url = args.database_url
    listener, lconn = await new_listener(url, names.channel)
    writer = await connect(url)
    reader = await connect(url)
    try:
        loader = Loader(reader, names.table)
        get_v = cached(listener, loader)
        await get_v(5)
        n, batch = args.storm_events, 100_000
        rss0 = rss_mb()
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = min(batch, n - sent)
            # The trigger's payload, distinct per row (NOTIFY folds duplicates in a
            # transaction), sent directly: one statement per event would take minutes.
            await writer.execute(
                "SELECT pg_notify($1, json_build_object('operation', 'update', 'table', $2::text, "
                "'sent_at', now() + g * interval '1 microsecond')::text) "
                "FROM generate_series(1, $3::int) g",
                names.channel, names.table, k)
            sent += k
        while listener.qsize() < n and time.perf_counter() - t0 < 240:
            await asyncio.sleep(0.05)
        ingest = time.perf_counter() - t0
        rss1 = rss_mb()
        queued = listener.qsize()
        # What the next reads cost: Greedy.clear() returns on the first matching
        # event, so each call consumes one queued event and clears the whole cache.
        loads0 = loader.loads
        reads = 1000
        for _ in range(reads):
            await get_v(5)
        misses = loader.loads - loads0
        print(f"5. write storm, no reads: {n} notifications in PGCacheWatch's payload format "
              f"(pg_notify, {batch} per transaction) on the listened channel; nobody calls the cache")
        print(f"   queue after {ingest:.1f} s: {queued} events held (PGEventQueue max_size=0, unbounded); "
              f"RSS {rss0:.0f} -> {rss1:.0f} MB (+{rss1 - rss0:.0f} MB)")
        print(f"   then {reads} reads of one warm key: {misses} misses (each call drains one event and "
              f"clears the cache); {listener.qsize()} events still queued")
    finally:
        for c in (writer, reader, lconn):
            await c.close()


async def section(name: str, coro: Awaitable[None], timeout: float) -> None:
    try:
        await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        print(f"   {name}: TIMEOUT after {timeout:.0f} s (the library or database hung)")
    except Exception as e:  # report and go on with the next section
        print(f"   {name}: FAILED: {type(e).__name__}: {e}")
    print(flush=True)


async def main() -> None:
    args = parse_args()
    if args.updates < 300:
        sys.exit("--updates must be >= 300")
    names = Names()
    url = args.database_url
    admin = await connect(url)
    server = await admin.fetchval("SHOW server_version")
    print(f"PGCacheWatch {pgcachewatch.__version__} baseline, Python {platform.python_version()}, "
          f"asyncpg {asyncpg.__version__}, PostgreSQL {server}, {os.cpu_count()} CPUs")
    print(f"table {names.table}, channel {names.channel}; triggers installed by "
          "`python -m pgcachewatch install --channel-name ... --commit` (statement-level, "
          "payload {operation, table, sent_at: NOW()})")
    print()
    try:
        for t in (names.table, names.floor_table):
            await admin.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v bigint NOT NULL)")
            await admin.execute(
                f"INSERT INTO {t} SELECT g, 0 FROM generate_series(1, $1::int) g",
                max(args.keys, 3))
        await cli(url, "install", "--channel-name", names.channel, names.table)
        await cli(url, "install", "--channel-name", names.floor_channel, names.floor_table)

        await section("1", hit_throughput(args, names), 300)
        await section("2", fresh_latency(args, names), 300)
        await section("3", shared_listener(args, names), 60)
        await section("4", killed_connection(args, names), 60)
        if args.storm_events > 0:
            await section("5", write_storm(args, names), 300)
    finally:
        for ch in (names.channel, names.floor_channel):
            try:
                await cli(url, "uninstall", "--channel-name", ch)
            except Exception as e:
                print(f"cleanup: uninstall {ch} failed: {e}")
        for t in (names.table, names.floor_table):
            await admin.execute(f"DROP TABLE IF EXISTS {t}")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
