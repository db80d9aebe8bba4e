"""ablate for Python: the trial side of a command trial (``ablate.trial``), and the
researcher's side, a client of the coordinator's HTTP API (``ablate.Client``).

A program that ablate runs as a trial (``[trial] command = [...]`` in a sweep spec)
reads its parameters, logs metrics, keeps checkpoints and stops at its rung with
these helpers; they write the event protocol of the README's "Command trials".
"""

from ablate.client import AblateError, Client, Experiment, SpecError
from ablate.trial import (
    checkpoint,
    checkpoint_dir,
    flush,
    log,
    output,
    params,
    pause,
    pause_at,
    resume_step,
    should_pause,
    should_stop,
)

__all__ = [
    "AblateError",
    "Client",
    "Experiment",
    "SpecError",
    "checkpoint",
    "checkpoint_dir",
    "flush",
    "log",
    "output",
    "params",
    "pause",
    "pause_at",
    "resume_step",
    "should_pause",
    "should_stop",
]
