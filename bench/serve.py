"""Benchmark (not a test): the server under a bounded load, batching on against off.

Builds the tiny servable setup of the tests (tests/serve_fixture.py: a random tiny Retro, a
30-document database with its Flat index), then, for each of

1. batching off (``--max-batch 1``: every request decoded alone)
2. batching on  (``--max-batch 32``)

starts the real server on a free loopback port (both at once) and runs ``--clients`` concurrent
clients for ``--seconds`` per mode, alternating between the modes in ``--rounds`` rounds: each client sends ``POST /v1/ask`` (a question from the QA set, retrieval as in
params: two prompt contexts, 16 new tokens) and sends the next as soon as the answer is back.
Reports requests/s, p50 and p99 latency, errors (an HTTP status other than 200) and lost
requests (sent, no response before the client's timeout or the end), and the ratio of on to off.

    OMP_NUM_THREADS=1 python bench/serve.py                 # 32 clients, 60 s per mode
    OMP_NUM_THREADS=1 python bench/serve.py --clients 8 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serve_fixture import QUESTIONS, Server, build  # noqa: E402


def load(url: str, clients: int, seconds: float, timeout: float) -> dict:
    """``clients`` threads, each with its own connection, asking until ``seconds`` have passed."""
    latencies, errors, lost, sent = [], [0], [0], [0]
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + seconds

    def client(c: int):
        with httpx.Client(base_url=url, timeout=timeout) as http:
            n = 0
            while time.perf_counter() < stop_at:
                q = QUESTIONS[(c + n) % len(QUESTIONS)] + f" ({c}.{n})"
                n += 1
                with lock:
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/ask", json={"question": q, "max_tokens": 16})
                except httpx.HTTPError:
                    with lock:
                        lost[0] += 1
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200 and "answer" in r.json():
                        latencies.append(dt)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"latencies": latencies, "sent": sent[0], "errors": errors[0], "lost": lost[0], "wall_s": wall}


def summary(parts: list[dict]) -> dict:
    """Rounds of one mode added up."""
    lat = np.array([x for p in parts for x in p["latencies"]] or [np.nan])
    wall = sum(p["wall_s"] for p in parts)
    ok = sum(len(p["latencies"]) for p in parts)
    return {"ok": ok, "sent": sum(p["sent"] for p in parts), "errors": sum(p["errors"] for p in parts),
            "lost": sum(p["lost"] for p in parts), "wall_s": wall, "rps": ok / wall,
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60, help="load time per mode")
    ap.add_argument("--rounds", type=int, default=4, help="the load alternates between the modes this many times")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch threads of the server")
    ap.add_argument("--gather-ms", type=float, default=None, help="the server's --gather-ms (default: its own)")
    ap.add_argument("--timeout", type=float, default=120, help="a client's wait for one answer")
    args = ap.parse_args()

    # Both servers run side by side; the load alternates between them in --rounds rounds, so a
    # change in the machine's other load during the run falls on both modes alike.
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        setup = build(Path(tmp), max_new_tokens=16)
        servers = {}
        for name, batch in (("off", 1), ("on", args.clients)):
            extra = ["--max-batch", str(batch), "--max-queue", str(4 * args.clients)]
            extra += ["--gather-ms", str(args.gather_ms)] if args.gather_ms is not None else []
            servers[name] = stack.enter_context(Server(setup["server_args"], extra, threads=args.threads))
            load(servers[name].url, min(4, args.clients), 3, args.timeout)  # warm-up
        parts = {"off": [], "on": []}
        for r in range(args.rounds):
            for name in ("off", "on"):
                parts[name].append(load(servers[name].url, args.clients, args.seconds / args.rounds, args.timeout))
        rows = {name: summary(parts[name]) for name in parts}
        for name, server in servers.items():
            health = httpx.get(server.url + "/health").json()
            rows[name]["prompts_per_batch"] = health["decoded_prompts"] / max(health["batches"], 1)
            print(f"batching {name}: {rows[name]}", flush=True)

    print(f"\n{args.clients} clients, {args.seconds:.0f} s per mode in {args.rounds} alternating rounds, "
          f"server torch threads {args.threads}")
    print("| batching | requests/s | p50 latency ms | p99 latency ms | prompts per batch | answered | errors | lost |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("off", "on"):
        r = rows[name]
        print(f"| {name} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['prompts_per_batch']:.1f} "
              f"| {r['ok']} | {r['errors']} | {r['lost']} |")
    print(f"throughput ratio on/off: {rows['on']['rps'] / max(rows['off']['rps'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
