"""The `walt` command's process settings (walt_cli/runtime.py): freed CPU memory is kept for reuse."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from walt_cli.runtime import ALLOCATOR_ENV

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Touch a 256 MiB tensor, free it, and report how much of it the process still holds.
PROBE = r"""
import json, sys
from walt_cli.runtime import keep_freed_cpu_memory
kept = keep_freed_cpu_memory()
import torch

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

x = torch.ones(64 << 20)  # 256 MiB, every page written
held = rss()
del x
print(json.dumps({"kept": kept, "released": held - rss()}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, ALLOCATOR_ENV: setting}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's mallopt")
def test_freed_tensor_memory_is_kept_for_reuse():
    kept, system = _probe("keep"), _probe("system")
    assert kept["kept"] is True and system["kept"] is False
    # glibc's default hands a freed 256 MiB block straight back (munmap); kept, it stays.
    assert system["released"] > 200 << 20
    assert kept["released"] < 16 << 20


def test_a_bad_setting_is_one_line_and_exit_2(cli, monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "jemalloc")
    result = cli("plan", "recipes/shapes.yaml")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: WALT_CPU_ALLOCATOR must be keep or system, got 'jemalloc'"
    ]
    # Help needs no allocator: it still prints, for the root and for a subcommand.
    for args in (["plan", "--help"], ["-h"], ["sample", "-h"]):
        result = cli(*args)
        assert result.exit_code == 0, args
        assert "Usage:" in result.output and "WALT_CPU_ALLOCATOR" not in result.output, args
    # A "--help" after "--" is an argument, not a help request.
    result = cli("plan", "--", "--help")
    assert result.exit_code == 2 and "WALT_CPU_ALLOCATOR" in result.output


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(True, False), (False, True), (False, False)])
def test_the_precision_row_points_a_cpu_run_with_native_bf16_to_bf16_mixed(
    monkeypatch, amx, avx512_bf16
):
    """A 32-true run on a CPU with AMX tiles or AVX512-BF16 is told that bf16-mixed trains
    faster there; a CPU with neither, a bf16-mixed run, a CUDA run and failing probes get the
    bare setting."""
    import torch

    from walt_cli.runtime import cpu_has_native_bf16
    from walt_cli.systems.common import precision_row

    def trainer(precision: str, accelerator: str = "cpu"):
        return type("T", (), {"precision": precision, "accelerator": accelerator})()

    native = amx or avx512_bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_native_bf16() is native
    hint = "this CPU has native bf16: trainer.precision=bf16-mixed trains faster"
    assert (hint in precision_row(trainer("32-true"))) is native
    assert precision_row(trainer("32-true")).startswith("32-true")
    assert precision_row(trainer("bf16-mixed")) == "bf16-mixed"
    assert precision_row(trainer("32-true", "cuda")) == "32-true"

    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert not cpu_has_native_bf16()
    assert precision_row(trainer("32-true")) == "32-true"
    # One probe failing does not hide the other's answer.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_has_native_bf16()
