"""The trial side of a command trial, on the standard library only.

Outside ablate (no ``ABLATE_EVENTS_FD``) every helper still works: parameters come
from ``ABLATE_PARAMS`` or are empty, events go nowhere, and the checkpoint folder
is ``./checkpoint``, so a script runs by hand as it runs in a sweep.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

_EVENTS_FD = "ABLATE_EVENTS_FD"


def params() -> Dict[str, Any]:
    """The trial's parameters: ``ABLATE_PARAMS`` (JSON), else ``ABLATE_PARAMS_FILE``, else ``{}``."""
    text = os.environ.get("ABLATE_PARAMS")
    if text is None and os.environ.get("ABLATE_PARAMS_FILE"):
        text = Path(os.environ["ABLATE_PARAMS_FILE"]).read_text()
    return json.loads(text) if text else {}


def checkpoint_dir() -> Path:
    """Where the trial writes its checkpoint's files (``ABLATE_CHECKPOINT_DIR``); on a
    resume the newest checkpoint's files are already back in it."""
    path = Path(os.environ.get("ABLATE_CHECKPOINT_DIR", "checkpoint"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_step() -> Optional[int]:
    """The step of the checkpoint the trial resumes from (``ABLATE_RESUME_STEP``), or ``None``."""
    step = os.environ.get("ABLATE_RESUME_STEP")
    return int(step) if step else None


def pause_at() -> Optional[int]:
    """The step a searcher stops the trial at (its rung, ``ABLATE_PAUSE_AT``), or ``None``."""
    step = os.environ.get("ABLATE_PAUSE_AT")
    return int(step) if step else None


def should_pause(step: int) -> bool:
    """Whether the trial has reached its rung at ``step``: checkpoint, then :func:`pause`, then exit 0."""
    rung = pause_at()
    return rung is not None and step >= rung


def _number(value: float) -> Any:
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _open_events() -> Optional[Any]:
    """The worker's event pipe: descriptor ``ABLATE_EVENTS_FD`` when this process holds
    it, else (a ``torchrun`` worker, whose launcher closed it) the same pipe by
    ``ABLATE_EVENTS_PATH``."""
    fd = os.environ.get(_EVENTS_FD)
    if not fd:
        return None
    path = os.environ.get("ABLATE_EVENTS_PATH")
    try:
        held = os.fstat(int(fd))
        if path is None or (held.st_dev, held.st_ino) == _identity(path):
            return os.fdopen(int(fd), "w", buffering=1 << 16)
    except OSError:
        pass
    return open(path, "w", buffering=1 << 16) if path else None


def _identity(path: str) -> Any:
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


class _Events:
    """Event lines to the worker, written by a thread of their own so that logging never
    waits on the pipe; :meth:`flush` waits until every line so far is written."""

    def __init__(self) -> None:
        self._out = _open_events()
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue(maxsize=100_000)
        self._thread = threading.Thread(target=self._write, name="ablate-events", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def _write(self) -> None:
        while True:
            line = self._lines.get()
            try:
                if line is not None and self._out is not None:
                    self._out.write(line + "\n")
                if self._lines.empty() and self._out is not None:
                    self._out.flush()
            finally:
                self._lines.task_done()

    def send(self, event: Dict[str, Any]) -> None:
        self._lines.put(json.dumps(event, allow_nan=False))

    def flush(self) -> None:
        self._lines.put(None)
        self._lines.join()


_events: Optional[_Events] = None
_lock = threading.Lock()


def _sink() -> _Events:
    global _events
    with _lock:
        if _events is None:
            _events = _Events()
        return _events


def log(step: int, **metrics: float) -> None:
    """Logs metric points at ``step`` (``log(10, train_loss=0.3)``); buffered, it never blocks
    on the worker. NaN and infinities are kept as such."""
    if not metrics:
        raise ValueError("log() needs at least one metric, such as log(step, loss=0.5)")
    _sink().send({"step": int(step), "metrics": {k: _number(v) for k, v in metrics.items()}})


def output(**values: Any) -> None:
    """Keeps named results with the trial (``output(best_acc=0.93)``); values are JSON."""
    if values:
        _sink().send({"output": values})


def checkpoint(step: int) -> None:
    """Says that the files of step ``step`` are complete in :func:`checkpoint_dir` and waits
    until the worker has stored them (after the metrics logged before), so the files may
    change again once it returns."""
    _sink().send({"checkpoint": int(step)})
    flush()
    ack = os.environ.get("ABLATE_CHECKPOINT_ACK")
    if ack and os.environ.get(_EVENTS_FD):
        while _stored_step(Path(ack)) < int(step):
            time.sleep(0.002)


def _stored_step(ack: Path) -> int:
    try:
        return int(ack.read_text().strip() or -1)
    except (FileNotFoundError, ValueError):
        return -1


def should_stop() -> bool:
    """Whether the worker is stopping the trial (cancelled, pruned, its lease lost, the
    worker shutting down): end soon, SIGTERM follows and SIGKILL after the spec's
    ``grace_seconds``. A checkpoint written now is kept."""
    stop = os.environ.get("ABLATE_STOP_FILE")
    return bool(stop) and Path(stop).exists()


def pause(step: int) -> None:
    """Says that the trial stopped at its rung ``step`` after the checkpoint of that step;
    exit 0 after it."""
    _sink().send({"paused": int(step)})
    flush()


def flush() -> None:
    """Waits until every event so far is written to the worker."""
    _sink().flush()
