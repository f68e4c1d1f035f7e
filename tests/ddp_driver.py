"""Runs one training command under Lightning's `ddp` launcher, which re-executes this script for
each rank, with the test callbacks that a command line cannot pass (test_distributed.py).

    python tests/ddp_driver.py base|tokenizer RECORD_DIR key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_helpers import TINY, RecordTimesteps  # noqa: E402

from walt_cli.config import load_recipe  # noqa: E402


def main() -> None:
    stage, record, *overrides = sys.argv[1:]
    recipe = load_recipe(TINY, overrides)
    if stage == "base":
        from walt_cli.systems.base import train_base

        train_base(recipe, progress=False, callbacks=[RecordTimesteps(Path(record))])
    else:
        from walt_cli.systems.tokenizer import train_tokenizer

        train_tokenizer(recipe, progress=False)


if __name__ == "__main__":
    main()
