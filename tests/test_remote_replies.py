"""The command layer's batches on a real Redis: ``run_many``/``arun_many`` read every
reply in order, an error reply in its place, and a connection that stops answering is
a redis TimeoutError within the budget and is dropped, not handed to the next caller."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
import redis.exceptions
from support.faultproxy import FaultProxy

from resilience import remote

pytestmark = pytest.mark.redis


def packed(*commands: tuple[str, ...]) -> bytes:
    """Commands as RESP, by hand: what a caller of run_many pre-packs."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def batch(prefix: str, n: int, bad_at: int) -> bytes:
    """n XADDs to one stream, but the bad_at-th goes to a string key: WRONGTYPE."""
    return packed(
        *(
            ("XADD", f"{prefix}:str" if i == bad_at else f"{prefix}:s", "*", "n", str(i))
            for i in range(n)
        )
    )


def check(replies: list[object], n: int, bad_at: int) -> None:
    assert len(replies) == n
    for i, reply in enumerate(replies):
        if i == bad_at:
            assert isinstance(reply, redis.exceptions.ResponseError)
            assert str(reply).startswith("WRONGTYPE")
        else:
            assert isinstance(reply, bytes), (i, reply)
            assert b"-" in reply, (i, reply)  # a stream entry id


@pytest.fixture
def prepared(redis_client: redis.Redis, redis_prefix: str) -> str:
    redis_client.set(f"{redis_prefix}:str", "x")
    return redis_prefix


# Past 64 replies, so the async side's reads span several timeout windows.
@pytest.mark.parametrize(("n", "bad_at"), [(1, 0), (3, 1), (500, 0), (500, 257), (500, 499)])
def test_run_many_keeps_every_reply_in_place(
    redis_url: str, redis_client: redis.Redis, prepared: str, n: int, bad_at: int
) -> None:
    commands = remote.Commands(redis.Redis.from_url(redis_url), 2.0)
    try:
        check(commands.run_many(batch(prepared, n, bad_at), n), n, bad_at)
        assert commands.run("PING") == b"PONG"  # the connection is still in step
        assert redis_client.xlen(f"{prepared}:s") == n - 1
    finally:
        commands.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis.asyncio runs on asyncio only
@pytest.mark.parametrize(("n", "bad_at"), [(1, 0), (3, 1), (500, 0), (500, 257), (500, 499)])
async def test_arun_many_keeps_every_reply_in_place(
    redis_url: str, redis_client: redis.Redis, prepared: str, n: int, bad_at: int
) -> None:
    commands = remote.Commands(redis.asyncio.Redis.from_url(redis_url), 2.0)
    try:
        check(await commands.arun_many(batch(prepared, n, bad_at), n), n, bad_at)
        # Many batches on one pool, concurrently: no task reads another's replies.
        async with anyio.create_task_group() as tg:
            for _ in range(8):

                async def one() -> None:
                    for _ in range(5):
                        check(await commands.arun_many(batch(prepared, 130, 77), 130), 130, 77)

                tg.start_soon(one)
        assert await commands.arun("PING") == b"PONG"
        assert redis_client.xlen(f"{prepared}:s") == (n - 1) + 8 * 5 * 129
    finally:
        await commands.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_arun_many_answers_a_push_message_in_between_and_stays_in_step(
    redis_url: str, redis_client: redis.Redis, prepared: str
) -> None:
    """RESP3 (redis-py 8's default): a client-tracking invalidation arrives on the
    connection between two replies; it is not taken for one."""
    client = redis.asyncio.Redis.from_url(redis_url, protocol=3)
    commands = remote.Commands(client, 2.0)
    try:
        key = f"{prepared}:tracked"
        redis_client.set(key, "1")
        # One connection in the pool: tracking is turned on for the one the batches use.
        conn = await commands.client.connection_pool.get_connection()
        await commands.client.connection_pool.release(conn)
        replies = await commands.arun_many(packed(("CLIENT", "TRACKING", "ON"), ("GET", key)), 2)
        assert replies == [b"OK", b"1"]
        redis_client.set(key, "2")  # the server pushes an invalidation to that connection
        n = 100
        check(await commands.arun_many(batch(prepared, n, 40), n), n, 40)
        assert await commands.arun("GET", key) == b"2"
    finally:
        await commands.aclose()


def test_run_many_times_out_on_a_silent_server_and_drops_the_connection(
    proxy: FaultProxy, redis_url: str, prepared: str
) -> None:
    commands = remote.Commands(redis.Redis.from_url(proxy.url_for(redis_url)), 0.3)
    try:
        assert commands.run("PING") == b"PONG"
        proxy.blackhole()
        start = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            commands.run_many(batch(prepared, 200, 3), 200)
        assert time.monotonic() - start < 2.0
        proxy.restore()
        # A fresh connection, not the one with 200 replies still on their way.
        check(commands.run_many(batch(prepared, 10, 3), 10), 10, 3)
    finally:
        commands.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("fault", "error"),
    [("blackhole", redis.exceptions.TimeoutError), ("cut", redis.exceptions.ConnectionError)],
)
async def test_arun_many_on_a_silent_or_closed_server_raises_and_drops_the_connection(
    proxy: FaultProxy,
    redis_url: str,
    prepared: str,
    fault: str,
    error: type[redis.exceptions.RedisError],
) -> None:
    """A silent server is a TimeoutError within the budget, a closed one a ConnectionError:
    outages to the guard, and the connection with replies still due is not reused."""
    commands = remote.Commands(redis.asyncio.Redis.from_url(proxy.url_for(redis_url)), 0.3)
    try:
        assert await commands.arun("PING") == b"PONG"
        getattr(proxy, fault)()
        start = time.monotonic()
        with pytest.raises(error):
            await commands.arun_many(batch(prepared, 200, 3), 200)
        assert time.monotonic() - start < 2.0
        assert issubclass(error, remote.OUTAGE_ERRORS)
        proxy.restore()
        check(await commands.arun_many(batch(prepared, 10, 3), 10), 10, 3)
    finally:
        proxy.restore()
        await commands.aclose()


class _OlderConnection(redis.asyncio.Connection):
    """A connection as older redis-py releases had it: no _read_response_from_parser."""

    _read_response_from_parser = None  # type: ignore[assignment]

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - the signature it overrides
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        parser: Any = self._parser
        response = await parser.read_response(disable_decoding=disable_decoding)
        if isinstance(response, redis.exceptions.ResponseError):
            raise response
        return response


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_arun_many_on_an_older_redis_py_reads_through_read_response(
    redis_url: str, prepared: str
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, connection_class=_OlderConnection)
    commands = remote.Commands(client, 2.0)
    try:
        check(await commands.arun_many(batch(prepared, 130, 70), 130), 130, 70)
        assert await commands.arun("PING") == b"PONG"
    finally:
        await commands.aclose()
