"""resilience: the demo, and tools for the operator at 3 a.m.

resilience demo [--redis URL] [--postgres DSN]
resilience breakers --redis URL                   breaker states every instance shares
resilience force NAME open|closed|auto --redis URL [--anyway]
resilience buckets --redis URL [--prefix rl]      token-bucket levels kept in Redis
resilience outbox stats|dead|replay|purge (--sqlite PATH | --postgres DSN)

Every error is one line on stderr and exit status 2. `resilience COMMAND --help` says more.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from resilience import __version__

__all__ = ["main"]


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="resilience", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"resilience {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="COMMAND --help for its options"
    )

    demo = _command(
        sub, "demo", _demo, "the whole story in one run (no servers needed)",
        "A shop served on a loopback port and driven by a real HTTP client: orders rate\n"
        "limited and written with an outbox event, product pages cached, a relay publishing\n"
        "through a breaker to a broker that goes down and comes back.",
    )  # fmt: skip
    demo.add_argument("--redis", metavar="URL", help="use this Redis for limiter and cache")
    demo.add_argument("--postgres", metavar="DSN", help="use this PostgreSQL for the outbox")
    demo.add_argument("--fast", action="store_true", help="shorter pauses (for tests)")

    breakers = _command(
        sub, "breakers", _breakers, "breaker states shared through Redis",
        "Every breaker instance that shares its state through a RedisBreakerStore: state,\n"
        "for how long, trips, and any override set with `resilience force`.",
    )  # fmt: skip
    _redis_args(breakers, "resilience:breaker")

    force = _command(
        sub, "force", _force, "force a shared breaker open or closed, or lift it",
        "Force a shared breaker open or closed on every instance (they apply it within their\n"
        "store interval), or lift the override with `auto`. A name no instance reports is\n"
        "refused (exit status 2) unless --anyway is given.",
    )  # fmt: skip
    force.add_argument("name", metavar="NAME", help="the breaker's name, as `breakers` lists it")
    force.add_argument(
        "state",
        metavar="STATE",
        choices=["open", "closed", "auto"],
        help="open: reject calls; closed: let every call through; auto: lift the override",
    )
    _redis_args(force, "resilience:breaker")
    force.add_argument(
        "--anyway",
        action="store_true",
        help="set it although no instance reports the name (instances that start later apply it)",
    )
    force.add_argument(
        "--for",
        dest="duration",
        metavar="SECONDS",
        type=_seconds_arg,
        help="with open: only this long (on Redis's clock); then every instance probes",
    )

    buckets = _command(
        sub, "buckets", _buckets, "token-bucket levels kept in Redis",
        "Token-bucket levels kept in Redis by RedisBackend. A full bucket has no key, so only\n"
        "partly used buckets show.",
    )  # fmt: skip
    _redis_args(buckets, "rl")
    buckets.add_argument(
        "--match", metavar="KEY", default="*", help="glob over bucket keys (default: all)"
    )
    buckets.add_argument(
        "--rate", metavar="R", type=_positive, help="tokens/s, for limiters with custom names"
    )
    buckets.add_argument("--capacity", metavar="C", type=_positive, help="capacity, with --rate")
    buckets.add_argument(
        "--limit", metavar="N", type=_count, default=50, help="rows to show (default 50)"
    )

    outbox = sub.add_parser(
        "outbox",
        help="outbox backlog, dead events, replay, purge",
        description="Look at an outbox table and act on its dead and old rows.",
    )
    actions = outbox.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="ACTION --help for its options"
    )

    stats = _command(
        actions, "stats", _outbox(_stats), "pending, in flight, dead, oldest pending, blocked keys",
        "Pending, in flight and dead rows, the oldest pending row's age, and the keys whose\n"
        "head event is backing off (the events queued behind it wait).",
    )  # fmt: skip
    _where(stats)

    dead = _command(
        actions, "dead", _outbox(_dead), "dead events with their last error",
        "Dead events, oldest first, with their attempts and last error.",
    )  # fmt: skip
    _where(dead)
    dead.add_argument("--topic", metavar="T", help="only events of this topic")
    dead.add_argument(
        "--limit", metavar="N", type=_count, default=100, help="rows to show (default 100)"
    )

    replay = _command(
        actions, "replay", _outbox(_replay), "move matching dead events back to pending",
        "Move the dead events matching every given filter back to pending, attempts reset.\n"
        "Without a filter, every dead event. Running relays publish them through their\n"
        "breaker.",
    )  # fmt: skip
    _where(replay)
    replay.add_argument(
        "--id", metavar="N", type=_count, action="append", dest="ids",
        help="this row id (repeatable)",
    )  # fmt: skip
    replay.add_argument("--topic", metavar="T", help="only events of this topic")
    replay.add_argument("--key", metavar="K", help="only events of this key")
    replay.add_argument(
        "--error", metavar="TEXT", help="only events whose last error contains TEXT"
    )
    replay.add_argument(
        "--limit", metavar="N", type=_count,
        help="at most N events (default: every match dead when the replay starts)",
    )  # fmt: skip

    purge = _command(
        actions, "purge", _outbox(_purge), "forget old published (and dead) events",
        "Forget published events older than --older-than (SQLite: their rows; PostgreSQL:\n"
        "their kept event ids), a thousand per transaction so no lock is held long; with\n"
        "--dead, old dead rows too. A forgotten event id may be enqueued again.",
    )  # fmt: skip
    _where(purge)
    purge.add_argument(
        "--older-than", metavar="SECONDS", type=_positive, default=7 * 86400.0,
        help="age in seconds (default 604800, a week)",
    )  # fmt: skip
    purge.add_argument("--dead", action="store_true", help="dead rows older than that too")
    return parser


def _command(
    sub: argparse._SubParsersAction[_Parser],
    name: str,
    run: Callable[[argparse.Namespace], int],
    summary: str,
    description: str,
) -> _Parser:
    parser = sub.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.set_defaults(run=run, parser=parser)
    return parser


def _redis_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    parser.add_argument("--redis", metavar="URL", required=True, help="redis://host:6379/0")
    parser.add_argument("--prefix", default=prefix, help=f"key prefix (default {prefix})")


def _where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sqlite", metavar="PATH", help="the SQLite file holding the outbox")
    where.add_argument(
        "--postgres", metavar="DSN", help="postgresql://user@host/db or a key=value DSN"
    )
    parser.add_argument("--schema", metavar="S", help="the table's schema (with --postgres)")
    parser.add_argument(
        "--table", metavar="T", default="resilience_outbox",
        help="the outbox table (default resilience_outbox)",
    )  # fmt: skip


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # Reported by the subcommand, so `outbox replay --older-than 5` names replay.
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, --version, or a usage error (already printed)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return int(args.run(args))
    except CliError as error:
        message = str(error)
    except ImportError as error:
        message = _missing(error)
    except Exception as error:
        if not _is_service_error(error):
            raise
        message = f"{type(error).__name__}: {error}"
    print(f"{args.parser.prog}: error: {_one_line(message)}", file=sys.stderr)
    return 2


def _fail(message: str) -> NoReturn:
    raise CliError(message)


def _is_service_error(error: Exception) -> bool:
    module = type(error).__module__.split(".")[0]
    return module in ("redis", "psycopg", "sqlite3") or isinstance(error, OSError)


def _one_line(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("LINE "):
            break  # psycopg's quote of the SQL and a caret follow: noise for an operator
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or "failed without a message"


# The extras (pyproject.toml) that install the modules an optional feature imports.
_EXTRAS = {
    "psycopg": "postgres",
    "psycopg_pool": "postgres",
    "starlette": "demo",
    "uvicorn": "demo",
    "httpx": "demo",
    "msgpack": "msgpack",
    "aio_pika": "rabbitmq",
    "nats": "nats",
}


def _missing(error: ImportError) -> str:
    cause: BaseException | None = error
    while cause is not None:
        name = getattr(cause, "name", None) or ""
        extra = _EXTRAS.get(name.split(".")[0])
        if extra:
            return f"{name} is not installed: pip install 'resilience[{extra}]'"
        cause = cause.__cause__
    return str(error)


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


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _force(args: argparse.Namespace) -> int:
    from resilience.breaker.store import RedisBreakerStore

    store = RedisBreakerStore(_redis(args.redis), prefix=args.prefix)
    try:
        rows = [r for r in store.states() if r["name"] == args.name]
        # A row without an instance is an override alone: nobody runs that breaker.
        running = sum(1 for r in rows if r.get("instance"))
        if args.state == "auto":
            forced = any(r.get("force") for r in rows)
            store.force(args.name, None)  # even so: an override may have appeared since
            if forced:
                print(f"{args.name}: lifted: the breaker decides again "
                      "(instances apply it within their store interval)")  # fmt: skip
            else:
                print(f"{args.name}: nothing to lift (no override under {args.prefix!r})")
            return 0
        if args.duration is not None and args.state != "open":
            _fail(f"--for goes with open only, not {args.state}")
        if not running and not args.anyway:
            _fail(
                f"no instance reports breaker {args.name!r} under prefix {args.prefix!r} "
                "(nothing set; check the name and --prefix with `resilience breakers`, "
                "or pass --anyway to force it for instances that start later)"
            )
        store.force(args.name, args.state, duration=args.duration)
    finally:
        store.close()
    state = args.state if args.duration is None else f"{args.state} for {args.duration:g}s"
    if running:
        print(f"{args.name}: forced {state} on {running} instance(s) "
              "(they apply it within their store interval)")  # fmt: skip
    else:
        print(f"{args.name}: forced {state}; no instance reports it yet, "
              "instances that start later will apply it")  # fmt: skip
    return 0


def _buckets(args: argparse.Namespace) -> int:
    from resilience.limiter.redis import bucket_levels

    if (args.rate is None) != (args.capacity is None):
        _fail("--rate and --capacity go together")
    client = _redis(args.redis)
    rows = []
    try:
        levels = bucket_levels(
            client, args.prefix, match=args.match, rate=args.rate, capacity=args.capacity
        )
        for level in levels:
            tokens = "-" if level.tokens is None else f"{level.tokens:.2f}/{level.capacity:g}"
            rows.append((level.key, level.name, tokens, f"{level.full_in:.2f}s"))
            if len(rows) >= args.limit:
                break
    except ValueError as error:  # a --rate and --capacity no Limit takes
        _fail(str(error))
    finally:
        client.close()
    if not rows:
        print("no buckets below capacity (a full bucket has no key)")
        return 0
    print(_table(["key", "limiter", "tokens", "full in"], sorted(rows)))
    if len(rows) >= args.limit:
        print(f"(stopped at --limit {args.limit}; more may match)")
    return 0


# -- outbox ------------------------------------------------------------------------------


def _outbox_store(args: argparse.Namespace) -> Any:
    from resilience.integrations.outbox import PostgresOutboxStore, SqliteOutboxStore

    try:
        if args.sqlite:
            import os

            if args.schema is not None:
                _fail("--schema is for --postgres (a SQLite file has no schemas)")
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


Action = Callable[[Any, argparse.Namespace], int]


def _outbox(action: Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        store = _outbox_store(args)
        try:
            return action(store, args)
        except (TypeError, ValueError) as error:
            _fail(str(error))  # a value the store refuses (argparse checks the known ones)
        except Exception as error:
            if not _is_service_error(error):
                raise
            if _no_table(error):
                name = getattr(store, "qualified", store.table)
                _fail(
                    f"the outbox table {name!r} does not exist: create it with "
                    f"{type(store).__name__}(...).create_schema() (idempotent)"
                )
            _fail(f"cannot use the outbox store: {error}")
        finally:
            store.close()

    return run


def _no_table(error: Exception) -> bool:
    if isinstance(error, sqlite3.OperationalError):
        return str(error).startswith("no such table")
    return getattr(error, "sqlstate", None) == "42P01"  # psycopg's UndefinedTable


def _stats(store: Any, args: argparse.Namespace) -> int:
    s = store.stats()
    print(
        _table(
            ["pending", "in flight", "dead", "oldest pending", "blocked keys"],
            [(s.pending, s.in_flight, s.dead, _age(s.oldest_pending_age), s.blocked_keys)],
        )
    )
    return 0


def _dead(store: Any, args: argparse.Namespace) -> int:
    rows = [
        (d.id, d.event_id, d.topic, d.key or "-", d.attempts, (d.last_error or "")[:60])
        for d in store.dead(topic=args.topic, limit=args.limit)
    ]
    if not rows:
        print("no dead events")
        return 0
    print(_table(["id", "event id", "topic", "key", "attempts", "last error"], rows))
    if len(rows) >= args.limit:
        print(f"(stopped at --limit {args.limit}; more may be dead)")
    return 0


_REPLAY_CHUNK = 1000  # rows per store call: one short transaction each


def _replay(store: Any, args: argparse.Namespace) -> int:
    # Bounded by the dead count at the start: an event that dies again at once (a relay
    # is running) must not be replayed over and over by this one command.
    budget = store.stats().dead
    if args.limit is not None:
        budget = min(budget, args.limit)
    moved = 0
    while moved < budget:
        chunk = min(_REPLAY_CHUNK, budget - moved)
        n = store.replay(ids=args.ids, topic=args.topic, key=args.key, error=args.error,
                         limit=chunk)  # fmt: skip
        moved += n
        if n < chunk:
            break
    print(f"replayed {moved} dead event(s); running relays publish them through their breaker")
    if args.limit is not None and moved >= args.limit:
        print(f"(stopped at --limit {args.limit}; more may match)")
    return 0


def _purge(store: Any, args: argparse.Namespace) -> int:
    deleted = store.purge(args.older_than, dead=args.dead)
    print(f"purged {deleted} event(s) older than {_age(args.older_than)}")
    return 0


def _now() -> float:
    from resilience._clock import SYSTEM_CLOCK

    return SYSTEM_CLOCK.time()


def _demo(args: argparse.Namespace) -> int:
    from resilience._demo import main as demo

    return demo(redis_url=args.redis, postgres_dsn=args.postgres, fast=args.fast)


if __name__ == "__main__":
    sys.exit(main())
