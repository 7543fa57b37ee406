"""An interactive chat under torchrun: rank 0 reads the user's lines, every rank decodes.

Each line rank 0 reads is broadcast to all ranks, which then run the same deterministic
session code, so their histories never diverge; only rank 0 prints. Ctrl-C must end every
rank at the same point, or the others would wait forever in a collective: it is recorded
as a request that rank 0 shares with the others after every decoding step.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from types import FrameType

import torch
import torch.distributed as dist

from llama.chat import ChatFormat, Dialog, chat_stop_ids, encode_dialog, forbidden_tags, with_system
from llama.distributed import Runtime, log
from llama.engine import Engine
from llama.errors import UserError
from llama.streaming import stream_completion
from llama.tokenizer import Tokenizer

EXIT = "/exit"
COMMANDS = "/reset, /system TEXT, /exit (Ctrl-D and Ctrl-C also quit)"
# Ranks other than 0 wait for the user's line inside a collective, which times out (after
# --timeout): rank 0 tells them "nothing yet" this often, or twice per timeout if that is shorter.
IDLE_BROADCAST_S = 60.0


@dataclass
class ChatSession:
    """The conversation: system prompt, alternating user/assistant history, the commands."""

    tokenizer: Tokenizer
    chat_format: ChatFormat
    max_seq_len: int
    max_gen_len: int
    system: str | None = None
    history: Dialog = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_gen_len >= self.max_seq_len:
            raise UserError(f"--max_gen_len {self.max_gen_len} leaves no room for a conversation within max_seq_len "
                            f"{self.max_seq_len}; lower --max_gen_len or raise --max_seq_len")

    def handle(self, line: str) -> list[int] | None:
        """Act on one line of input: the prompt tokens for the model's reply, or None when
        the line was a command or could not be sent (a notice says why)."""
        text = line.strip()
        if not text:
            return None
        if text == "/reset":
            self.history = []
            log("(conversation reset)")
            return None
        if text == "/system" or text.startswith("/system "):
            self._set_system(text.removeprefix("/system").strip() or None)
            return None
        if text.startswith("/"):
            log(f"(unknown command {text.split()[0]}; commands: {COMMANDS})")
            return None
        return self._prompt_for(text)

    def add_reply(self, user_text: str, reply: str) -> None:
        self.history += [{"role": "user", "content": user_text.strip()}, {"role": "assistant", "content": reply}]

    def _set_system(self, system: str | None) -> None:
        found = forbidden_tags(system or "", self.chat_format)
        if found:
            log(f"(system prompt refused: it contains {', '.join(found)}, which Llama 2 chat does not allow)")
            return
        self.system = system
        log(f"(system prompt {'set' if system else 'cleared'}; it applies from the next message)")

    def _prompt_for(self, text: str) -> list[int] | None:
        """Encode history + `text`, dropping the oldest exchanges until the prompt leaves
        max_gen_len tokens of room for the reply."""
        dialog = with_system([*self.history, {"role": "user", "content": text}], self.system)
        found = forbidden_tags(text, self.chat_format)
        if found:
            log(f"(message refused: it contains {', '.join(found)}, which Llama 2 chat does not allow)")
            return None
        budget = self.max_seq_len - self.max_gen_len
        dropped = 0
        while len(tokens := encode_dialog(self.tokenizer, dialog, self.chat_format)) > budget:
            if dropped == len(self.history):
                self.history = []
                log(f"(this message needs {len(tokens)} prompt tokens, over the {budget} that max_seq_len "
                    f"{self.max_seq_len} leaves beside max_gen_len {self.max_gen_len}; conversation reset, "
                    "send something shorter)")
                return None
            dropped += 2
            dialog = with_system([*self.history[dropped:], dialog[-1]], self.system)
        if dropped:
            self.history = self.history[dropped:]
            log(f"({dropped // 2} oldest exchange(s) dropped to stay within max_seq_len {self.max_seq_len})")
        return tokens


class StdinLines:
    """Lines of standard input on rank 0, read without blocking longer than asked: the
    other ranks wait in a collective meanwhile and must hear from rank 0 in time."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.pending = b""
        self.at_eof = False

    def poll(self, timeout_s: float) -> str | None:
        """The next line (without its newline), EXIT at end of input, or None if no full
        line arrived within timeout_s."""
        if b"\n" not in self.pending and not self.at_eof:
            ready, _, _ = select.select([self.fd], [], [], timeout_s)
            if ready:
                chunk = os.read(self.fd, 65536)
                self.pending += chunk
                self.at_eof = not chunk
        if b"\n" in self.pending:
            line, self.pending = self.pending.split(b"\n", 1)
        elif self.at_eof and self.pending:
            line, self.pending = self.pending, b""
        elif self.at_eof:
            return EXIT
        else:
            return None
        return line.decode("utf-8", errors="replace")


