"""Checkpoints to serve: names, loading, optional int8 dynamic quantisation."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from instructrl.errors import UserError
from instructrl.models.base import inference_device, load_causal_lm, load_tokenizer
from instructrl.serve.engine import Engine, returned_cache

QUANTIZE_CHOICES = ("none", "int8")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def model_name(path: str) -> str:
    """The name a checkpoint is served under: its folder, or the stage's for a stage's ``final/``."""
    folder = Path(path.rstrip("/"))
    return folder.parent.name if folder.name == "final" and folder.parent.name else folder.name


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` options to {name: path}; names must be unique."""
    if not specs:
        raise UserError("give at least one --model PATH (or NAME=PATH)")
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name:
            name, path = model_name(spec), spec
        if not name or not path:
            raise UserError(f"--model {spec!r}: expected PATH or NAME=PATH")
        if name in models:
            raise UserError(f"--model: two models are named {name!r}; name them with NAME=PATH")
        models[name] = path
    return models


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every Linear (weights int8, activations quantised per batch); CPU only."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch points users at torchao; the eager API still works
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def set_serving_threads(threads: int | None) -> int:
    """Set torch's CPU threads for serving and return the number; by default one core is left to the HTTP loop.

    Torch's worker threads spin while they wait for work; when they hold every core, the event
    loop that streams tokens to clients waits for them (on 2 cores a 1M model streamed 10-20x
    slower with 2 threads than with 1).
    """
    import os

    threads = threads or max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - 1))
    torch.set_num_threads(threads)
    return threads


def serving_dtype(dtype: str, device: str, quantize: str) -> torch.dtype | str:
    """The dtype to load weights in: ``auto`` is the checkpoint's own on a GPU (a bf16 model takes half the
    memory of float32) and float32 on the CPU, where half-precision matrix products are slow on most CPUs."""
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if quantize == "int8" and dtype not in ("auto", "float32"):
        raise UserError(f"--quantize int8 quantises float32 weights; leave --dtype at auto, not {dtype}")
    if dtype == "auto":
        return "auto" if device.startswith("cuda") and quantize == "none" else torch.float32
    return getattr(torch, dtype)


def serving_device(device: str) -> str:
    """``--device`` checked before any model loads: the CPU (``cpu``, whatever index it was given, as int8 serving
    and the dtype compare it), a CUDA GPU that is there, or a Mac's GPU (mps)."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is not None and kind.type == "mps" and torch.backends.mps.is_available():
        return device
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose cpu or cuda (cuda:N for the N-th GPU), or mps on a Mac")
    gpus = torch.cuda.device_count()
    if kind.type == "cuda" and (kind.index or 0) >= gpus:
        there = f"only cuda:0 to cuda:{gpus - 1} are here" if gpus else "torch finds no CUDA GPU here; use --device cpu"
        raise UserError(f"--device {device}: {there}")
    return "cpu" if kind.type == "cpu" else device


def load_engine(path: str, quantize: str = "none", device: str | None = None, dtype: str = "auto", **engine_options) -> Engine:
    """A started-ready Engine serving the causal LM and tokenizer at ``path``."""
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    device = serving_device(device) if device else inference_device() if quantize == "none" else "cpu"
    if quantize == "int8" and device != "cpu":
        raise UserError("--quantize int8 is dynamic quantisation for CPU serving; use --device cpu")
    model, tokenizer = load_causal_lm(path, dtype=serving_dtype(dtype, device, quantize)), load_tokenizer(path, for_chat=False)
    if quantize == "int8":
        model = quantize_int8(model)
    model = model.to(device)
    refuse_stateful(model, path)
    return Engine(model, tokenizer, **engine_options)


def refuse_stateful(model: nn.Module, path: str) -> None:
    """A model whose forward pass returns no cache keeps its state in its own modules (RecurrentGemma),
    and a call without one starts it afresh: the engine could not continue any answer, so none is served."""
    if returned_cache(model) is None:
        raise UserError(f"model '{path}' ({type(model).__name__}) returns no cache from its forward pass: it keeps its state in its "
                        "own modules, one sequence at a time, and instructrl serve cannot continue its answers")
