"""The agent's one error: it cannot start (or a part of it stopped); the message says what to fix."""

from __future__ import annotations


class AgentError(RuntimeError):
    """The agent cannot start; the message says what to fix."""
