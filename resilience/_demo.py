"""`resilience demo`: one shop, one story, on embedded defaults.

A Starlette app served by uvicorn on a free loopback port, driven by a real HTTP client:
orders are rate limited per client and write an outbox event in the same SQLite
transaction; product pages are cached; a relay publishes the events to a broker through a
circuit breaker. Then the broker goes down, and comes back. ``--redis`` puts the limiter
and the cache in Redis; ``--postgres`` puts the outbox in PostgreSQL.

This module reads real time on purpose: the demo is watched by people.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import resilience as rs

__all__ = ["main"]

_START = time.monotonic()


def _say(line: str) -> None:
    _clear()
    print(f"[{time.monotonic() - _START:5.1f}s] {line}", flush=True)


_live = {"shown": False}


def _progress(line: str) -> None:
    if sys.stdout.isatty():
        print(f"\r\033[2K        {line}", end="", flush=True)
        _live["shown"] = True


def _clear() -> None:
    if _live["shown"]:
        print("\r\033[2K", end="")
        _live["shown"] = False


class _Server:
    """uvicorn in a thread, on a socket bound before it starts (so the port is known)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _require_web() -> None:
    try:
        import httpx  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"the demo needs starlette, uvicorn and httpx ({error.name} is missing): "
            "pip install 'resilience[demo]', or run `make demo`"
        ) from None


