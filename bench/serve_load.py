"""Load-test ``dspark serve`` on loopback: requests/s, tokens/s and latency at several concurrencies.

A bounded closed loop: at concurrency C, C workers send ``--requests`` streamed completions in total (each
worker sends its next request when its last one finished), so the run always ends. Latency is request start
to ``[DONE]``; TTFT is request start to the first text chunk. With a BUNDLE the server runs in this process
(a uvicorn thread on a free loopback port); with ``--url`` it loads a server that is already running. With
``--replicas 1,2`` the BUNDLE is served by that many Ray Serve replicas in turn (``dspark serve --replicas``:
a local Ray instance per count, the gateway in this process), and every level runs against each.

    python bench/serve_load.py BUNDLE [--requests 32] [--max-tokens 64] [--concurrency 1,4,16] [--threads 0]
    python bench/serve_load.py BUNDLE --replicas 1,2 --threads 1
    python bench/serve_load.py --url http://127.0.0.1:8000 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import threading
import time

import httpx

from dspark.bench import machine_info, percentile


def start_server(bundle: str, threads: int, max_batch: int | None, max_queue: int):
    import uvicorn

    from dspark.runtime.generate import Generator
    from dspark.serve import create_app

    app = create_app(Generator(bundle, threads=threads, max_batch=max_batch), max_queue=max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http="h11"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    start, first, text, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                text.append(chunk["choices"][0]["text"])
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": usage["completion_tokens"] if usage else 0}


async def level(url: str, headers: dict, concurrency: int, requests: int, max_tokens: int, temperature: float) -> dict:
    bodies = [{"prompt": f"w{1 + i % 40} w{2 + i % 37} w{3 + i % 31}", "max_tokens": max_tokens, "temperature": temperature,
               "seed": i, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for i in range(requests)]
    queue = list(reversed(bodies))
    results = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        async def worker():
            while queue:
                results.append(await one(client, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_ms": round(1000 * percentile(latencies, 50), 1),
            "p99_latency_ms": round(1000 * percentile(latencies, 99), 1),
            "p50_ttft_ms": round(1000 * statistics.median(r["ttft"] for r in results), 1)}


def spec_counters(url: str, headers: dict) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers, timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens", "vllm:generation_tokens"):
            out[family.name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


def levels(url: str, headers: dict, args, settle_s: float = 0.0) -> list[dict]:
    """One row per concurrency level, after an unreported warm-up; ``settle_s`` lets every replica's metrics
    reach the scrape before the speculative counters are read."""
    asyncio.run(level(url, headers, 1, 2, 8, args.temperature))
    rows = []
    for c in (int(x) for x in args.concurrency.split(",")):
        before = spec_counters(url, headers)
        row = asyncio.run(level(url, headers, c, args.requests, args.max_tokens, args.temperature))
        time.sleep(settle_s)
        after = spec_counters(url, headers)
        drafts = after.get("vllm:spec_decode_num_drafts", 0) - before.get("vllm:spec_decode_num_drafts", 0)
        accepted = after.get("vllm:spec_decode_num_accepted_tokens", 0) - before.get("vllm:spec_decode_num_accepted_tokens", 0)
        row["mean_accepted_length"] = round(1 + accepted / drafts, 2) if drafts else None
        rows.append(row)
    return rows


def measure(args, headers) -> tuple[list[dict], str]:
    """Every level against the server the arguments name: Ray Serve replicas, an in-process server, or a URL."""
    rows, url = [], args.url
    if args.replicas:
        from dspark.serve.cluster import PUSH_INTERVAL_S, ClusterOptions, cluster_thread

        for n in (int(x) for x in args.replicas.split(",")):
            with cluster_thread(args.bundle, ClusterOptions(replicas=n), threads=args.threads, max_batch=args.max_batch,
                                max_queue=1024, log_level="warning") as (_, url):
                rows += [dict(row, replicas=n) for row in levels(url, headers, args, settle_s=2 * PUSH_INTERVAL_S)]
    elif args.bundle:
        server, thread, url = start_server(args.bundle, args.threads, args.max_batch, max_queue=1024)
        try:
            rows = levels(url, headers, args)
        finally:
            server.should_exit = True
            thread.join(30)
    else:
        rows = levels(url, headers, args)
    return rows, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="Bundle to serve in this process (or give --url).")
    parser.add_argument("--url", help="A running server instead of a bundle.")
    parser.add_argument("--api-key")
    parser.add_argument("--requests", type=int, default=32, help="Requests per concurrency level.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads of the in-process server.")
    parser.add_argument("--max-batch", type=int)
    parser.add_argument("--replicas", help="Replica counts to serve BUNDLE with on Ray Serve, one after the other "
                                           "(e.g. 1,2; needs dspark[cluster]); --threads is then per replica.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args()
    if (args.bundle is None) == (args.url is None):
        parser.error("give a BUNDLE or --url")
    if args.replicas and not args.bundle:
        parser.error("--replicas serves a BUNDLE")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # --json keeps stdout for the report: Ray's log monitor prints its processes' lines (a raylet's warning while a
    # deployment shuts down) to the driver's stdout
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        rows, url = measure(args, headers)
    report = {"machine": machine_info(args.threads), "url": url, "bundle": args.bundle, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "levels": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"machine: {json.dumps(report['machine'])}")
    print(f"{args.requests} streamed completions per level, {args.max_tokens} tokens each, T={args.temperature}")
    cols = ["replicas"] * bool(args.replicas) + ["concurrency", "requests_per_s", "tokens_per_s", "p50_latency_ms", "p99_latency_ms", "p50_ttft_ms",
            "mean_accepted_length"]
    print("  ".join(f"{c:>20s}" for c in cols))
    for row in rows:
        print("  ".join(f"{str(row[c]):>20s}" for c in cols))


if __name__ == "__main__":
    main()
