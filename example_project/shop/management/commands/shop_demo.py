"""``manage.py shop_demo``: the one-command demo (what ``make demo`` runs)."""

from __future__ import annotations

import os
import sys
import uuid
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = ("Start the affinity workers, publish a realistic order stream, verify every "
            "projection against a sequential replay, and print a summary table.")

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--events", type=int, default=3000,
                            help="about how many events to produce (default 3000)")
        parser.add_argument("--unordered", action="store_true",
                            help="plain Celery routing (one queue, several workers), to compare")
        parser.add_argument("--seed", type=int, default=7, help="stream seed (default 7)")
        parser.add_argument("--timeout", type=float, default=300.0,
                            help="seconds to wait for the workers to finish (default 300)")
        parser.add_argument("--workers", choices=["auto", "supervisor", "children"], default="auto",
                            help="partitioned mode: the `celery partitioning worker` supervisor, or "
                                 "one plain `celery worker` per partition (default: supervisor if installed)")
        parser.add_argument("--plain-workers", type=int, default=2,
                            help="--unordered: number of worker processes (default 2)")
        parser.add_argument("--plain-concurrency", type=int, default=4,
                            help="--unordered: prefork concurrency of each (default 4)")
        parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
        parser.add_argument("--log-dir", type=Path, default=None, help="worker logs (default .demo/logs)")
        parser.add_argument("--publish-with", choices=["publish_many", "apply_async", "outbox"],
                            default=None,
                            help="publish each batch of tasks with publish_many (default), one "
                                 "apply_async per task (to compare the publish time), or the "
                                 "transactional outbox (stored with the events, published by "
                                 "the workers' outbox relay after the commit; the default "
                                 "with --chaos)")
        parser.add_argument("--chaos", action="store_true",
                            help="SIGKILL partition workers during the run (at least --kills times), "
                                 "and with the outbox its relay twice and a producer right after "
                                 "its commit, then verify; prints how many messages ran again "
                                 "and were skipped")
        parser.add_argument("--kills", type=int, default=12,
                            help="--chaos: how many SIGKILLs, spread over the run (default 12)")
        parser.add_argument("--no-checkpoints", action="store_true",
                            help="declare the projections without checkpoints (with --chaos: the "
                                 "damage at-least-once delivery does)")
        parser.add_argument("--keep-keys", action="store_true",
                            help="keep this run's Redis keys (queues, counters) afterwards")

    def _reexec_if_needed(self, unordered: bool, checkpoints: bool, chaos: bool) -> None:
        # The routing mode, the checkpoints, the chaos hooks and the key namespace are
        # settings, read when Django and Celery start: when they do not match the request,
        # start again with them in the environment.
        wanted = "plain" if unordered else "partitioned"
        if (wanted == settings.SHOP_ORDERING and settings.SHOP_NAMESPACE
                and checkpoints == settings.SHOP_CHECKPOINTS and chaos == settings.SHOP_CHAOS):
            return
        if os.environ.get("SHOP_DEMO_REEXEC") == "1":
            raise CommandError("could not set SHOP_ORDERING/SHOP_NAMESPACE for the demo")
        env = {**os.environ, "SHOP_ORDERING": wanted, "SHOP_DEMO_REEXEC": "1",
               "SHOP_CHECKPOINTS": "1" if checkpoints else "0", "SHOP_CHAOS": "1" if chaos else "",
               "SHOP_NAMESPACE": settings.SHOP_NAMESPACE or f"shopdemo-{uuid.uuid4().hex[:8]}:"}
        manage = Path(__file__).resolve().parents[3] / "manage.py"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, str(manage), *sys.argv[1:]], env)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["chaos"] and (options["unordered"] or options["workers"] == "children"):
            raise CommandError("--chaos kills the supervisor's partition workers: it needs the "
                               "partitioned mode with --workers auto or supervisor")
        if options["chaos"] and options["kills"] < 1:
            raise CommandError("--kills must be at least 1")
        # --unordered is plain Celery: no partitioning, and no checkpoints either (they rely on
        # per-key order: an event overtaken by a later one would be skipped as already applied).
        checkpoints = not options["no_checkpoints"] and not options["unordered"]
        self._reexec_if_needed(options["unordered"], checkpoints, options["chaos"])
        from shop.demo import DemoOptions, run_demo
        from shop.interrupt import was_interrupted

        if options["events"] < 20:
            raise CommandError("--events must be at least 20")
        demo = DemoOptions(
            events=options["events"], unordered=options["unordered"], seed=options["seed"],
            timeout=options["timeout"], workers=options["workers"],
            plain_workers=options["plain_workers"], plain_concurrency=options["plain_concurrency"],
            json_path=options["json"], log_dir=options["log_dir"], keep_keys=options["keep_keys"],
            publisher=options["publish_with"] or ("outbox" if options["chaos"] else "publish_many"),
            chaos=options["chaos"], kills=options["kills"],
            checkpoints=checkpoints,
        )
        try:
            result = run_demo(demo, self.stdout._out)
        except BaseException as exc:
            if was_interrupted(exc):
                self.stderr.write("interrupted: every worker this demo started has been stopped")
                sys.exit(130)
            if isinstance(exc, RuntimeError):  # workers that could not start
                self.stderr.write(f"demo failed: {exc}")
                sys.exit(1)
            raise
        # The comparison modes (--unordered, --no-checkpoints) demonstrate damage: they fail
        # only when the run did not finish.
        demonstrating = options["unordered"] or options["no_checkpoints"]
        if not result.drained or (not demonstrating and not result.verified):
            sys.exit(1)
