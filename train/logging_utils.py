"""Per-rank Python logging for training runs.

``setup_logging(run_dir, rank)`` sends every record at ``level`` or above to
``run_dir/train_rank{rank}.log``. Rank 0 also prints to the console; the other ranks print only
ERROR and above, so a crash on any rank is visible without flooding the terminal. Every line
carries a ``[rank r]`` prefix.

Console output goes through ``tqdm.write`` so log lines do not tear the rank-0 progress bar.
Calling ``setup_logging`` again replaces the handlers it installed before (never anyone else's),
and ``teardown_logging`` removes them, which is what tests use.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import IO, Optional, Union

__all__ = ["setup_logging", "teardown_logging", "log_path"]

_MARK = "_pfc_handler"  # attribute set on the handlers this module owns
FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def log_path(run_dir: Union[str, Path], rank: int) -> Path:
    """Where rank ``rank`` writes its log file."""
    return Path(run_dir) / f"train_rank{rank}.log"


class _TqdmConsoleHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so an active progress bar is redrawn below the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is an install requirement
                self.stream.write(msg + self.terminator)
                self.flush()
                return
            tqdm.write(msg, file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _owned(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, _MARK, False)]


def teardown_logging(logger_name: Optional[str] = None) -> None:
    """Removes and closes the handlers that ``setup_logging`` installed on that logger."""
    logger = logging.getLogger(logger_name)
    for h in _owned(logger):
        logger.removeHandler(h)
        h.close()


def setup_logging(
    run_dir: Union[str, Path],
    rank: int = 0,
    level: int = logging.INFO,
    *,
    console: Optional[bool] = None,
    stream: Optional[IO[str]] = None,
    logger_name: Optional[str] = None,
) -> Path:
    """Configures logging for one rank.

    Args:
        run_dir: The run directory (created if missing); the file is ``train_rank{rank}.log``.
        rank: Global rank, used in the file name and in every line's prefix.
        level: Level of the file handler (and of the rank-0 console handler).
        console: Print ``level`` and above to the console; default: only on rank 0. Ranks that do
            not print at ``level`` still print ERROR and above.
        stream: Console stream (default ``sys.stdout``).
        logger_name: Logger to configure; default the root logger, so that ``train.*`` and
            ``partial_fc.*`` loggers are captured.

    Returns:
        The log file's path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = log_path(run_dir, rank)
    logger = logging.getLogger(logger_name)
    teardown_logging(logger_name)

    fmt = logging.Formatter(FORMAT.format(rank=rank))
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setLevel(level)
    file_handler.setFormatter(fmt)

    if console is None:
        console = rank == 0
    console_handler = _TqdmConsoleHandler(stream if stream is not None else sys.stdout)
    console_handler.setLevel(level if console else logging.ERROR)
    console_handler.setFormatter(fmt)

    for h in (file_handler, console_handler):
        setattr(h, _MARK, True)
        logger.addHandler(h)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return path
