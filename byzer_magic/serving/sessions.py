"""Conversations that carry over cells (`--session S`): kept turns, trimmed to fit the model that answers.

A session is a list of turns (question, answer, and which deployment gave
it), not tied to a deployment: the next chat with `--session S` sends the
whole history to whichever deployment it names, so one conversation can be
carried to another model. What is sent is trimmed from the oldest turn while
the prompt (counted by the deployment's own tokenizer and chat template) and
room for `--max_tokens` would exceed its context; the session itself keeps
every turn. A deployment that cannot count tokens or does not know its
context (a SaaS provider) is sent the whole history, untrimmed.

The notebook keeps sessions in the kernel (`KERNEL`); the command line keeps
them in files (`FileStore`), so `byzer-magic chat --session S` continues a
conversation across commands. No IPython here.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ..backends.base import Messages
from ..errors import WrongTaskError


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    deployment: str


@dataclass
class Session:
    name: str
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> Messages:
        """The conversation as OpenAI messages, oldest first."""
        out: Messages = []
        for turn in self.turns:
            out += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        return out

    def transcript(self) -> str:
        """Who said what, for a reader; each answer names the deployment that gave it."""
        if not self.turns:
            return f"session {self.name!r} is empty"
        lines = []
        for number, turn in enumerate(self.turns, 1):
            lines += [f"[{number}] user: {turn.question}", f"[{number}] {turn.deployment}: {turn.answer}", ""]
        return "\n".join(lines).rstrip()

    __str__ = transcript


class Store(Protocol):
    def get(self, name: str) -> Session: ...
    def save(self, session: Session) -> None: ...


class MemoryStore:
    """Sessions of one process: a notebook's kernel, a script."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def get(self, name: str) -> Session:
        return self._sessions.get(name) or Session(name)

    def save(self, session: Session) -> None:
        self._sessions[session.name] = session


class FileStore:
    """Sessions kept as JSON files, one per session, readable only by their owner (mode 0600).

    A session name is a deployment-style name (letters, digits, `_.-`), so it is
    a safe file name. Two processes writing one session at once: the last wins.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or Path(os.environ.get("BYZER_MAGIC_HOME", "~/.byzer_magic")).expanduser() / "sessions"

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def get(self, name: str) -> Session:
        try:
            data = json.loads(self._path(name).read_text())
        except FileNotFoundError:
            return Session(name)
        return Session(name, [Turn(**turn) for turn in data["turns"]])

    def save(self, session: Session) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(session.name)
        partial = path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"turns": [asdict(turn) for turn in session.turns]}, f)
        os.replace(partial, path)


KERNEL = MemoryStore()
"""The notebook's sessions: they live as long as the kernel."""


@dataclass(frozen=True)
class Prepared:
    """What to send for one question in a session, and the note to show when turns were left out."""

    messages: Messages
    left_out: int = 0
    note: str = ""


def conversation(turns: list[Turn], question: str, system: str | None) -> Messages:
    messages: Messages = [{"role": "system", "content": system}] if system else []
    return messages + Session("", turns).messages() + [{"role": "user", "content": question}]


def prepare(store: Store, session: str, deployment: str, question: str, *, system: str | None = None,
            max_tokens: int | None = None) -> Prepared:
    """The session's history and the question, trimmed from the oldest turn to fit `deployment`'s context."""
    from .chat import ameasure, run_on_client_loop

    turns = store.get(session).turns
    candidates = [conversation(turns[dropped:], question, system) for dropped in range(len(turns) + 1)]
    facts = run_on_client_loop(ameasure(deployment, candidates))
    if facts["task"] != "chat":
        raise WrongTaskError(f"--session keeps a conversation, and {deployment!r} is an embedding model, which does "
                             f"not chat: use --session with a chat deployment")
    limit, counts = facts["context_length"], facts["prompt_tokens"]
    if not turns or not limit or counts[0] is None:
        return Prepared(candidates[0])
    room = limit - (max_tokens or 0)
    dropped = next((k for k, count in enumerate(counts) if count is not None and count <= room), len(turns))
    if not dropped:
        return Prepared(candidates[0])
    left = "the oldest turn was" if dropped == 1 else f"the {dropped} oldest turns were"
    room_for = f" with room for --max_tokens {max_tokens}" if max_tokens else ""
    note = (f"(session {session!r}: {left} left out to fit {deployment!r}'s context of {limit} tokens{room_for}; "
            f"{len(turns) - dropped} of {len(turns)} sent, all kept)")
    return Prepared(candidates[dropped], dropped, note)


def record(store: Store, session: str, question: str, answer: str, deployment: str) -> None:
    """Add one finished exchange to the session."""
    current = store.get(session)
    current.turns.append(Turn(question, answer, deployment))
    store.save(current)


def clear(store: Store, session: str) -> None:
    store.save(Session(session))
