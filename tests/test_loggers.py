"""`trainer.loggers`: TensorBoard event files beside metrics.csv, with the same steps and values,
that a resumed run does not repeat; an unknown logger or a missing package is one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_bad_inputs import assert_one_line_error
from test_base_training import encoded
from training_helpers import TINY, read_metrics, tiny

from walt_cli.errors import WaltError
from walt_cli.systems.base import train_base

TB = ["trainer.loggers=[tensorboard]", "trainer.log_every=1"]
COMMON = ["base.preview_every=0", "trainer.checkpoint_every=2", *TB]


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag as TensorBoard shows it (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _die_at(step: int):
    """A callback that flushes every logger and kills the run after `step`."""
    import lightning as L

    class Die(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if int(module.step) == step:
                for logger in trainer.loggers:
                    logger.flush()
                raise RuntimeError("killed")

    return Die()


def test_tensorboard_has_the_csv_rows_and_a_resume_drops_the_killed_steps(tmp_path: Path):
    """A run killed after logging step 3 with its checkpoint at step 2 resumes at 2: TensorBoard,
    like metrics.csv, then shows each step once, with the rerun's values."""
    recipe = encoded(tmp_path, "base.max_steps=4", *COMMON)
    with pytest.raises(RuntimeError, match="killed"):
        train_base(recipe, progress=False, callbacks=[_die_at(3)])
    stage = Path(recipe.run_dir) / "base"
    killed = scalars(stage / "tensorboard", "train/loss")
    assert [s for s, _ in killed] == [1, 2, 3]

    train_base(tiny(tmp_path, "base.max_steps=4", *COMMON), progress=False)
    rows = read_metrics(stage / "metrics.csv")
    expected = [(int(r["step"]), float(r["train/loss"])) for r in rows]
    got = scalars(stage / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [1, 2, 3, 4]  # step 3 once: the killed run's was purged
    assert got == pytest.approx(expected)
    assert got[:2] == killed[:2]  # the steps before the checkpoint are kept


def test_a_run_killed_before_its_first_checkpoint_starts_tensorboard_again(tmp_path: Path):
    recipe = encoded(tmp_path, "base.max_steps=2", *COMMON)
    with pytest.raises(RuntimeError, match="killed"):
        train_base(recipe, progress=False, callbacks=[_die_at(1)])  # checkpoints come at 2
    train_base(tiny(tmp_path, "base.max_steps=2", *COMMON), progress=False)
    got = scalars(Path(recipe.run_dir) / "base" / "tensorboard", "train/loss")
    assert [s for s, _ in got] == [1, 2]


def test_an_unknown_logger_is_one_line(cli, tmp_path: Path):
    with pytest.raises(WaltError, match="trainer.loggers: unknown logger 'mlflow'"):
        tiny(tmp_path, "trainer.loggers=[mlflow]")
    assert_one_line_error(
        cli("train-base", TINY, "trainer.loggers=[mlflow]"), "unknown logger 'mlflow'"
    )


def test_tensorboard_without_its_package_stops_before_writing(tmp_path: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a),
    )
    recipe = encoded(tmp_path, "base.max_steps=1", *COMMON)
    with pytest.raises(WaltError, match=r"pip install tensorboard"):
        train_base(recipe, progress=False)
    stage = Path(recipe.run_dir) / "base"  # refused before the first step: nothing trained
    assert not any((stage / f).exists() for f in ("last.ckpt", "metrics.csv", "tensorboard"))
