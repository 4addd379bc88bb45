"""The errors of kproxy.model."""

from __future__ import annotations


class ModelError(ValueError):
    """A Kubernetes object kproxy cannot use. `reason` is a short label for counters."""

    def __init__(
        self,
        kind: str,
        namespace: str | None,
        name: str | None,
        problems: list[str],
        origin: str | None = None,
        reason: str = "invalid",
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.origin = origin
        self.problems = problems
        self.reason = reason
        super().__init__(self.describe())

    @property
    def object_name(self) -> str:
        if self.name is None:
            return f"{self.kind} without metadata.name"
        return f"{self.kind} {self.namespace or 'default'}/{self.name}"

    def describe(self) -> str:
        where = f" in {self.origin}" if self.origin else ""
        return f"{self.object_name}{where} skipped: " + "; ".join(self.problems)
