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
        parser.add_argument("--publish-with", choices=["publish_many", "apply_async"],
                            default="publish_many",
                            help="publish each batch of tasks with publish_many (default) or one "
                                 "apply_async per task, to compare the publish time")
        parser.add_argument("--keep-keys", action="store_true",
                            help="keep this run's Redis keys (queues, counters) afterwards")

    def _reexec_if_needed(self, unordered: bool) -> None:
        # The routing mode and the key namespace are settings, read when Django and Celery
        # start: when they do not match the request, start again with them in the environment.
        wanted = "plain" if unordered else "partitioned"
        if wanted == settings.SHOP_ORDERING and settings.SHOP_NAMESPACE:
            return
        if os.environ.get("SHOP_DEMO_REEXEC") == "1":
            raise CommandError("could not set SHOP_ORDERING/SHOP_NAMESPACE for the demo")
        env = {**os.environ, "SHOP_ORDERING": wanted, "SHOP_DEMO_REEXEC": "1",
               "SHOP_NAMESPACE": settings.SHOP_NAMESPACE or f"shopdemo-{uuid.uuid4().hex[:8]}:"}
        manage = Path(__file__).resolve().parents[3] / "manage.py"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, str(manage), *sys.argv[1:]], env)

    def handle(self, *args: Any, **options: Any) -> None:
        self._reexec_if_needed(options["unordered"])
        from shop.demo import DemoOptions, run_demo
        from shop.interrupt import was_interrupted

        if options["events"] < 20:
            raise CommandError("--events must be at least 20")
        demo = DemoOptions(
            events=options["events"], unordered=options["unordered"], seed=options["seed"],
            timeout=options["timeout"], workers=options["workers"],
            plain_workers=options["plain_workers"], plain_concurrency=options["plain_concurrency"],
            json_path=options["json"], log_dir=options["log_dir"], keep_keys=options["keep_keys"],
            publisher=options["publish_with"],
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
        if not result.drained or (not options["unordered"] and not result.verified):
            sys.exit(1)
