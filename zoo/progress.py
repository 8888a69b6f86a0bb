"""zoo's own progress lines (per-epoch metrics, the model summary, final tables, predict's summary).

They go to the ``zoo.progress`` logger, so under Hydra they reach the job's log file (``train.log``,
``evaluate.log``, ``predict.log``), and, when asked, to the console: through a console log handler when one is
configured (Hydra's), else with ``print``. Standard library only.
"""

from __future__ import annotations

import logging

__all__ = ["progress_logger", "emit"]

progress_logger = logging.getLogger("zoo.progress")
progress_logger.setLevel(logging.INFO)


class _NotOnConsole(logging.Filter):
    """On console handlers: drop progress records marked for the log file only (a progress bar shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "zoo_console", True)


def _is_console(h: logging.Handler) -> bool:
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(getattr(h, "stream", None), "name", None) in ("<stdout>", "<stderr>"))


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    out: list[logging.Handler] = []
    lg: logging.Logger | None = logger
    while lg is not None:
        out += lg.handlers
        lg = lg.parent if lg.propagate else None
    return out


def emit(text: str, console: bool = True) -> None:
    """Log ``text`` to the progress logger (the run's log file under Hydra) and, when ``console``, show it on the
    console: through a console log handler when one is configured, else with ``print``. With ``console=False``
    the line reaches log files only."""
    handlers = _handlers(progress_logger)
    for h in handlers:
        if _is_console(h) and not any(isinstance(f, _NotOnConsole) for f in h.filters):
            h.addFilter(_NotOnConsole())
    progress_logger.info(text, extra={"zoo_console": bool(console)})
    if console and not any(_is_console(h) for h in handlers):
        print(text, flush=True)
