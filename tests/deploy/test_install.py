"""requirements/install.py installs exactly the lock, whatever newer releases the index holds.

The trap it closes, rebuilt small: a local index on 127.0.0.1 holds wheels made here, where one package
requires another *with extras* (kserve -> uvicorn[standard]) and a newer release of that one exists.
The lock pins the older release. A fresh venv's own pip (23.2.1 on Python 3.11) resolving the lock
takes the newer release as the extras' candidate and refuses to install at all; install.py must give
exactly the locked versions with that same pip.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "requirements" / "install.py"


def _wheel(folder: Path, name: str, version: str, requires: list[str], extras: dict[str, list[str]]) -> Path:
    """A minimal pure-Python wheel: one module, METADATA with its requirements, WHEEL, RECORD."""
    dist = f"{name}-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    for extra, deps in extras.items():
        metadata.append(f"Provides-Extra: {extra}")
        metadata += [f'Requires-Dist: {d} ; extra == "{extra}"' for d in deps]
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": "\n".join(metadata) + "\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: crossvit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _index(root: Path, wheels: list[Path]) -> None:
    """A PEP 503 simple index: /simple/<name>/ lists its files with their sha256."""
    files = root / "files"
    files.mkdir(parents=True)
    by_name: dict[str, list[Path]] = {}
    for wheel in wheels:
        (files / wheel.name).write_bytes(wheel.read_bytes())
        by_name.setdefault(wheel.name.split("-")[0].lower().replace("_", "-"), []).append(wheel)
    for name, found in by_name.items():
        page = root / "simple" / name
        page.mkdir(parents=True)
        links = "".join(f'<a href="../../files/{w.name}#sha256={_sha256(w)}">{w.name}</a>\n' for w in found)
        (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    """The local index (its URL) and the wheels it holds, by `name-version`."""
    made = tmp_path_factory.mktemp("wheels")
    wheels = {
        "extdep-1.0": _wheel(made, "extdep", "1.0", [], {"standard": ["extradep>=1"]}),
        "extdep-2.0": _wheel(made, "extdep", "2.0", [], {"standard": ["extradep>=1"]}),  # newer than the lock
        "extradep-1.0": _wheel(made, "extradep", "1.0", [], {}),
        "wantsextra-1.0": _wheel(made, "wantsextra", "1.0", ["extdep[standard]>=1.0,<3"], {}),
    }
    # the installer: this venv's own bundled pip, served and pinned as pip.txt pins the real one
    bundled = next(Path(sys.base_prefix).glob("lib/python3*/ensurepip/_bundled/pip-*.whl"), None)
    if bundled is None:
        pytest.skip("this Python bundles no pip wheel (ensurepip) to serve as the pinned installer")
    wheels["pip"] = bundled
    root = tmp_path_factory.mktemp("index")
    _index(root, list(wheels.values()))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple", wheels
    finally:
        server.shutdown()
        server.server_close()


def _pin(name: str, version: str, wheel: Path) -> str:
    return f"{name}=={version} \\\n    --hash=sha256:{_sha256(wheel)}\n"


def _env() -> dict[str, str]:
    """No pip configuration of this machine (its local mirrors, wheel folders, constraints): the index alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)  # what `python3 -m venv` gives a new user: the bundled pip
    return path / "bin" / "python"


def _installed(python: Path) -> dict[str, str]:
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    import json

    return {k: v for k, v in json.loads(done.stdout).items() if k not in {"setuptools", "wheel"}}


def _lock(tmp: Path, wheels: dict[str, Path]) -> tuple[Path, Path]:
    lock = tmp / "lock.txt"
    lock.write_text("".join(_pin(*key.split("-"), wheels[key]) for key in ("extdep-1.0", "extradep-1.0",
                                                                            "wantsextra-1.0")))
    pip_version = wheels["pip"].name.split("-")[1]
    installer = tmp / "pip.txt"
    installer.write_text(_pin("pip", pip_version, wheels["pip"]))
    return lock, installer


def test_the_locked_install_gives_exactly_the_lock_with_a_fresh_venvs_pip(
    index: tuple[str, dict[str, Path]], tmp_path: Path
) -> None:
    url, wheels = index
    lock, installer = _lock(tmp_path, wheels)
    python = _fresh_venv(tmp_path / "venv")
    done = subprocess.run(
        [str(python), str(INSTALL), str(lock), "--installer", str(installer), "--", "--index-url", url],
        env=_env(), capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    installed = _installed(python)
    assert {k: v for k, v in installed.items() if k != "pip"} == {"extdep": "1.0", "extradep": "1.0",
                                                                  "wantsextra": "1.0"}
    assert installed["pip"] == wheels["pip"].name.split("-")[1]


def test_the_trap_is_real_a_resolving_install_of_the_same_lock_fails(
    index: tuple[str, dict[str, Path]], tmp_path: Path
) -> None:
    """What `make setup` ran before install.py, with the same pip against the same index: it does not give the
    lock (pip 23.2.1 refuses the newer extras candidate; a pip without that bug would give the lock too)."""
    url, wheels = index
    lock, _ = _lock(tmp_path, wheels)
    python = _fresh_venv(tmp_path / "venv")
    pip_version = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True,
                                 check=True).stdout.split()[1]
    if pip_version != "23.2.1":
        pytest.skip(f"the extras bug is pip 23.2.1's; this Python bundles pip {pip_version}")
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(lock), "--index-url", url],
        env=_env(), capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode != 0
    assert "must have their versions pinned" in done.stderr and "extdep-2.0" in done.stderr, done.stderr
