"""Profiles and locations: the one place that reads colad's environment variables.

``COLAD_PROFILE`` selects how big everything is:

* ``smoke`` -- a few dozen tiny generated images; CI and tests.
* ``quick`` -- the generated benchmark at ~128-192 px; the book on a laptop (default).
* ``full`` -- COCO 2017 and the paper's settings; a GPU server.

``COLAD_DATA`` moves the data root (default: ``data/`` at the top of the checkout). The generated
benchmark lives in ``<root>/synth``, COCO 2017 in ``<root>/coco`` and training runs in
``<root>/runs``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PROFILES", "profile_from_env", "data_root", "coco_root"]

PROFILES = ("smoke", "quick", "full")
DEFAULT_PROFILE = "quick"


def profile_from_env(default: str = DEFAULT_PROFILE) -> str:
    """Return the active profile: ``$COLAD_PROFILE`` if set, else ``default``.

    Raises:
        ValueError: the variable names no known profile.
    """
    profile = os.environ.get("COLAD_PROFILE", "").strip().lower() or default
    if profile not in PROFILES:
        raise ValueError(
            f"COLAD_PROFILE={profile!r} is not a profile; choose one of {', '.join(PROFILES)}"
        )
    return profile


def data_root() -> Path:
    """Return the data root: ``$COLAD_DATA`` if set, else ``data/`` beside the package."""
    env = os.environ.get("COLAD_DATA", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data"
    # An installed (non-editable) package has no checkout around it: use the working directory.
    return Path.cwd() / "data"


def coco_root() -> Path:
    """Return where COCO 2017 is expected (``<data root>/coco``), laid out as cocodataset.org ships
    it: ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/`` image folders."""
    return data_root() / "coco"
