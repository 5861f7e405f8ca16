"""The building blocks of every spec section: a strict pydantic model, and a field with its one line of documentation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def doc(default: Any = ..., text: str = "", **limits: Any) -> Any:
    """A field with its one line of documentation (mutable defaults are copied per instance)."""
    if isinstance(default, (BaseModel, list)):
        return Field(default_factory=lambda: default.model_copy(deep=True) if isinstance(default, BaseModel) else list(default),
                     description=text, **limits)
    return Field(default, description=text, **limits)
