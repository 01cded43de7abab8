"""Networks trained in this napari session, offered by every model picker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from psygnal import Signal


@dataclass
class RegisteredModel:
    name: str
    net: Any
    info: dict = field(default_factory=dict)

    @property
    def stopped_early(self) -> bool:
        """Training was stopped: a partial model (fewer trained layers or epochs than asked)."""
        return bool(self.info.get("cancelled"))


class ModelRegistry:
    """Networks trained in this napari session (newest last); ``changed`` fires on every addition."""

    changed = Signal()

    def __init__(self):
        self._models: dict[str, RegisteredModel] = {}

    def add(self, net, name: str | None = None, info: dict | None = None) -> str:
        base = name or f"trained {time.strftime('%H:%M:%S')} ({net.n_layers} layers)"
        if (info or {}).get("cancelled") and not name:
            base += ", stopped early"
        name, i = base, 2
        while name in self._models:
            name, i = f"{base} #{i}", i + 1
        self._models[name] = RegisteredModel(name, net, dict(info or {}))
        self.changed.emit()
        return name

    def get(self, name: str) -> RegisteredModel | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return list(self._models)

    def latest(self, complete_only: bool = False) -> RegisteredModel | None:
        """The newest model (``complete_only``: the newest whose training was not stopped)."""
        for entry in reversed(list(self._models.values())):
            if not (complete_only and entry.stopped_early):
                return entry
        return None

    def __len__(self) -> int:
        return len(self._models)


_REGISTRY: ModelRegistry | None = None


def get_model_registry() -> ModelRegistry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = ModelRegistry()
    return _REGISTRY


def reset_model_registry() -> None:
    global _REGISTRY
    _REGISTRY = None


def model_summary(net) -> str:
    """One line on a network: layers, architecture, PSF size, best validation loss."""
    training = (getattr(net, "metadata", {}) or {}).get("training") or {}
    best = training.get("best_val_loss")
    text = f"{net.n_layers}-layer {getattr(net, 'architecture', 'network')}, PSF {net.psf_shape[0]} x {net.psf_shape[1]}"
    if best is not None:
        text += f", best validation loss {best:.4g}"
    if training.get("cancelled"):
        text += " (stopped early)"
    return text
