"""The one error type users see. Every message leads with ``file:line:col`` when a spec
location is known, then the offending line with a caret, then what was expected."""
from __future__ import annotations

from typing import Optional

from .ir import Loc


class SSMCError(Exception):
    """A spec, shape or usage error a person can act on."""

    def __init__(self, message: str, loc: Optional[Loc] = None, hint: Optional[str] = None):
        self.message = message
        self.loc = loc
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        if self.loc is None or self.loc.line <= 0:
            text = f"error: {self.message}"
        else:
            text = f"{self.loc}: error: {self.message}"
            if self.loc.source_line:
                line = self.loc.source_line.rstrip("\n")
                caret = " " * max(self.loc.column - 1, 0) + "^"
                text += f"\n    {line}\n    {caret}"
        if self.hint:
            text += f"\n  {self.hint}"
        return text


class SpecError(SSMCError):
    """The spec text is malformed or semantically invalid."""


class CallError(SSMCError, ValueError):
    """A compiled callable got arguments that do not fit its family (shape, dtype, device, stride)."""


class TargetError(SSMCError):
    """The requested target cannot compile this plan (with the reason)."""


class ConfigError(TargetError, ValueError):
    """A config a backend cannot use (an unknown key, a value out of range): raised by
    ``ssmc.backends.resolve_config`` before anything is generated."""
