"""What ``--quantize int8`` costs and buys on CPU: decoding speed and gold score on the built-in world.

    .venv/bin/python benchmarks/serve_int8.py --model runs/default/sft/final --run runs/default

For the float32 checkpoint and its dynamic int8 quantisation, the serving engine answers the
held-out evaluation prompts greedily (``eval.max_new_tokens`` = 24, as ``instructrl eval``)
and the gold labeler judges the answers exactly as ``instructrl eval`` does (mean Likert,
flags). Speed is measured on the engine itself, without HTTP: one request at a time, and all
prompts queued at once (batches of ``--max-batch``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from instructrl.data.chat import render_ids
from instructrl.evaluation.evaluate import summarize
from instructrl.serve.engine import Engine, SamplingParams
from instructrl.serve.loading import load_engine, set_serving_threads
from instructrl.world.build import load_tasks
from instructrl.world.labeler import SimulatedLabeler


def answer(engine: Engine, prompts: list[list[int]], max_tokens: int, concurrent: bool) -> tuple[list[str], int, float]:
    """Greedy answers, tokens generated and seconds, with every prompt queued at once or one by one."""
    texts, tokens = [""] * len(prompts), [0] * len(prompts)
    start = time.perf_counter()

    def run(indices):
        left = threading.Semaphore(0)

        def sink_for(i):
            def sink(event):
                texts[i] += event.text
                tokens[i] = event.completion_tokens
                if event.finish_reason:
                    left.release()
            return sink

        for i in indices:
            engine.submit(prompts[i], SamplingParams(max_tokens, temperature=0.0), 1, sink_for(i))
        for _ in indices:
            left.acquire()

    if concurrent:
        run(range(len(prompts)))
    else:
        for i in range(len(prompts)):
            run([i])
    return [t.strip() for t in texts], sum(tokens), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--run", required=True, help="the run folder whose world/prompts/eval.jsonl holds the held-out prompts")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=64, help="prompts answered one at a time for the single-stream speed")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    threads = set_serving_threads(args.threads)
    tasks = load_tasks(Path(args.run) / "world" / "prompts" / "eval.jsonl")
    judge = SimulatedLabeler()
    results, answers = {}, {}
    for quantize in ("none", "int8"):
        engine = load_engine(args.model, quantize, device="cpu", max_batch=args.max_batch, max_queue=len(tasks)).start()
        prompts = [render_ids(engine.tokenizer, list(t.messages), add_generation_prompt=True) for t in tasks]
        answer(engine, prompts[:8], args.max_tokens, concurrent=True)  # warm-up
        texts, tokens, seconds = answer(engine, prompts, args.max_tokens, concurrent=True)
        _, seq_tokens, seq_seconds = answer(engine, prompts[: args.sequential], args.max_tokens, concurrent=False)
        engine.stop()
        answers[quantize] = texts
        judged = summarize([(t.family, judge.judge(t, a)) for t, a in zip(tasks, texts)])
        results[quantize] = {
            "gold_likert": judged["overall"]["likert"], "flags": judged["overall"]["flags"],
            "batched_tokens_per_s": tokens / seconds, "single_stream_tokens_per_s": seq_tokens / seq_seconds,
        }
        print(f"{quantize:>5}: gold Likert {results[quantize]['gold_likert']:.3f}  batched {results[quantize]['batched_tokens_per_s']:.0f} tokens/s  "
              f"single stream {results[quantize]['single_stream_tokens_per_s']:.0f} tokens/s", flush=True)
    same = sum(a == b for a, b in zip(answers["none"], answers["int8"])) / len(tasks)
    summary = {
        "model": args.model, "prompts": len(tasks), "threads": threads, "results": results, "same_answer_rate": same,
        "gold_likert_change": results["int8"]["gold_likert"] - results["none"]["gold_likert"],
        "batched_speedup": results["int8"]["batched_tokens_per_s"] / results["none"]["batched_tokens_per_s"],
        "single_stream_speedup": results["int8"]["single_stream_tokens_per_s"] / results["none"]["single_stream_tokens_per_s"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
