"""Load test of ``instructrl serve`` on loopback: requests/s and tokens/s for 1, 8 and 32 concurrent clients.

    .venv/bin/python benchmarks/serve_load.py --model runs/default/sft/final [--quantize int8]

The server is ``instructrl serve`` in its own process (default threads: all cores but one);
each client is an
``openai.AsyncOpenAI`` coroutine sending streamed chat requests one after another, each a
held-out prompt of the built-in world (or a generated question when no world is given), with
its own seed, until it has sent ``--requests`` of them. Every stream must end with a finish
reason; the script fails otherwise. Needs the dev extra (the openai client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import openai

import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import httpx


def questions(world_prompts: str | None, count: int) -> list[list[dict]]:
    if world_prompts:
        from instructrl.world.build import load_tasks

        tasks = load_tasks(world_prompts)
        return [list(tasks[i % len(tasks)].messages) for i in range(count)]
    return [[{"role": "user", "content": f"Add {i} and {3 * i + 7}."}] for i in range(count)]


async def one_level(url: str, clients: int, requests: int, prompts: list[list[dict]], max_tokens: int, temperature: float) -> dict:
    latencies, first_token, tokens = [], [], 0

    async def client_loop(c: int, client: openai.AsyncOpenAI):
        nonlocal tokens
        for r in range(requests):
            messages = prompts[(c * requests + r) % len(prompts)]
            start = time.perf_counter()
            stream = await client.chat.completions.create(
                model="bench", messages=messages, max_tokens=max_tokens, temperature=temperature, seed=c * requests + r,
                stream=True, stream_options={"include_usage": True})
            finish, first = None, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter() - start
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            if finish not in ("stop", "length"):
                raise RuntimeError(f"client {c} request {r}: the stream ended without a finish reason")
            latencies.append(time.perf_counter() - start)
            if first is not None:
                first_token.append(first)

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        seconds = time.perf_counter() - start
    n = clients * requests
    return {
        "clients": clients, "requests": n, "seconds": seconds, "requests_per_s": n / seconds, "tokens_per_s": tokens / seconds,
        "completion_tokens": tokens, "mean_latency_s": statistics.mean(latencies),
        "mean_time_to_first_token_s": statistics.mean(first_token) if first_token else None,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def served(model: str, quantize: str, max_batch: int):
    """``instructrl serve`` in a child process on a free loopback port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "instructrl", "serve", "--model", f"bench={model}", "--port", str(port),
               "--quantize", quantize, "--max-batch", str(max_batch), "--max-queue", "4096"]
    proc = subprocess.Popen(command, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--world-prompts", default=None, help="a world prompts file (e.g. runs/default/world/prompts/eval.jsonl)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()

    prompts = questions(args.world_prompts, 4096)
    results = []
    with served(args.model, args.quantize, args.max_batch) as (url, pid):
        asyncio.run(one_level(url, 1, 2, prompts, args.max_tokens, args.temperature))  # warm-up
        for clients in args.clients:
            server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
            results.append(asyncio.run(one_level(url, clients, args.requests, prompts, args.max_tokens, args.temperature)))
            r = results[-1]
            r["server_cpu_s"], r["client_cpu_s"] = cpu_seconds(pid) - server_cpu, time.process_time() - client_cpu
            print(f"{clients:3d} clients: {r['requests']:4d} requests in {r['seconds']:6.2f} s  {r['requests_per_s']:7.2f} req/s  "
                  f"{r['tokens_per_s']:8.1f} tokens/s  latency {r['mean_latency_s']:.3f} s  "
                  f"CPU s: server {r['server_cpu_s']:.1f}, clients {r['client_cpu_s']:.1f}", flush=True)
    print(json.dumps({"model": args.model, "quantize": args.quantize, "max_tokens": args.max_tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()
