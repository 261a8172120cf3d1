"""Serving throughput and latency: `--task serve` with dynamic batching against one request at a time.

    python bench/bench_serve.py                        the SmolLM2 demo (trains its adapter first if absent)
    python bench/bench_serve.py --requests 48 --repeat 2

Two servers of the same run start side by side (per_device_eval_batch_size 16, and 1: one request at a time);
only one is sent requests at any moment, so they never share the cores. For each concurrency (1, 4, 16) the
rows interleave (batched, serial, batched, ...) over --repeat rounds: requests/s, p50/p95 latency, completion
tokens/s, and the server's RSS. Each request is a held-out order message of data/demo/validation.json,
greedy, max_tokens 48, through the official openai client. Results: output/<model-name>/bench_serve.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serving import Server  # noqa: E402  (the tests' subprocess helper: same start, same SIGTERM stop)


def _messages() -> list[str]:
    rows = json.loads((ROOT / "data/demo/validation.json").read_text(encoding="utf-8"))
    return [r["messages"][-2]["content"] if "messages" in r else r["text"] for r in rows]


def _round(server: Server, prompts: list[str], concurrency: int, n: int) -> dict:
    import psutil

    client = server.client(max_retries=0)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(model=server.model, max_tokens=48, temperature=0,
                                               messages=[{"role": "user", "content": prompts[i % len(prompts)]}])
        return time.perf_counter() - start, reply.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {"requests": n, "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 3),
            "completion_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[min(n - 1, int(round(0.95 * (n - 1))))], 3),
            "rss_mb": round(psutil.Process(server.proc.pid).memory_info().rss / 2**20)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--requests", type=int, default=48, help="requests per row and round")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (rows interleave)")
    ap.add_argument("--concurrency", default="1,4,16")
    args = ap.parse_args()
    import main as entry
    from config import build_config, read_yaml

    cfg = build_config(read_yaml(args.config, required=True), args.config)
    if not (cfg.lora_dir / "adapter_config.json").is_file():
        print(f"no adapter at {cfg.lora_dir}: training the demo first", flush=True)
        if entry.main(["--task", "train", "--config", args.config]) != 0:
            return 1
    prompts = _messages()
    out_dir = cfg.run_dir
    servers = {}
    try:
        for label, batch in (("dynamic batching (batch <= 16)", 16), ("one request at a time", 1)):
            servers[label] = Server(["--config", args.config, "--per_device_eval_batch_size", batch,
                                     "--max_queue", 256], out_dir / f"bench_serve_{batch}.log")
            servers[label].model = cfg.model_name
        for server in servers.values():  # warm-up: first-call costs out of the measurement
            _round(server, prompts, 2, 4)
        rows = []
        for concurrency in map(int, args.concurrency.split(",")):
            for r in range(args.repeat):
                for label, server in servers.items():
                    res = {"row": label, "concurrency": concurrency, "round": r,
                           **_round(server, prompts, concurrency, args.requests)}
                    rows.append(res)
                    print(json.dumps(res), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    (out_dir / "bench_serve.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print("\n| concurrency | row | requests/s | p50 s | p95 s | completion tokens/s | server RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for concurrency in dict.fromkeys(r["concurrency"] for r in rows):
        for label in servers:
            mine = [r for r in rows if r["concurrency"] == concurrency and r["row"] == label]
            worst = min(mine, key=lambda r: r["requests_per_s"])  # the slower round, as in BENCHMARKS.md
            print(f"| {concurrency} | {label} | {worst['requests_per_s']} | {worst['p50_s']} | {worst['p95_s']} | "
                  f"{worst['completion_tokens_per_s']} | {worst['rss_mb']} |")
    print(f"\nresults: {out_dir / 'bench_serve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
