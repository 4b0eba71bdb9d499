"""pmmcache: PMMRec as a two-stage offline feature-cache pipeline (see README.md)."""
from __future__ import annotations


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, recorded in every cache manifest); from
    pyproject.toml itself when running from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pmmcache")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
