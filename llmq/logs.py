"""llmq's messages go through `logging` (the "llmq" logger and its children), so a library user can silence or
redirect them like any other library's; progress bars stay tqdm. The CLI shows them through rich (`show_on`).

A message may carry a rich renderable (a table) as `extra={"renderable": ...}`: the rich handler prints it, any
other handler prints the message text, which is the same table rendered as plain text (`as_text`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

LOGGER = "llmq"


class RichConsoleHandler(logging.Handler):
    """Prints each record's message (or its renderable) on a rich Console, unwrapped, no markup."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            shown = getattr(record, "renderable", None)
            self.console.print(shown if shown is not None else self.format(record), markup=False, highlight=False,
                               soft_wrap=shown is None)
        except Exception:  # a broken console must not end the run
            self.handleError(record)


def show_on(console: Console, level: int = logging.INFO) -> None:
    """The CLI's setup: llmq's messages at `level` and above go to `console` (replacing an earlier CLI handler)."""
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, RichConsoleHandler)]:
        logger.removeHandler(old)
    logger.addHandler(RichConsoleHandler(console))
    logger.setLevel(level)
    logger.propagate = False


@contextmanager
def shown_on(console: Console | None) -> Iterator[None]:
    """llmq's messages also go to `console` while the block runs (the `console` argument of `llmq.run`)."""
    if console is None:
        yield
        return
    logger = logging.getLogger(LOGGER)
    handler, level = RichConsoleHandler(console), logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def as_text(renderable, width: int = 120) -> str:
    """A rich renderable as plain text (the message of a record that carries it)."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue().rstrip()
