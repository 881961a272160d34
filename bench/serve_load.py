"""Load test of `spt serve`: N chat requests at 1, 8 and 32 concurrent clients, dynamic batching off
(serve.max_batch=1) against on, over real HTTP to uvicorn on loopback.

Run: python bench/serve_load.py RUN [--requests 64] [--clients 1,8,32] [--max-batch 32] [--max-tokens 32]
                                    [--prefill-precision fp32|bf16]

RUN is a trained run or checkpoint folder of any method; the script trains nothing. To make one with the
shared small model (../shared/models/persona-gpt-mini, the config's base model) in a few minutes on CPU:
  spt data split ../shared/data/personachat/valid_self_original_no_cands.txt --out runs/pc \\
      --fractions train=0.9,valid=0.1
  spt train --config configs/mini-personachat-cpu.yaml --output-dir runs/mini-spt \\
      --data.train=runs/pc/train.jsonl --data.valid=runs/pc/valid.jsonl --train.max_steps=20
Each setting stops starting requests after --max-seconds. Prints requests/s, tokens/s (completion tokens),
p50/p95 latency, the number of generate calls, and batching's speed-up (on/off requests/s).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import statistics
import threading
import time

import httpx

from common import examples
from spt.api import load
from spt.serve import create_app


class Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def load_test(url: str, bodies: list[dict], clients: int, max_seconds: float) -> dict:
    """Send the bodies with ``clients`` requests in flight at a time; latencies and token counts."""
    latencies, tokens, errors = [], 0, 0
    queue = list(reversed(bodies))
    stop_at = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker() -> None:
            nonlocal tokens, errors
            while queue and time.perf_counter() < stop_at:
                body = queue.pop()
                t = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
    n = len(latencies)
    q = statistics.quantiles(latencies, n=20) if n >= 2 else latencies * 19
    return {"requests": n, "errors": errors, "seconds": seconds, "rps": n / seconds, "tps": tokens / seconds,
            "p50": statistics.median(latencies) if n else float("nan"), "p95": q[18] if n else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained run or checkpoint folder (see above to make one)")
    ap.add_argument("--requests", type=int, default=64, help="requests per setting")
    ap.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--max-batch", type=int, default=32, help="serve.max_batch with batching on")
    ap.add_argument("--window-ms", type=float, default=5.0, help="serve.batch_window_ms with batching on")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop starting requests after this long")
    ap.add_argument("--prefill-precision", choices=("fp32", "bf16"), default="fp32",
                    help="generate.prefill_precision, the same in both modes")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    clients = [int(c) for c in args.clients.split(",")]
    bot = load(args.run, args.device)
    bot.config.generate = dataclasses.replace(bot.config.generate, prefill_precision=args.prefill_precision)
    data = examples(args.requests)
    bodies = [{"persona": list(e.persona), "max_tokens": args.max_tokens,
               "messages": [{"role": "user" if (len(e.context) - i) % 2 else "assistant", "content": t}
                            for i, t in enumerate(e.context)] or [{"role": "user", "content": "hi"}]}
              for e in (data * (args.requests // max(1, len(data)) + 1))[:args.requests]]
    base = dataclasses.replace(bot.config.serve, max_new_tokens=max(args.max_tokens, bot.config.serve.max_new_tokens),
                               max_queue=max(256, 2 * max(clients)), request_timeout_s=600.0)
    modes = {"off": dataclasses.replace(base, max_batch=1, batch_window_ms=0.0),
             "on": dataclasses.replace(base, max_batch=args.max_batch, batch_window_ms=args.window_ms)}
    results: dict[tuple[str, int], dict] = {}
    for mode, cfg in modes.items():
        with Server(create_app(bot, "bench", cfg)) as server:
            url = f"http://127.0.0.1:{server.port}"
            asyncio.run(load_test(url, bodies[:2], 1, args.max_seconds))  # warm-up
            for c in clients:
                before = httpx.get(f"{url}/health").json()["generate_calls"]
                r = asyncio.run(load_test(url, bodies, c, args.max_seconds))
                r["calls"] = httpx.get(f"{url}/health").json()["generate_calls"] - before
                results[mode, c] = r
                print(f"  batching {mode:<3} clients {c:>3}: {r['requests']} requests in {r['seconds']:.1f}s",
                      flush=True)
    print(f"\nrun={args.run} method={bot.config.method} max_tokens={args.max_tokens} requests={args.requests} "
          f"max_batch={args.max_batch} window={args.window_ms:g}ms prefill={args.prefill_precision}")
    print("\n| batching | clients | requests | errors | req/s | tokens/s | p50 s | p95 s | generate calls |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (mode, c), r in results.items():
        print(f"| {mode} | {c} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | {r['tps']:.1f} | "
              f"{r['p50']:.3f} | {r['p95']:.3f} | {r['calls']} |")
    print("\n| clients | on/off req/s | on/off p50 |")
    print("|---:|---:|---:|")
    for c in clients:
        on, off = results["on", c], results["off", c]
        print(f"| {c} | {on['rps'] / off['rps']:.2f}x | {on['p50'] / off['p50']:.2f}x |")


if __name__ == "__main__":
    main()
