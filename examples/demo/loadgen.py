"""Drive HTTP load at the demo for a while, show progress, report latencies.

    python examples/demo/loadgen.py --port 8000 --seconds 20 --clients 32 [--json out.json]

A mix of /read (60 %), /write (25 %) and /slow (15 %) from ``--clients``
threads, one connection per request. Prints one progress line a second and a
summary: requests, errors, requests/s, p50 and p99 latency.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time

MIX = [("/read", 60), ("/write", 25), ("/slow", 15)]


class Load:
    def __init__(self, host: str, port: int, clients: int, seconds: float) -> None:
        self.host, self.port, self.clients, self.seconds = host, port, clients, seconds
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop_at = 0.0

    def client(self) -> None:
        paths = [p for p, weight in MIX for _ in range(weight)]
        while time.monotonic() < self.stop_at:
            path = random.choice(paths)
            started = time.monotonic()
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                conn.request("GET", path, headers={"Connection": "close"})
                response = conn.getresponse()
                response.read()
                error = None if response.status == 200 else f"HTTP {response.status} on {path}"
            except (OSError, http.client.HTTPException) as exc:
                error = f"{type(exc).__name__} on {path}"
            finally:
                conn.close()
            elapsed = time.monotonic() - started
            with self.lock:
                if error is None:
                    self.latencies.append(elapsed)
                else:
                    self.errors[error] = self.errors.get(error, 0) + 1

    def run(self, progress=print) -> dict:
        self.stop_at = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        last = 0
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            with self.lock:
                done, errors = len(self.latencies), sum(self.errors.values())
            elapsed = time.monotonic() - started
            progress(f"  [{elapsed:4.0f} s] {done:6d} ok, {errors:4d} errors, {done - last:5d} req/s")
            last = done
        return self.summary(time.monotonic() - started)

    def summary(self, elapsed: float) -> dict:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else float("nan")

        return {
            "requests": len(ordered),
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "rps": len(ordered) / elapsed if elapsed else 0.0,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "seconds": elapsed,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", help="write the summary here as JSON")
    args = parser.parse_args(argv)
    result = Load(args.host, args.port, args.clients, args.seconds).run(lambda line: print(line, flush=True))
    print(f"{result['requests']} requests, {result['errors']} errors, {result['rps']:.0f} req/s, "
          f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return 0 if result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
