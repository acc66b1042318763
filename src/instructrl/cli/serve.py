"""``instructrl serve`` (checkpoints behind an OpenAI-compatible API) and ``instructrl chat`` (in the terminal)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from instructrl.cli.root import app, log
from instructrl.errors import UserError


MODEL_OPTION = typer.Option(..., "--model", "-m", help="A checkpoint folder (instructrl stage's final/ or any HF causal LM), or NAME=PATH; repeat for several.")
QUANTIZE_OPTION = typer.Option("none", "--quantize", help="none, or int8: dynamic int8 quantisation of the Linear layers for CPU serving.")


def check_port_free(host: str, port: int) -> None:
    """One line naming the port another program holds (serve and label both default to 8000),
    rather than uvicorn's error after the start was announced."""
    import socket

    if not 1 <= port <= 65535:  # socket's bind would raise OverflowError; 0 would listen on a port no one is told
        raise UserError(f"--port {port}: choose a port from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port left in TIME_WAIT is free
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose another --port or --host") from None


@app.command()
def serve(
    model: list[str] = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="INSTRUCTRL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes (or set INSTRUCTRL_API_KEY)."),
    quantize: str = QUANTIZE_OPTION,
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most sequences decoded together (a request with n choices takes n)."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Most requests waiting for a place in the batch; more are answered 429."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Tokens generated when a request sets no max_tokens."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda (cuda:N) or mps (default: cuda when there is one)."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights' dtype: auto (the checkpoint's own on a GPU, float32 on the CPU), float32, bfloat16 or float16."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for requests that bring none (default: fresh each start)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for generation (default: all cores but one, left to the HTTP loop)."),
) -> None:
    """Serve checkpoints behind an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

    Concurrent requests are decoded in one batch; point any OpenAI client at
    http://HOST:PORT/v1 with the model's name (its folder, or the stage for a stage's final/).
    """
    import uvicorn

    from instructrl.serve.app import create_app
    from instructrl.serve.loading import load_engine, parse_model_specs, set_serving_threads

    if api_key is not None and not api_key.strip():  # `--api-key "$KEY"` of an unset variable: every client sending a key was refused
        raise UserError("--api-key is empty (an unset shell variable?): give the key clients must send, or leave it out to serve without one")
    specs = parse_model_specs(model)
    check_port_free(host, port)  # now, not after loading the models
    set_serving_threads(threads)
    engines = {name: load_engine(path, quantize, device, dtype, max_batch=max_batch, max_queue=max_queue, seed=seed) for name, path in specs.items()}
    server_app = create_app(engines, api_key=api_key, default_max_tokens=max_tokens)
    for name, path in specs.items():
        one_at_a_time = " (recurrent layers: one sequence at a time, n = 1)" if engines[name].one_at_a_time else ""
        log(f"serve: model {name} from {path}" + (" (int8)" if quantize == "int8" else "") + one_at_a_time)
    log(f"serve: OpenAI-compatible API at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(server_app, host=host, port=port, log_level="warning")


@app.command()
def chat(
    model: list[str] = MODEL_OPTION,
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start each conversation with."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 answers greedily."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Most tokens per answer."),
    quantize: str = QUANTIZE_OPTION,
    seed: int = typer.Option(0, "--seed", help="Sampling seed (with --temperature > 0)."),
) -> None:
    """Chat with a checkpoint in the terminal; give two --model to see them answer side by side (e.g. sft and ppo_ptx).

    Each model keeps its own history. /reset starts a new conversation, /quit (or Ctrl-D) leaves.
    """
    from instructrl.serve.terminal_chat import run_chat
    from instructrl.serve.loading import load_engine, parse_model_specs, set_serving_threads

    set_serving_threads(None)
    engines = {name: load_engine(path, quantize) for name, path in parse_model_specs(model).items()}
    for name, engine in engines.items():
        if engine.tokenizer.chat_template is None:
            raise UserError(f"chat: the model '{name}' has no chat template (serve it and use /v1/completions instead)")
    run_chat(engines, Console(), system=system, temperature=temperature, max_tokens=max_tokens, seed=seed)
