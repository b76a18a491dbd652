"""The locust scenario with its PostgreSQL warm tier restarted in the middle of the run.

A private PostgreSQL server (``tests/servers/postgres.py``, never the shared one) is
started, locust runs against it (hot tier: Redis under a key prefix of its own), and
``--stop-at`` seconds in the server is stopped (fast shutdown) and started again
``--down`` seconds later. Calls fail while it is down; the durability verdict must
still be OK: no acknowledged turn lost. Prints locust's exit code and the verdict.

    python loadtest/pg_restart.py [--users 10] [--run-time 30] [--stop-at 10] [--down 3]

Run from the repository root (it imports ``tests.servers``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.servers.postgres import PrivateCluster  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--run-time", type=int, default=30)
    parser.add_argument("--stop-at", type=float, default=10.0)
    parser.add_argument("--down", type=float, default=3.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/3")
    args = parser.parse_args()

    prefix = f"lt-restart-{secrets.token_hex(4)}:"
    verdict_path = Path(tempfile.mkdtemp(prefix="tierstore-verdict-")) / "verdict.json"
    cluster = PrivateCluster()
    try:
        cluster.start()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TIERSTORE_HOT_URL": f"{args.redis}?prefix={prefix}",
            "TIERSTORE_WARM_URL": cluster.url,
            "TIERSTORE_COLD_URL": "none",
            "LOADTEST_VERDICT_JSON": str(verdict_path),
        }
        command = [str(Path(sys.executable).with_name("locust")), "-f",
                   str(ROOT / "loadtest" / "locustfile.py"), "--headless",
                   "-u", str(args.users), "-r", "5", "-t", f"{args.run_time}s",
                   "--exit-code-on-error", "1"]
        started = time.monotonic()
        locust = subprocess.Popen(command, env=env, cwd=ROOT)
        time.sleep(args.stop_at)
        cluster.stop("fast")
        print(f"--- PostgreSQL stopped at {time.monotonic() - started:.1f} s", flush=True)
        time.sleep(args.down)
        cluster.start()
        print(f"--- PostgreSQL started at {time.monotonic() - started:.1f} s", flush=True)
        code = locust.wait(timeout=args.run_time + 600)
        print(f"--- locust exit code {code} after {time.monotonic() - started:.1f} s")
        if verdict_path.exists():
            verdict = json.loads(verdict_path.read_text())
            print("--- verdict " + json.dumps(verdict))
            return 0 if verdict.get("ok") else 2
        print("--- no verdict written")
        return 2
    finally:
        cluster.destroy()
        _drop_keys(args.redis, prefix)


def _drop_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
