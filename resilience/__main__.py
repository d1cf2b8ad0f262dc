"""resilience: the demo, and tools for the operator at 3 a.m.

resilience demo [--redis URL] [--postgres DSN]
resilience breakers --redis URL                   breaker states every instance shares
resilience force NAME open|closed|auto --redis URL
resilience buckets --redis URL [--prefix rl]      token-bucket levels kept in Redis
resilience outbox stats|dead|replay|purge (--sqlite PATH | --postgres DSN)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

__all__ = ["main"]


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilience", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole story in one run (no servers needed)")
    demo.add_argument("--redis", metavar="URL", help="use this Redis for limiter and cache")
    demo.add_argument("--postgres", metavar="DSN", help="use this PostgreSQL for the outbox")
    demo.add_argument("--fast", action="store_true", help="shorter pauses (for tests)")

    breakers = sub.add_parser("breakers", help="breaker states shared through Redis")
    _redis_args(breakers, "resilience:breaker")

    force = sub.add_parser("force", help="force a shared breaker open or closed, or lift it")
    force.add_argument("name")
    force.add_argument("state", choices=["open", "closed", "auto"])
    _redis_args(force, "resilience:breaker")

    buckets = sub.add_parser("buckets", help="token-bucket levels kept in Redis")
    _redis_args(buckets, "rl")
    buckets.add_argument("--match", default="*", help="glob over bucket keys (default: all)")
    buckets.add_argument("--rate", type=float, help="tokens/s, for limiters with custom names")
    buckets.add_argument("--capacity", type=float, help="capacity, with --rate")
    buckets.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")

    outbox = sub.add_parser("outbox", help="outbox backlog, dead events, replay, purge")
    outbox.add_argument("action", choices=["stats", "dead", "replay", "purge"])
    where = outbox.add_mutually_exclusive_group(required=True)
    where.add_argument("--sqlite", metavar="PATH")
    where.add_argument("--postgres", metavar="DSN")
    outbox.add_argument("--schema", help="PostgreSQL schema of the table")
    outbox.add_argument("--table", default="resilience_outbox")
    outbox.add_argument("--topic")
    outbox.add_argument("--key")
    outbox.add_argument("--id", type=int, action="append", dest="ids", help="repeatable")
    outbox.add_argument("--error", help="replay rows whose last error contains this")
    outbox.add_argument("--limit", type=int, default=100)
    outbox.add_argument(
        "--older-than", type=float, default=7 * 86400.0, help="purge: seconds (default a week)"
    )
    outbox.add_argument("--dead", action="store_true", help="purge: old dead rows too")
    return parser


def _redis_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--redis", metavar="URL", required=True, help="redis://host:6379/0")
    parser.add_argument("--prefix", default=prefix, help=f"key prefix (default {prefix})")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = {
        "demo": _demo,
        "breakers": _breakers,
        "force": _force,
        "buckets": _buckets,
        "outbox": _outbox,
    }[args.command]
    try:
        return command(args)
    except CliError as error:
        print(f"resilience {args.command}: error: {error}", file=sys.stderr)
        return 2


def _fail(message: str) -> NoReturn:
    raise CliError(message)


# -- output ------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


# -- Redis -------------------------------------------------------------------------------


def _redis(url: str) -> Any:
    import redis

    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        _fail(f"--redis must be a redis:// URL, got {url!r}")
    try:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        client.ping()
    except ValueError as error:
        _fail(f"--redis {url!r}: {error}")
    except redis.RedisError as error:
        _fail(f"cannot reach Redis at {url}: {error}")
    return client


def _breakers(args: argparse.Namespace) -> int:
    from resilience.breaker.store import RedisBreakerStore

    client = _redis(args.redis)
    store = RedisBreakerStore(client, prefix=args.prefix)
    now = _now()
    rows = [
        (
            r["name"],
            r.get("instance") or "-",
            r.get("state", "-"),
            _age(now - float(r["since"])) if "since" in r else "-",
            r.get("trips", "-"),
            r.get("force") or "-",
        )
        for r in store.states()
    ]
    store.close()
    if not rows:
        print(f"no breakers share state under {args.prefix!r}")
        return 0
    print(_table(["breaker", "instance", "state", "for", "trips", "forced"], rows))
    return 0


def _force(args: argparse.Namespace) -> int:
    from resilience.breaker.store import RedisBreakerStore

    store = RedisBreakerStore(_redis(args.redis), prefix=args.prefix)
    store.force(args.name, None if args.state == "auto" else args.state)
    store.close()
    what = "lifted: the breaker decides again" if args.state == "auto" else f"forced {args.state}"
    print(f"{args.name}: {what} (instances apply it within their store interval)")
    return 0


_DEFAULT_NAME = re.compile(r"^(?P<capacity>[0-9.e+-]+)@(?P<rate>[0-9.e+-]+)/s$")


def _buckets(args: argparse.Namespace) -> int:
    client = _redis(args.redis)
    if (args.rate is None) != (args.capacity is None):
        _fail("--rate and --capacity go together")
    seconds, micros = client.time()
    now_us = seconds * 1_000_000 + micros
    rows = []
    pattern = f"{args.prefix}:{{{args.match}}}:*" if args.match != "*" else f"{args.prefix}:*"
    for raw in client.scan_iter(match=pattern, count=1000):
        key = raw.decode()
        head, sep, name = key.rpartition(":")
        if not sep or not head.startswith(f"{args.prefix}:{{") or not head.endswith("}"):
            continue
        rate, capacity = args.rate, args.capacity
        match = _DEFAULT_NAME.match(name)
        if rate is None and match:
            rate, capacity = float(match["rate"]), float(match["capacity"])
        value = client.get(raw)
        if value is None:
            continue  # expired while we looked: full again
        ahead = max(0.0, float(value) - now_us) / 1e6
        level = "-" if rate is None else f"{max(0.0, capacity - ahead * rate):.2f}/{capacity:g}"
        rows.append((head[len(args.prefix) + 2 : -1], name, level, f"{ahead:.2f}s"))
        if len(rows) >= args.limit:
            break
    client.close()
    if not rows:
        print("no buckets below capacity (a full bucket has no key)")
        return 0
    print(_table(["key", "limiter", "tokens", "full in"], sorted(rows)))
    return 0


# -- outbox ------------------------------------------------------------------------------


def _outbox_store(args: argparse.Namespace) -> Any:
    from resilience.integrations.outbox import PostgresOutboxStore, SqliteOutboxStore

    try:
        if args.sqlite:
            import os

            if not os.path.exists(args.sqlite):
                _fail(f"--sqlite {args.sqlite!r}: no such file")
            return SqliteOutboxStore(args.sqlite, table=args.table)
        if urlsplit(args.postgres).scheme not in ("postgres", "postgresql") and "=" not in str(
            args.postgres
        ):
            _fail(
                f"--postgres must be a postgresql:// URL or a key=value DSN, got {args.postgres!r}"
            )
        return PostgresOutboxStore(args.postgres, table=args.table, schema=args.schema)
    except (TypeError, ValueError) as error:
        _fail(str(error))


def _outbox(args: argparse.Namespace) -> int:
    store = _outbox_store(args)
    try:
        return _outbox_action(store, args)
    except Exception as error:
        if type(error).__module__.split(".")[0] in ("psycopg", "sqlite3") or isinstance(
            error, OSError
        ):
            _fail(f"cannot use the outbox store: {error}".strip())
        raise
    finally:
        store.close()


def _outbox_action(store: Any, args: argparse.Namespace) -> int:
    if args.action == "stats":
        s = store.stats()
        print(
            _table(
                ["pending", "in flight", "dead", "oldest pending", "blocked keys"],
                [(s.pending, s.in_flight, s.dead, _age(s.oldest_pending_age), s.blocked_keys)],
            )
        )
    elif args.action == "dead":
        rows = [
            (d.id, d.event_id, d.topic, d.key or "-", d.attempts, (d.last_error or "")[:60])
            for d in store.dead(topic=args.topic, limit=args.limit)
        ]
        if not rows:
            print("no dead events")
        else:
            print(_table(["id", "event id", "topic", "key", "attempts", "last error"], rows))
    elif args.action == "replay":
        moved = store.replay(
            ids=args.ids, topic=args.topic, key=args.key, error=args.error, limit=args.limit
        )
        print(f"replayed {moved} dead event(s); running relays publish them through their breaker")
    else:
        deleted = store.purge(args.older_than, dead=args.dead)
        print(f"purged {deleted} row(s) older than {_age(args.older_than)}")
    return 0


def _now() -> float:
    from resilience._clock import SYSTEM_CLOCK

    return SYSTEM_CLOCK.time()


def _demo(args: argparse.Namespace) -> int:
    from resilience._demo import main as demo

    return demo(redis_url=args.redis, postgres_dsn=args.postgres, fast=args.fast)


if __name__ == "__main__":
    sys.exit(main())
