"""Prefect homes for the CLI processes the tests start, with the database already migrated.

Every test gives its CLI processes a Prefect home of its own, so no test sees another's runs, leases
or warm server. A new home costs its first temporary server a full database migration and the registration of
Prefect's block types (about 10 s here, more on a loaded machine), which no user pays more than
once. `seeded_home` copies a home whose temporary server ran once (its migrated, empty database and
Prefect's memo of the registration) into the new home instead: the CLI still starts its own
temporary server on its own database; only the one-time set-up is skipped.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_DB = "prefect.db"
_SEED = (_DB, f"{_DB}-wal", "memo_store.toml")  # the WAL may still hold the migrations
_template: Path | None = None


def _migrated_template() -> Path:
    """A Prefect home whose temporary server has run once; built once per machine and Prefect version."""
    global _template
    if _template is not None:
        return _template
    root = Path(tempfile.gettempdir()) / f"embedder-test-home-template-{os.getuid()}"
    root.mkdir(exist_ok=True)
    # One build per machine and Prefect version: xdist workers share it, the lock makes them take turns.
    import prefect

    home = root / prefect.__version__
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / _DB).is_file():
            building = Path(tempfile.mkdtemp(dir=root))
            env = {**os.environ, "PREFECT_HOME": str(building)}
            env.pop("PREFECT_API_URL", None)
            env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
            # Any API call starts the temporary server once: it migrates and registers the block types.
            subprocess.run([sys.executable, "-m", "prefect", "block", "type", "ls"], env=env, check=True,
                           capture_output=True, timeout=600)
            shutil.rmtree(home, ignore_errors=True)
            building.rename(home)
    _template = home
    return home


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI process with its own seeded Prefect ``home`` and a temporary server.

    ``extra`` variables are added; ``PREFECT_API_URL`` is dropped, so no server of the caller's is used.
    """
    env = {**os.environ, "PREFECT_HOME": str(seeded_home(home)), **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def seeded_home(path: Path) -> Path:
    """``path`` as a new Prefect home with a migrated, empty database; returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / _DB).exists():
        template = _migrated_template()
        for name in _SEED:
            if (template / name).is_file():
                shutil.copyfile(template / name, path / name)
    return path