class Shop:
    """The demo's moving parts, on embedded defaults or the servers given."""

    def __init__(self, redis_url: str | None, postgres_dsn: str | None, fast: bool) -> None:
        from prometheus_client import CollectorRegistry

        from resilience.integrations.outbox import (
            InMemoryBroker,
            OutboxPublisher,
            PostgresOutboxStore,
            SqliteOutboxStore,
        )
        from resilience.metrics import Metrics

        self.fast = fast
        self.tally: Counter[str] = Counter()
        self.verdicts: dict[str, bool] = {}  # printed as the story said them: True/False
        self.tag = uuid.uuid4().hex[:8]
        self.dir = tempfile.TemporaryDirectory(prefix="resilience-demo-")
        self.cleanups: list[Callable[[], None]] = []
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)

        # The shop's own database: SQLite, or PostgreSQL with --postgres.
        self.postgres_dsn = postgres_dsn
        if postgres_dsn:
            import psycopg

            self.schema = f"resilience_demo_{self.tag}"
            with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                conn.execute(f"CREATE SCHEMA {self.schema}")
            self.cleanups.append(self._drop_schema)
            self.store: Any = PostgresOutboxStore(postgres_dsn, schema=self.schema)
            self.where_outbox = f"PostgreSQL schema {self.schema}"
        else:
            self.db_path = Path(self.dir.name) / "shop.db"
            self.store = SqliteOutboxStore(self.db_path)
            self.where_outbox = f"SQLite {self.db_path}"
        self.store.create_schema()

        backend: Any = None
        remote: Any = None
        self.where_state = "process memory"
        self.async_closers: list[Callable[[], Any]] = []
        if redis_url:
            import redis
            import redis.asyncio

            client = redis.Redis.from_url(redis_url)
            client.ping()
            # The app runs on uvicorn's event loop: its Redis client is an asyncio one.
            aclient = redis.asyncio.Redis.from_url(redis_url)
            prefix = f"resilience-demo:{self.tag}"
            backend = rs.RedisBackend(aclient, prefix=f"{prefix}:rl")
            remote = rs.RedisCache(aclient, prefix=f"{prefix}:c")
            self.where_state = f"Redis {redis_url}"
            self.async_closers += [remote.aclose, backend.aclose, aclient.aclose]

            def forget() -> None:
                keys = list(client.scan_iter(match=f"{prefix}:*"))
                if keys:
                    client.unlink(*keys)
                client.close()

            self.cleanups.append(forget)
        self.limiter = rs.TokenBucket(rate=2.0, capacity=10, backend=backend, name="orders")
        self.cache = rs.TwoTierCache(
            local=rs.LocalCache(max_entries=1000, ttl=30.0), remote=remote, ttl=60.0, name="pages"
        )
        self.broker = InMemoryBroker()
        self.breaker = rs.CircuitBreaker(
            "broker", failure_threshold=3, recovery_timeout=1.0 if fast else 2.0
        )
        self.breaker.add_listener(self._breaker_changed, only=(rs.StateChanged,))
        self.publisher = OutboxPublisher(
            self.store,
            broker=self.broker,
            breaker=self.breaker,
            batch_size=50,
            min_poll=0.02,
            max_poll=0.2,
            name="shop",
        )
        self.metrics.watch(self.limiter, self.cache, self.publisher)
        self.loader_calls = 0

    def _drop_schema(self) -> None:
        import psycopg

        assert self.postgres_dsn is not None
        with psycopg.connect(self.postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")

    def _breaker_changed(self, event: object) -> None:
        assert isinstance(event, rs.StateChanged)
        self.tally[f"breaker -> {event.new.value}"] += 1
        _say(f"breaker {event.old.value} -> {event.new.value.upper()} ({event.trigger.value})")

    def close(self) -> None:
        self.store.close()
        for cleanup in reversed(self.cleanups):
            cleanup()
        self.dir.cleanup()

    # -- the app -------------------------------------------------------------------------

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Mount, Route

        from resilience.integrations.asgi import RateLimitMiddleware, header, metrics_app

        async def order(request: Request) -> JSONResponse:
            body = await request.json()
            order_id = f"o-{uuid.uuid4().hex[:8]}"
            self._save_order(order_id, body)
            return JSONResponse({"id": order_id}, status_code=201)

        async def product(request: Request) -> JSONResponse:
            sku = request.path_params["sku"]

            async def load() -> dict[str, str]:
                self.loader_calls += 1
                await asyncio.sleep(0.3)  # the slow catalogue service
                return {"sku": sku, "name": f"Product {sku}"}

            return JSONResponse(await self.cache.aget_or_load(f"product:{sku}", load))

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            # Close what lives on this event loop, on this event loop.
            for close in self.async_closers:
                await close()
            if not self.async_closers:
                self.cache.close()

        app = Starlette(
            lifespan=lifespan,
            routes=[
                Route("/orders", order, methods=["POST"]),
                Route("/products/{sku}", product),
                Mount("/metrics", metrics_app(self.registry)),
            ],
        )
        return RateLimitMiddleware(
            app,
            limiter=self.limiter,
            key=header("x-client"),
            exempt=["/products", "/metrics"],
            name=self.limiter.name,  # the RateLimit policy says "orders", as the limiter
        )

    def _save_order(self, order_id: str, body: dict[str, Any]) -> None:
        event = {"order": order_id, **body}
        if self.postgres_dsn:
            import psycopg

            with psycopg.connect(self.postgres_dsn) as pg:
                self.store.enqueue(pg, topic="orders", key=body["customer"], payload=event)
            return
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            self.store.enqueue(conn, topic="orders", key=body["customer"], payload=event)
        conn.close()


async def _story(shop: Shop, base_url: str) -> None:
    import httpx

    pause = 0.2 if shop.fast else 0.8
    sent: dict[str, list[int]] = {}
    relay = asyncio.ensure_future(shop.publisher.run())

    async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:

        async def buy(customer: str, n: int) -> int:
            response = await client.post(
                "/orders", json={"customer": customer, "n": n}, headers={"x-client": customer}
            )
            if response.status_code == 201:
                sent.setdefault(customer, []).append(n)
                shop.tally["orders accepted"] += 1
            else:
                shop.tally["orders refused (429)"] += 1
            return response.status_code

        _say(f"shop on {base_url}; outbox in {shop.where_outbox}; limits in {shop.where_state}")
        _say("1. traffic flows: 4 customers place 5 orders each")
        for n in range(5):
            for customer in ("ann", "bob", "cy", "dee"):
                await buy(customer, n)
        await _drain(shop, "relaying")
        _say(f"   {len(shop.broker.messages)} events published; breaker {shop.breaker.state.value}")
        await asyncio.sleep(pause)

        _say("2. a client bursts: eve sends 15 orders at once, then one more (10 tokens, 2/s)")
        codes = Counter(await asyncio.gather(*(buy("eve", n) for n in range(15))))
        response = await client.post(
            "/orders", json={"customer": "eve", "n": 99}, headers={"x-client": "eve"}
        )
        shop.tally["orders refused (429)"] += response.status_code == 429
        _say(
            f"   {codes[201]} accepted, {codes[429]} refused with 429; the one more got "
            f"{response.status_code}, Retry-After: {response.headers.get('retry-after')}s, "
            f"RateLimit: {response.headers.get('ratelimit')}"
        )
        await asyncio.sleep(pause)

        _say("3. a cold page: 50 visitors ask for product p-1 at the same moment")
        started = time.monotonic()
        pages = await asyncio.gather(*(client.get("/products/p-1") for _ in range(50)))
        took = time.monotonic() - started
        _say(
            f"   50 x {pages[0].status_code} in {took * 1000:.0f} ms; "
            f"the catalogue was asked {shop.loader_calls} time(s)"
        )
        shop.tally["catalogue loads for 50 visitors"] = shop.loader_calls
        await asyncio.sleep(pause)

        _say("4. the broker goes down; orders keep coming")
        shop.broker.down = True
        contacts = shop.broker.contacts
        for n in range(5, 15):
            for customer in ("ann", "bob", "cy", "dee"):
                await buy(customer, n)
            await asyncio.sleep(0.05 if shop.fast else 0.15)
            await _show(shop)
        stats = await shop.publisher.astats()
        _clear()
        _say(
            f"   {stats.pending} events wait in the outbox; attempts burned: "
            f"{await _max_attempts(shop)}; dead: {stats.dead}; broker contacted "
            f"{shop.broker.contacts - contacts} time(s) (probes included)"
        )
        shop.tally["events pending at the worst"] = stats.pending
        await asyncio.sleep(pause * 2)

        _say("5. the broker is back")
        shop.broker.down = False
        await _drain(shop, "draining")
        # Eve's burst was concurrent, so her orders have no order to keep.
        ordered = all(
            [e.json()["n"] for e in shop.broker.by_key().get(c, [])] == ns
            for c, ns in sent.items()
            if c != "eve"
        )
        delivered = len({e.event_id for e in shop.broker.messages})
        total = sum(len(v) for v in sent.values())
        _say(f"   delivered {delivered}/{total}; per-customer order kept: {ordered}")
        shop.tally["events delivered"] = delivered
        shop.tally["events accepted"] = total
        shop.verdicts["per-key order kept"] = ordered
        metrics = (await client.get("/metrics", follow_redirects=True)).text
        published = _metric(metrics, 'resilience_outbox_published_total{outbox="shop"}')
        _say(f"   /metrics: resilience_outbox_published_total = {published:g}")

    relay.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await relay


async def _drain(shop: Shop, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = await _show(shop, what)
        if stats.pending == 0:
            _clear()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the outbox did not drain within 60 s")


async def _show(shop: Shop, what: str = "outage") -> Any:
    stats = await shop.publisher.astats()
    _progress(
        f"{what}: pending {stats.pending:3d}  published {len(shop.broker.messages):3d}  "
        f"breaker {stats.breaker_state}"
    )
    return stats


async def _max_attempts(shop: Shop) -> int:
    def read() -> int:
        table = getattr(shop.store, "qualified", shop.store.table)
        with shop.store._transaction(read=True) as tx:
            row = tx.fetch(f"SELECT coalesce(max(attempts), 0) FROM {table}", {})
        return int(row[0][0])

    import anyio.to_thread

    return await anyio.to_thread.run_sync(read)


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def main(redis_url: str | None = None, postgres_dsn: str | None = None, fast: bool = False) -> int:
    _require_web()
    started = time.monotonic()
    # The story narrates every transition itself: without a logging set-up of the
    # user's, Python's last-resort handler would print the breaker's log lines too.
    quiet = logging.NullHandler()
    logger = logging.getLogger("resilience")
    if not logging.getLogger().handlers:
        logger.addHandler(quiet)
    shop = Shop(redis_url, postgres_dsn, fast)
    try:
        with _Server(shop.app()) as server:
            asyncio.run(_story(shop, f"http://127.0.0.1:{server.port}"))
    finally:
        shop.close()
        logger.removeHandler(quiet)
    seconds = round(time.monotonic() - started, 1)
    print("\n== Summary")
    rows: list[tuple[str, object]] = [*shop.tally.items(), *shop.verdicts.items()]
    width = max(len(k) for k, _ in rows)
    for key, value in [*rows, ("seconds", seconds)]:
        print(f"  {key:<{width}}  {value}")
    return 0 if shop.tally["events delivered"] == shop.tally["events accepted"] else 1
