"""The lock files (requirements/*.txt) agree with pyproject.toml, pin only PyPI releases, and are what's installed.

Regenerate them with `make lock` whenever these tests say they are stale.
"""

from __future__ import annotations

import importlib.util
import stat
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
HASHED = ("dev", "serve", "serve-cpu", "lean")
# What only torch brings (its CPU-side dependencies, the CUDA stack aside) or what only the torch extra lists:
# none of it belongs in the lean server's lock.
TORCH_ONLY = {"torch", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock", "safetensors",
              "huggingface-hub", "hf-xet"}


def _load_lock_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crossvit_lock", REPO / "requirements" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


lock = _load_lock_tool()


def _pins(name: str) -> list[Any]:
    return lock.parse(lock.LOCKS[name].read_text())


def _key(pins: Iterable[Any]) -> set[tuple[str, str, str | None]]:
    return {(p.name, p.version, p.marker) for p in pins}


def _disagreements(requirements: Iterable[str], pins: list[Any], *, required: bool = True) -> list[str]:
    """Each requirement that the pins leave out (unless only bounds are checked), or pin outside its bounds."""
    by_name: dict[str, list[str]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin.version)
    problems = []
    for text in requirements:
        requirement = Requirement(text)
        versions = by_name.get(lock.normalise(requirement.name))
        if not versions and required:
            problems.append(f"{text}: not in the lock")
        problems += [f"{text}: locked at {v}" for v in versions or []
                     if not requirement.specifier.contains(v, prereleases=True)]
    return problems


@pytest.mark.parametrize("name", sorted(lock.LOCKS))
def test_lock_was_made_from_the_current_pyproject(name: str) -> None:
    recorded = lock.recorded_digest(lock.LOCKS[name])
    assert recorded == lock.digest(), (
        f"requirements/{name}.txt was made from other inputs than pyproject.toml and "
        "requirements/constraints.txt hold now: run `make lock` and commit requirements/"
    )


def test_the_digest_sees_a_new_dependency_but_not_reordering() -> None:
    data = lock.inputs()
    assert lock.digest(data) == lock.digest()
    reordered = {**data, "dependencies": list(reversed(data["dependencies"]))}
    assert lock.digest(reordered) == lock.digest(data)
    added = {**data, "dev": [*data["dev"], "schemathesis>=3"]}
    assert lock.digest(added) != lock.digest(data)
    bound = {**data, "dependencies": [d.replace(">=", ">=1!") for d in data["dependencies"]]}
    assert lock.digest(bound) != lock.digest(data)


def test_every_requirement_is_pinned_within_its_bounds() -> None:
    data = lock.inputs()
    lean = [*data["dependencies"], *data["build"]]
    served = [*lean, *data["torch"]]
    for name, requirements in (("dev", [*served, *data["dev"]]), ("serve", served), ("lean", lean)):
        assert _disagreements(requirements, _pins(name)) == [], name
        assert _disagreements(data["constraints"], _pins(name), required=False) == [], name
    assert "openvino>=2025.1" in data["dependencies"]  # the CPU backend is a runtime dependency
    # the lean server: torch and what only the torch side needs are the extra's
    assert not {lock.normalise(Requirement(r).name) for r in data["dependencies"]} & TORCH_ONLY
    assert {lock.normalise(Requirement(r).name) for r in data["torch"]} == {"torch", "safetensors", "huggingface-hub"}
    assert set(data["torch"]) <= set(data["dev"])  # dev takes the torch extra in (`crossvit-serve[torch]`)


def test_references_to_the_projects_own_extras_are_expanded() -> None:
    """pip reads `crossvit-serve[torch]` in the dev extra as "the torch extra's requirements"; uv, given the
    list alone, would look crossvit-serve up on PyPI."""
    project = {"name": "Crossvit_Serve", "optional-dependencies": {
        "torch": ["torch>=2.4", "safetensors>=0.4"],
        "tools": ["ruff>=0.5"],
        "dev": ["crossvit-serve[torch, tools]", "pytest>=8", "tritonclient[http]>=2.40"],
    }}
    assert lock._extra(project, "dev") == ["torch>=2.4", "safetensors>=0.4", "ruff>=0.5", "pytest>=8",
                                           "tritonclient[http]>=2.40"]
    looping = {"name": "crossvit-serve", "optional-dependencies": {"a": ["crossvit-serve[b]"],
                                                                   "b": ["crossvit-serve[a]"]}}
    with pytest.raises(SystemExit, match="cycle"):
        lock._extra(looping, "a")
    assert all(not r.replace(" ", "").lower().startswith("crossvit-serve[") for r in lock.inputs()["dev"])


