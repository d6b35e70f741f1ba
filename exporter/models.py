"""Bounded model labels: a client must never create metric series by inventing model names.

A model gets its own label value when the operator allowed it (--models) or the upstream
lists it (its inventory). When the upstream has no model list llmtap can read, names the
upstream itself reported in successful answers are learned, up to a cap. Everything else is
`other`.
"""

from __future__ import annotations

from collections.abc import Callable

OTHER = "other"


def tagged(name: str) -> str:
    """Ollama's implicit tag, the one rule llmtap uses for it: `llama3` is `llama3:latest`
    (a registry host's port, `host:5000/llama3`, is not a tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class ModelLabels:
    def __init__(self, allowed: tuple[str, ...] = (), max_learned: int = 100) -> None:
        self._allowed = frozenset(allowed)
        self._inventory: frozenset[str] | None = None  # None: the upstream's list is unknown
        self._learned: set[str] = set()
        self._max_learned = max_learned
        self._single: str | None = None  # a one-model server serves it whatever name is asked
        self._known: frozenset[str] = self._allowed
        # Told when a request names a model nobody listed (the sidecar refreshes its
        # inventory then: the model may just have been pulled).
        self.on_unknown: Callable[[], None] | None = None

    def set_inventory(self, names: list[str] | None, single_model_server: bool = False) -> None:
        """The upstream's model list (None when it could not be read)."""
        self._inventory = frozenset(names) if names is not None else None
        self._single = names[0] if single_model_server and names and len(names) == 1 else None
        self._rebuild()

    def _rebuild(self) -> None:
        known = set(self._allowed)
        if self._inventory is not None:
            known |= self._inventory
        else:
            known |= self._learned
        self._known = frozenset(known)

    @property
    def known(self) -> frozenset[str]:
        return self._known

    def _lookup(self, name: str) -> str | None:
        if name in self._known:
            return name
        # Ollama treats "llama3" and "llama3:latest" as one model; its list has the tagged name.
        if name and (full := tagged(name)) != name and full in self._known:
            return full
        return None

    def for_request(self, requested: str) -> str:
        """The label while the request is in flight (before the answer names a model)."""
        if (label := self._lookup(requested)) is not None:
            return label
        if self._single is not None:
            return self._single
        if requested and self.on_unknown is not None:
            self.on_unknown()
        return OTHER

    def for_answer(self, requested: str, served: str, success: bool) -> str:
        """The final label: requested if known, else the model the upstream said it served."""
        if (success and served and self._inventory is None and served not in self._known
                and len(self._learned) < self._max_learned):
            self._learned.add(served)
            self._rebuild()
        if (label := self._lookup(requested)) is not None:
            return label
        if (label := self._lookup(served)) is not None:
            return label
        if self._single is not None:
            return self._single
        return OTHER
