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