def test_disagreements_are_found() -> None:
    pins = _pins("serve")
    torch = next(p for p in pins if p.name == "torch")
    assert _disagreements([f"torch>{torch.version}"], pins) == [f"torch>{torch.version}: locked at {torch.version}"]
    assert _disagreements(["tritonclient[http]>=2"], pins) == ["tritonclient[http]>=2: not in the lock"]
    assert _disagreements(["Pillow>=10.1", "uvicorn[standard]>=0.29"], pins) == []  # names are normalised


@pytest.mark.parametrize("name", HASHED)
def test_pins_are_exact_hashed_pypi_releases(name: str) -> None:
    text = lock.LOCKS[name].read_text()
    pins = _pins(name)
    assert len(pins) >= (30 if name == "lean" else 50)
    for pin in pins:
        assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), pin.name
        assert Version(pin.version).local is None, pin  # a local build (`+cpu`) is not on PyPI
    # nothing but pins, hashes and comments: no index, find-links, path or URL of some machine
    statements = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all(line.startswith("--hash=") or lock._PIN.match(line) for line in statements), name
    assert "://" not in text and "file:" not in text


def test_serve_is_dev_at_the_same_versions_and_cpu_drops_only_the_cuda_stack() -> None:
    dev, serve, cpu = _key(_pins("dev")), _key(_pins("serve")), _key(_pins("serve-cpu"))
    assert serve <= dev  # the image runs what the tests ran
    assert cpu <= serve
    dropped = {name for name, _, _ in serve - cpu}
    assert "torch" in dropped and any(n.startswith("nvidia-") for n in dropped)
    assert all(n == "torch" or lock.CUDA_STACK.match(n) for n in dropped), dropped
    # torch's own CPU-side dependencies stay
    assert {"sympy", "networkx", "filelock", "jinja2", "fsspec", "typing-extensions"} <= {n for n, _, _ in cpu}
    assert _key(_pins("torch")) == {k for k in serve if k[0] == "torch"}
    assert not any(p.hashes for p in _pins("torch"))  # the `+cpu` wheels are not PyPI's files


def test_lean_is_the_cpu_image_without_torch_at_the_same_versions() -> None:
    """The lean server runs what the tests ran, less torch and everything only the torch side needs."""
    dev, cpu, lean = _key(_pins("dev")), _key(_pins("serve-cpu")), _key(_pins("lean"))
    assert lean <= cpu <= dev
    names = {name for name, _, _ in lean}
    assert not names & TORCH_ONLY and not any(lock.CUDA_STACK.match(n) for n in names), names & TORCH_ONLY
    assert {"openvino", "numpy", "fastapi", "uvicorn", "pillow", "setuptools"} <= names


def test_relocking_keeps_the_pins_of_the_previous_lock(tmp_path: Path) -> None:
    """uv prefers the versions its --output-file pins: lock.py hands it the previous lock there, so `make lock`
    after a dependency change moves only what that change needs (a stand-in for uv records what it was given)."""
    uv = tmp_path / "uv"
    uv.write_text(
        "#!/bin/sh\n"
        'while [ "$#" -gt 1 ]; do [ "$1" = --output-file ] && out="$2"; shift; done\n'
        'cp "$out" "$out.seen" 2>/dev/null; echo "fresh==1.0" > "$out"\n'
    )
    uv.chmod(uv.stat().st_mode | stat.S_IXUSR)
    previous = tmp_path / "previous.txt"
    previous.write_text("kept==0.9\n")
    work = tmp_path / "work"
    work.mkdir()
    assert lock._compile(str(uv), ["kept"], [], work, "dev", keep=previous) == "fresh==1.0\n"
    assert (work / "dev.out.txt.seen").read_text() == "kept==0.9\n"  # uv saw the previous pins
    assert lock._compile(str(uv), ["kept"], [], work, "lean") == "fresh==1.0\n"
    assert not (work / "lean.out.txt.seen").exists()  # without a previous lock, nothing to keep


def test_this_environment_is_the_lock() -> None:
    """`make setup` installed exactly dev.txt: every pin that applies here is the installed version."""
    checked = 0
    for pin in _pins("dev"):
        if pin.marker and not Marker(pin.marker).evaluate():
            continue
        try:
            installed = version(pin.name)
        except PackageNotFoundError:
            pytest.fail(f"{pin.name}=={pin.version} is locked but not installed: run `make setup`")
        assert Version(installed).public == Version(pin.version).public, (pin.name, installed, pin.version)
        checked += 1
    assert checked >= 50
