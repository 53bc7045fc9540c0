"""Install a lock file into the running Python's environment exactly: `python requirements/install.py LOCK`.

Three steps, the same in `make setup` and every Dockerfile target:

1. the pip of pip.txt (hash-checked), so the installer's behaviour is pinned and not the venv's default;
2. the lock with `--require-hashes --no-deps`: a lock already holds every dependency at its version,
   so nothing is resolved. Resolving is what broke: pip 23.2.1 resolves a requirement with extras
   that another package declares (kserve's `uvicorn[standard]`) as a candidate of its own, takes the
   newest release on the index and refuses it for want of a pin. With `--no-deps` what the index
   holds on the day cannot change the outcome, whichever pip runs;
3. `pip check`: the pins, installed without resolution, still satisfy each other.

Without LOCK only step 1 runs (the CPU image installs torch from another index in between).
Arguments after `--` go to both installs (the tests point them at a local index).
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

INSTALLER = Path(__file__).resolve().parent / "pip.txt"
QUIET = ["--disable-pip-version-check", "-q"]


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    if subprocess.run(command, check=False).returncode != 0:
        sys.exit(f"install.py: failed: {' '.join(command)}")


def install(lock: Path | None, pip_args: Sequence[str] = (), installer: Path = INSTALLER) -> None:
    pip("install", *QUIET, "--no-deps", "--require-hashes", "-r", str(installer), *pip_args)
    if lock is not None:
        pip("install", *QUIET, "--no-deps", "--require-hashes", "-r", str(lock), *pip_args)
        pip("check")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("lock", nargs="?", type=Path, help="a requirements file from `make lock`")
    parser.add_argument("--installer", type=Path, default=INSTALLER, help="the pinned pip (default: pip.txt)")
    args = parser.parse_args(argv)
    install(args.lock, extra, args.installer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
