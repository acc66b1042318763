"""``instructrl chat``: talk to one checkpoint, or to several side by side, in the terminal.

Tokens are shown as the engine produces them. With two models (say SFT and PPO-ptx) every
prompt goes to both at once and their answers fill two columns; each model keeps its own
history, so the conversations can drift apart as they would for two users.
"""

from __future__ import annotations

import queue
from typing import Callable, Optional

from instructrl.data.chat import render_ids
from instructrl.serve.engine import Engine, Event, SamplingParams

COMMANDS = "/reset starts a new conversation, /quit leaves"


class Conversation:
    """One model's side of the chat: its engine and the messages so far."""

    def __init__(self, name: str, engine: Engine, system: Optional[str]):
        self.name, self.engine, self.system = name, engine, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, params: SamplingParams, events: "queue.Queue[tuple[str, Event]]") -> None:
        """Queue the user's turn; the answer's events arrive on ``events`` tagged with this model's name."""
        self.messages.append({"role": "user", "content": text})
        prompt = render_ids(self.engine.tokenizer, self.messages, add_generation_prompt=True)
        budget = self.engine.budget(len(prompt), params.max_tokens, params.max_tokens)
        if budget < 1:
            events.put((self.name, Event(0, "the conversation is longer than the model's context; /reset", "error")))
            return
        self.engine.submit(prompt, SamplingParams(budget, params.temperature, params.top_p, params.stop, params.seed), 1,
                           lambda event: events.put((self.name, event)))

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def answer_all(conversations: list[Conversation], text: str, params: SamplingParams, on_text: Callable[[str, str], None]) -> dict[str, str]:
    """Every model's answer to ``text`` (generated together), calling ``on_text(name, piece)`` as pieces arrive."""
    events: "queue.Queue[tuple[str, Event]]" = queue.Queue()
    for conversation in conversations:
        conversation.ask(text, params, events)
    answers = {c.name: "" for c in conversations}
    pending = set(answers)
    while pending:
        name, event = events.get()
        piece = f"[error: {event.text}]" if event.finish_reason == "error" else event.text
        answers[name] += piece
        on_text(name, piece)
        if event.finish_reason:
            pending.discard(name)
    for conversation in conversations:
        if not answers[conversation.name].startswith("[error"):
            conversation.answered(answers[conversation.name])
    return answers


def run_chat(engines: dict[str, Engine], console, system: Optional[str] = None, temperature: float = 0.0,
             max_tokens: int = 64, seed: int = 0, read: Callable[[], str] | None = None) -> None:
    """The chat loop; ``read`` returns the user's next line (raising EOFError at the end)."""
    from rich.columns import Columns
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    for engine in engines.values():
        engine.start()
    conversations = [Conversation(name, engine, system) for name, engine in engines.items()]
    read = read or (lambda: console.input("[bold green]you>[/bold green] "))
    console.print(f"chatting with {', '.join(engines)}; {COMMANDS}", highlight=False)
    turn = 0
    try:
        while True:
            try:
                text = read().strip()
            except (EOFError, KeyboardInterrupt):
                break
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                for conversation in conversations:
                    conversation.reset()
                console.print("(new conversation)")
                continue
            if not text:
                continue
            params = SamplingParams(max_tokens, temperature, 1.0, (), seed + turn)
            turn += 1
            if len(conversations) == 1:
                name = conversations[0].name
                console.print(f"[bold cyan]{name}>[/bold cyan] ", end="")
                answer_all(conversations, text, params, lambda _, piece: console.print(piece, end="", markup=False, highlight=False))
                console.print()
                continue
            shown = {c.name: "" for c in conversations}

            def panels():
                # Text, not markup: an answer's "[x]" or "[/]" is shown as written (markup would drop the one and fail on the other)
                return Columns([Panel(Text(shown[n] or "…"), title=Text(n), width=max(20, console.width // len(shown) - 1)) for n in shown])

            with Live(panels(), console=console, refresh_per_second=20) as live:
                def on_text(name: str, piece: str) -> None:
                    shown[name] += piece
                    live.update(panels())

                answer_all(conversations, text, params, on_text)
            if not console.is_terminal:
                console.print()
    finally:
        for engine in engines.values():
            engine.stop()