class SessionInterrupted(Exception):
    """Raised on every rank at the same decoding step once rank 0 saw Ctrl-C."""


class CtrlC:
    """SIGINT while rank 0 waits for input ends the wait at once (KeyboardInterrupt); at any
    other time, and on other ranks, it only sets a flag, checked where all ranks agree."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pressed = False
        self.reading = False

    def __enter__(self) -> CtrlC:
        signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        # The session is over and every rank is tearing down: a Ctrl-C now (torchrun may pass
        # the one that ended the session on again) would only turn a clean exit into a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.reading:
            raise KeyboardInterrupt
        self.pressed = True

    def raise_if_pressed(self) -> None:
        """A collective: rank 0's flag decides for all ranks."""
        flag = torch.tensor([self.pressed], dtype=torch.int32, device=self.runtime.device)
        if self.runtime.world_size > 1:
            dist.broadcast(flag, src=0)
        if flag.item():
            raise SessionInterrupted

    def read_line(self, lines: StdinLines | None) -> str:
        """Rank 0's next line, broadcast to every rank; EXIT on end of input or Ctrl-C."""
        while True:
            line = None
            if lines is not None:
                self.reading = True
                try:
                    line = EXIT if self.pressed else lines.poll(min(IDLE_BROADCAST_S, self.runtime.timeout_s / 2))
                except KeyboardInterrupt:
                    line = EXIT
                finally:
                    self.reading = False
            shared = [line]
            dist.broadcast_object_list(shared, src=0)
            if shared[0] is not None:
                return shared[0]


def run_chat(engine: Engine, tokenizer: Tokenizer, chat_format: ChatFormat, runtime: Runtime,
             max_gen_len: int, temperature: float, top_p: float, seed: int, system: str | None = None) -> None:
    """Chat until /exit, end of input or Ctrl-C; every rank must call it."""
    session = ChatSession(tokenizer, chat_format, engine.max_seq_len, max_gen_len, system)
    stop_ids = chat_stop_ids(tokenizer, chat_format)
    lines = StdinLines(sys.stdin.fileno()) if runtime.is_main else None
    log(f"chat ({chat_format} format, max_seq_len {session.max_seq_len}); commands: {COMMANDS}")
    with CtrlC(runtime) as ctrl_c:
        for turn in itertools.count():
            log("> ", end="")
            line = ctrl_c.read_line(lines)
            if line.strip() == EXIT:
                break
            prompt_tokens = session.handle(line)
            if prompt_tokens is None:
                continue
            try:
                # A new seed each turn, the same on every rank: replies do not share one random stream.
                reply = stream_completion(engine, tokenizer, prompt_tokens, max_gen_len, stop_ids, temperature, top_p,
                                          seed + turn, after_step=ctrl_c.raise_if_pressed)
            except SessionInterrupted:
                break
            finally:
                log()
            session.add_reply(line, tokenizer.decode(reply.tokens))
    log()
