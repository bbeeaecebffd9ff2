"""Helpers for tests that interrupt training: import them with ``from helpers_train import stop_after_epoch``."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def stop_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int = 1) -> Callable[[], None]:
    """Make the next runs stop as Ctrl-C would (KeyboardInterrupt, exit 130) right after epoch ``epoch``'s
    checkpoint is saved. Returns the function that puts ``Trainer._save`` back (the end of the test does
    too); not ``monkeypatch.undo()``, which would also undo the fixtures' patches (DERMCAM_HOME)."""
    from dermcam.train import trainer

    original = trainer.Trainer._save

    def save_then_stop(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.epoch == epoch:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(trainer.Trainer, "_save", save_then_stop)
    return lambda: monkeypatch.setattr(trainer.Trainer, "_save", original)
