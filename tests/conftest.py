"""Shared fixtures. Tests that need the real-data assets skip, with the reason, where none exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from walt_cli.assets import assets_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def assets() -> Path:
    root = assets_dir()
    if root is None:
        pytest.skip("real-data assets not found: set WALT_ASSETS or place them at ../shared/assets")
    return root


@pytest.fixture(scope="session")
def videos_dir(assets: Path) -> Path:
    return assets / "videos"


@pytest.fixture()
def cli():
    """Invoke the `walt` app in-process: cli(args...) -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from walt_cli.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


class ResumeProbe:
    """Lightning callbacks for the resume tests: `callback("end")` snapshots a run's state when
    it ends, `callback("start")` when a rerun starts, and both record the system's step at each
    batch (`first_steps`). `snapshot(trainer, module) -> dict` says what is compared."""

    def __init__(self, snapshot) -> None:
        self.snapshot = snapshot
        self.seen: dict[str, dict] = {}
        self.first_steps: list[int] = []

    def callback(self, when: str):
        import lightning as L

        probe = self

        class Capture(L.Callback):
            def on_train_start(self, trainer, module):
                if when == "start":
                    probe.seen["start"] = probe.snapshot(trainer, module)

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                probe.first_steps.append(int(module.step))

            def on_train_end(self, trainer, module):
                if when == "end":
                    probe.seen["end"] = probe.snapshot(trainer, module)

        return Capture()


@pytest.fixture()
def resume_probe():
    """ResumeProbe(snapshot): see the class."""
    return ResumeProbe
