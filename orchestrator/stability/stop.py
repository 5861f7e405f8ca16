"""Why a run stops: a kind the loop acts on, and a message people read. The loop never parses the message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StopReason:
    kind: Literal["diverged", "early_stop"]
    message: str

    @property
    def diverged(self) -> bool:  # a diverged run's last state is not checkpointed
        return self.kind == "diverged"

    def __str__(self) -> str:  # what metrics, reports and the console show
        return f"{'diverged' if self.diverged else 'early stop'}: {self.message}"


def diverged(message: str) -> StopReason:
    return StopReason("diverged", message)


def early_stop(message: str) -> StopReason:
    return StopReason("early_stop", message)
