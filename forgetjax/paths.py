"""Where forgetjax finds its own files: the repository root, the shipped configs, and the default data directory."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"


def default_data_dir() -> Path:
    """``$FORGETJAX_DATA_DIR``, else ``../shared/data`` next to the repository (the data pack's default layout)."""
    configured = os.environ.get("FORGETJAX_DATA_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
