"""Training progress (`walt_cli.systems.progress.StepProgress`): counted in the system's own
steps, resumed runs included, as a Rich bar on a terminal and as plain lines in a log."""

from __future__ import annotations

import io
import pickle
import re

import lightning as L
import pytest
import torch
from rich.console import Console

from walt_cli.console import format_duration
from walt_cli.systems.progress import StepProgress, format_rate


class Counting(L.LightningModule):
    """A step-based system like walt's: it counts its own steps and stops at max_steps; the
    loader (100 batches) is much longer than the run, as walt's are."""

    def __init__(self, max_steps: int, start: int = 0, val_every: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.max_steps = max_steps
        self.step = start
        self.val_every = val_every

    def training_step(self, batch, batch_idx):
        loss = self.net(batch).pow(2).mean()
        self.step += 1
        if self.step >= self.max_steps:
            self.trainer.should_stop = True
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_psnr", 27.5, prog_bar=True, logger=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(100, 2), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(2, 2), batch_size=1)


def fit(module: Counting, console: Console, every: int | None = None, log_every: int = 50):
    trainer = L.Trainer(
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[StepProgress(console, every=every)],
        val_check_interval=module.val_every,
        check_val_every_n_epoch=None if module.val_every else 1,
        limit_val_batches=2 if module.val_every else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every,
    )
    trainer.fit(module)


def plain_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


def test_log_lines_count_the_systems_steps_not_the_loaders_batches():
    console, buf = plain_console()
    fit(Counting(max_steps=6), console, every=2)
    lines = buf.getvalue().splitlines()
    steps = [re.match(r"step (\d+)/(\d+) \(\d+%\)", line).groups() for line in lines]
    # The first step (the run is alive), every 2 steps, the end; never the loader's 100.
    assert steps == [("1", "6"), ("2", "6"), ("4", "6"), ("6", "6")]
    assert "(100%)" in lines[-1] and "eta 0:00" in lines[-1]
    assert re.search(r"loss \d", lines[-1])
    assert re.search(r" · \d+\.\d\d (steps/s|s/step) · elapsed \d+:\d\d · ", lines[-1])


def test_log_lines_default_to_the_trainers_log_interval():
    console, buf = plain_console()
    fit(Counting(max_steps=7), console, log_every=3)
    got = [int(m) for m in re.findall(r"^step (\d+)/7", buf.getvalue(), flags=re.M)]
    assert got == [1, 3, 6, 7]


def test_a_resumed_run_counts_on_from_its_step():
    console, buf = plain_console()
    fit(Counting(max_steps=10, start=6), console, every=2)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "resuming at step 6/10"
    got = [int(m) for m in re.findall(r"^step (\d+)/10", buf.getvalue(), flags=re.M)]
    assert got == [7, 8, 10]


def test_validation_metrics_get_a_line_of_their_own():
    console, buf = plain_console()
    fit(Counting(max_steps=4, val_every=2), console, every=4)
    lines = buf.getvalue().splitlines()
    assert "step 2: validation · val_psnr 27.5" in lines
    # The step lines keep to the training metrics: an old validation figure is not repeated.
    assert all("val_psnr" not in line for line in lines if re.match(r"step \d+/", line))


def test_terminal_bar_ends_at_max_steps():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=160, color_system=None)
    fit(Counting(max_steps=5, start=2), console)
    out = buf.getvalue()
    assert "5/5" in out and "/100" not in out
    assert re.search(r"loss \d", out)


def test_a_run_on_another_rank_prints_nothing():
    bar = StepProgress(Console(file=io.StringIO()))
    bar.disable()
    assert bar.is_disabled and not bar.is_enabled
    bar.on_train_start(None, Counting(3))  # returns before touching the trainer


def test_the_default_bar_pickles_for_ddp_spawn():
    """`trainer.strategy=ddp_spawn` pickles the callbacks: the bar holds no console until used."""
    from walt_cli.console import err_console

    bar = pickle.loads(pickle.dumps(StepProgress()))
    assert bar.console is err_console


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0:00"), (61.9, "1:01"), (3723, "1:02:03"), (float("inf"), "?")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_rate_switches_to_seconds_per_step_below_one():
    assert format_rate(2.5) == "2.50 steps/s"
    assert format_rate(0.5) == "2.00 s/step"
    assert format_rate(float("nan")) == "? steps/s"


# ---------------------------------------------------------------- `walt_cli.console.progress`


def logged(monkeypatch, *, terminal: bool, **kwargs):
    from walt_cli import console as console_module

    buf = io.StringIO()
    fake = Console(file=buf, force_terminal=terminal, width=160, color_system=None)
    monkeypatch.setattr(console_module, "err_console", fake)
    return console_module.progress(**kwargs), buf


def test_plain_progress_prints_a_line_per_interval_and_at_completion(monkeypatch):
    bar, buf = logged(monkeypatch, terminal=False, log_every_s=0.0)
    with bar:
        task = bar.add_task("I3D features of real", total=4)
        for _ in range(4):
            bar.advance(task)
        bar.update(task, completed=4)  # completed again: its line is not repeated
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("I3D features of real:")]
    assert [ln.split(" · ")[0] for ln in lines] == [
        "I3D features of real: 1/4 (25%)",
        "I3D features of real: 2/4 (50%)",
        "I3D features of real: 3/4 (75%)",
        "I3D features of real: 4/4 (100%)",
    ]
    assert "eta" not in lines[-1]  # done: its elapsed time only


@pytest.mark.parametrize("transient", [False, True])
def test_plain_progress_of_short_work_prints_one_final_state(monkeypatch, transient):
    """Under the interval, a task's only line is its final state: Rich's render when the bar
    stops, or ours at completion where the bar is transient (Rich then prints nothing)."""
    bar, buf = logged(monkeypatch, terminal=False, transient=transient)  # 30 s between lines
    with bar:
        task = bar.add_task("decode", total=3)
        for _ in bar.track(range(3), task_id=task):
            pass
    lines = [ln for ln in buf.getvalue().splitlines() if ln.startswith("decode")]
    assert len(lines) == 1
    assert lines[0].startswith("decode: 3/3 (100%) · elapsed 0:0" if transient else "decode ━")


def test_terminal_progress_prints_no_plain_lines(monkeypatch):
    bar, buf = logged(monkeypatch, terminal=True, log_every_s=0.0)
    with bar:
        task = bar.add_task("decode", total=2)
        bar.advance(task, 2)
    assert "decode: 2/2 (100%)" not in buf.getvalue()
    assert "2/2" in buf.getvalue()  # Rich's own bar
