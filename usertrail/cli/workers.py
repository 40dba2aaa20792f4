"""usertrail sink and usertrail stream: the long-running workers."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from usertrail import liveness
from usertrail.cli.common import add_rules_argument, at_least_one, rules_from
from usertrail.settings import Settings


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    lock = liveness.hold_worker_lock(settings, args.group)  # `replay db` sees this sink
    from usertrail.sink.consumer import SinkOptions, run_sink

    options = SinkOptions(
        group=args.group,
        unknown_users=args.unknown_users,
        batch_max_records=args.batch_max,
        batch_max_wait_ms=args.batch_wait_ms,
        writers=args.writers,
        on_log_reset=args.on_log_reset,
    )
    web = {"sink_web_host": args.web_host, "sink_web_port": args.web_port}
    settings = settings.model_copy(update={k: v for k, v in web.items() if v is not None})
    asyncio.run(run_sink(settings, options))
    lock.close()
    return 0


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    # first of all: from here on `replay stream` sees this worker
    lock = liveness.hold_worker_lock(settings, settings.stream_app_id)
    from usertrail.stream.app import run_worker

    rules = rules_from(args, settings)
    flags = {
        "stream_fold_process": args.fold_process,
        "stream_batch_max": args.batch_max,
        "stream_web_host": args.web_host,
        "stream_web_advertise": args.web_advertise,
        "stream_store": args.store,
    }
    settings = settings.model_copy(update={k: v for k, v in flags.items() if v is not None})
    try:
        run_worker(settings, rules, web_port=args.web_port or settings.stream_web_port)
    finally:
        lock.close()
    return 0


def _add_instance_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--instance-id",
        metavar="NAME",
        help="static group membership: this worker's name in its group, unique per process; "
        "restarted under the same name within the session timeout it takes its partitions "
        'back with no rebalance (docs/brokers.md, "Rebalance storms") '
        "[env USERTRAIL_GROUP_INSTANCE_ID; default: none, `up` names its own workers]",
    )


def add(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of this module, on ``sub``."""
    sink = sub.add_parser(
        "sink",
        parents=[common],
        help="write usertrail.events to PostgreSQL (a group member)",
        description="Consume usertrail.events and write the product's rows: interactions, "
        "preferences, erasures. Members of one group share the partitions; the "
        "position of each partition is stored with the rows, in one transaction. "
        "SIGTERM writes what the log holds (up to 10 s more) and exits.",
    )
    sink.add_argument(
        "--group", default="usertrail-sink", help="consumer group (default usertrail-sink)"
    )
    sink.add_argument(
        "--unknown-users",
        choices=["create", "park"],
        default="create",
        help='an event for a user missing from "User": create a minimal row '
        "(default) or park it as a dead letter (reason unknown_user)",
    )
    sink.add_argument(
        "--batch-max",
        type=at_least_one,
        default=20000,
        metavar="N",
        help="records fetched per batch at most, split among the writers (default 20000)",
    )
    sink.add_argument(
        "--writers",
        type=at_least_one,
        default=2,
        metavar="N",
        help="PostgreSQL connections writing at once, each the batches of its share of "
        "the partitions this sink was given, one transaction at a time (default 2)",
    )
    sink.add_argument(
        "--batch-wait-ms",
        type=int,
        default=200,
        metavar="MS",
        help="how long to wait to fill a batch (default 200)",
    )
    sink.add_argument(
        "--web-port",
        type=int,
        metavar="PORT",
        help="serve GET /metrics (Prometheus) and GET /health (200 working, 503 waiting for "
        "the database or stalled) on PORT [env USERTRAIL_SINK_WEB_PORT; default: not served]",
    )
    sink.add_argument(
        "--web-host",
        metavar="ADDRESS",
        help="address that server listens on; 0.0.0.0 for every one "
        "[env USERTRAIL_SINK_WEB_HOST; default 127.0.0.1]",
    )
    sink.add_argument(
        "--on-log-reset",
        choices=["stop", "start-over"],
        default="stop",
        help="the broker's log is not the one the stored positions were read from (a "
        "recreated topic, a wiped broker): stop with exit code 3 and say so (default), or "
        "forget the positions and read the new log from its start (writes are idempotent)",
    )
    _add_instance_argument(sink)
    sink.set_defaults(func=cmd_sink)

    stream = sub.add_parser(
        "stream",
        parents=[common],
        help="the faust worker: per-user profiles and segments",
        description="Fold usertrail.events into per-user profiles (a faust table, changelog-"
        "backed), evaluate the segment rules and publish changed profiles to "
        "usertrail.profiles. Workers of one group share the partitions. "
        "GET /profiles/{userId} on the web port answers from whichever worker "
        "owns the user.",
    )
    add_rules_argument(stream)
    stream.add_argument(
        "--web-port",
        type=int,
        metavar="PORT",
        help="port of the worker's web server [env USERTRAIL_STREAM_WEB_PORT; default 6066]",
    )
    stream.add_argument(
        "--web-host",
        metavar="ADDRESS",
        help="address the web server listens on; 0.0.0.0 for every one "
        "[env USERTRAIL_STREAM_WEB_HOST; default 127.0.0.1]",
    )
    stream.add_argument(
        "--web-advertise",
        metavar="HOST[:PORT]|URL",
        help="where other workers reach this one's web server, to forward a lookup of a "
        "user it owns (workers on several hosts) [env USERTRAIL_STREAM_WEB_ADVERTISE; "
        "default: the web host and port, or this machine's name with 0.0.0.0]",
    )
    stream.add_argument(
        "--store",
        choices=["auto", "memory", "rocksdb"],
        help="where the worker keeps its table: rocksdb (on disk under the data directory; a "
        "restart reads only the changelog's tail), memory (the whole changelog at each start) "
        "[env USERTRAIL_STREAM_STORE; default auto: rocksdb on Apache Kafka, memory on tansu]",
    )
    stream.add_argument(
        "--fold-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode and fold each batch in a helper process, on another core than "
        "faust's own work, or (--no-fold-process) in the worker's process "
        "[env USERTRAIL_STREAM_FOLD_PROCESS; default: a helper process]",
    )
    stream.add_argument(
        "--batch-max",
        type=at_least_one,
        metavar="N",
        help="fold at most N events per batch; a changed user's state is written once "
        "per batch [env USERTRAIL_STREAM_BATCH_MAX; default 4000]",
    )
    _add_instance_argument(stream)
    stream.set_defaults(func=cmd_stream)
