"""Regenerate the lock files from pyproject.toml: `make lock` (uv resolves, plain pip installs).

Five files, all generated, never edited by hand:

- dev.txt        [project].dependencies + the dev extra (which takes in the torch extra) + [build-system].requires:
                 what `make setup` installs
- serve.txt      [project].dependencies + the torch extra + [build-system].requires, at dev.txt's versions:
                 the cuda image (and the cpu-full image built with TORCH_INDEX_URL empty)
- serve-cpu.txt  serve.txt without torch and the CUDA stack torch pulls from PyPI (nvidia-*, cuda-*, triton):
                 the stages with CPU-only torch take torch from PyTorch's CPU index instead
- torch.txt      serve.txt's torch pin, without hashes (the CPU index's wheels are `+cpu` builds)
- lean.txt       [project].dependencies + [build-system].requires alone, at dev.txt's versions: the lean cpu
                 image, which serves a prepared OpenVINO model without torch

and pip.txt, the installer itself (installer.in, hashed), which requirements/install.py bootstraps
before it installs any of them.

Resolution is universal (every platform and Python version that requires-python allows, split by
markers) against PyPI alone: uv runs with no configuration and no UV_* variables, so a machine's
local indexes or wheel folders never leak into a lock. constraints.txt caps what the project's
machines carry. Every file starts with the sha256 of its inputs, which tests/deploy/test_lock.py
recomputes: editing pyproject.toml without `make lock` fails the tests.

A lock only moves where the inputs make it: uv resolves dev.txt with the existing dev.txt as its
`--output-file`, so it keeps every pin that still satisfies the requirements and picks new versions
only for what is new (the other files follow dev.txt). `--upgrade` resolves afresh to the newest releases.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYPROJECT = REPO / "pyproject.toml"
CONSTRAINTS = HERE / "constraints.txt"
LOCKS = {name: HERE / f"{name}.txt" for name in ("dev", "serve", "serve-cpu", "torch", "lean")}
INSTALLER_IN = HERE / "installer.in"
INSTALLER = HERE / "pip.txt"
FORMAT = 1  # bump when the way the files are made changes, so old locks read as stale
DIGEST_LINE = "# inputs-sha256: "
# What PyPI's torch needs only for CUDA; the CPU index's torch declares none of it.
CUDA_STACK = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
# `crossvit-serve[torch]` in an extra of crossvit-serve: pip's way of saying "everything that extra lists"
_SELF = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*\[(?P<extras>[^\]]+)\]\s*(?:;\s*(?P<marker>.+))?$")
_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)"  # name[extras]==version
    r"\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$"  # ; marker, and the continuation backslash
)


@dataclass(frozen=True)
class Pin:
    name: str  # normalised (PEP 503)
    version: str
    marker: str | None
    hashes: tuple[str, ...]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extra(project: dict[str, Any], extra: str, seen: tuple[str, ...] = ()) -> list[str]:
    """An extra's requirements, with the project's references to its own extras (`crossvit-serve[torch]`)
    replaced by what those extras list: uv cannot look the project itself up on PyPI."""
    if extra in seen:
        sys.exit(f"pyproject.toml: the extras {' -> '.join([*seen, extra])} refer to each other in a cycle")
    own = normalise(project["name"])
    found: list[str] = []
    for requirement in project.get("optional-dependencies", {}).get(extra, []):
        match = _SELF.match(requirement)
        if match is None or normalise(match["name"]) != own:
            found.append(requirement)
        elif match["marker"]:
            sys.exit(f"pyproject.toml: {requirement!r}: a reference to the project's own extras takes no marker here")
        else:
            for name in match["extras"].split(","):
                found += _extra(project, name.strip(), (*seen, extra))
    return found


def inputs() -> dict[str, list[str]]:
    """What the locks are made from: the requirement lists of pyproject.toml and the constraints."""
    project = tomllib.loads(PYPROJECT.read_text())
    constraints = [line.split("#", 1)[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    return {
        "requires-python": [project["project"]["requires-python"]],
        "dependencies": list(project["project"]["dependencies"]),
        "torch": _extra(project["project"], "torch"),
        "dev": _extra(project["project"], "dev"),
        "build": list(project["build-system"]["requires"]),
        "constraints": [c for c in constraints if c],
    }


def digest(data: dict[str, list[str]] | None = None) -> str:
    """sha256 of the inputs; order and spacing within a list do not count, content does."""
    data = inputs() if data is None else data
    canonical = {key: sorted(" ".join(item.split()) for item in items) for key, items in data.items()}
    return hashlib.sha256(json.dumps({"format": FORMAT, **canonical}, sort_keys=True).encode()).hexdigest()


def installer_digest() -> str:
    """sha256 of installer.in's requirement lines (pip.txt has its own: the other locks do not change with it)."""
    lines = sorted(" ".join(line.split("#", 1)[0].split()) for line in INSTALLER_IN.read_text().splitlines())
    return hashlib.sha256(json.dumps({"format": FORMAT, "installer": [x for x in lines if x]}).encode()).hexdigest()


def recorded_digest(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line.removeprefix(DIGEST_LINE).strip()
    return None


def parse(text: str) -> list[Pin]:
    """The pins of a generated requirements file: `name==version ; marker` with its `--hash` lines."""
    pins: list[Pin] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _PIN.match(lines[i])
        i += 1
        if not match:
            continue
        hashes = []
        while i < len(lines) and lines[i].lstrip().startswith("--hash="):
            hashes.append(lines[i].strip().removeprefix("--hash=").rstrip(" \\"))
            i += 1
        pins.append(Pin(normalise(match["name"]), match["version"], match["marker"], tuple(hashes)))
    return pins


def _header(purpose: str, sources: str = "pyproject.toml and requirements/constraints.txt",
            inputs_digest: str | None = None) -> str:
    return (
        f"# {purpose}\n"
        f"# Generated by `make lock` (requirements/lock.py) from {sources};\n"
        "# do not edit. Universal: markers select the pins for each platform and Python version.\n"
        f"{DIGEST_LINE}{inputs_digest or digest()}\n"
    )


def _compile(uv: str, requirements: Iterable[str], extra_args: Sequence[str], workdir: Path, name: str,
             *, constrained: bool = True, keep: Path | None = None) -> str:
    """uv's lock of `requirements`; with `keep` (a previous lock), its pins wherever they still fit."""
    source = workdir / f"{name}.in"
    source.write_text("\n".join(requirements) + "\n")
    output = workdir / f"{name}.out.txt"
    if keep is not None and keep.exists():
        shutil.copyfile(keep, output)  # uv prefers the versions its --output-file already pins
    python = re.search(r"\d+\.\d+", inputs()["requires-python"][0])
    assert python, "requires-python names no version"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    command = [
        uv, "pip", "compile", "--no-config", "--quiet", "--universal", "--python-version", python.group(0),
        "--generate-hashes", "--no-header", *(["--constraints", str(CONSTRAINTS)] if constrained else []),
        "--output-file", output.name, *extra_args, str(source),
    ]
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"uv pip compile failed for {name}:\n{done.stderr}")
    # the "via" annotations name a temporary file and this checkout's path: say what they stand for,
    # so that the lock is the same wherever `make lock` runs
    return output.read_text().replace(f"-r {source.name}", "pyproject.toml").replace(
        f"-c {CONSTRAINTS}", "-c requirements/constraints.txt"
    )


def _resolve_uv(uv: str) -> str:
    """An absolute path: uv runs in a temporary folder."""
    return str(Path(uv).resolve()) if os.sep in uv else shutil.which(uv) or uv


def requirement_lines(pins: Iterable[Pin]) -> str:
    """Pins as a hash-checked requirements file (`name==version ; marker --hash=...`), e.g. a lock's subset."""
    return "".join(f"{p.name}=={p.version}" + (f" ; {p.marker}" if p.marker else "")
                   + "".join(f" --hash={h}" for h in p.hashes) + "\n" for p in pins)


def lock(uv: str, *, upgrade: bool = False) -> None:
    uv = _resolve_uv(uv)
    data = inputs()
    with tempfile.TemporaryDirectory(prefix="crossvit-lock-") as tmp:
        work = Path(tmp)
        dev = _compile(uv, [*data["dependencies"], *data["dev"], *data["build"]], [], work, "dev",
                       keep=None if upgrade else LOCKS["dev"])
        (work / "dev.txt").write_text(dev)
        served = [*data["dependencies"], *data["torch"], *data["build"]]
        serve = _compile(uv, served, ["--constraints", "dev.txt"], work, "serve")
        (work / "serve.txt").write_text(serve)
        cuda = sorted({p.name for p in parse(serve) if CUDA_STACK.match(p.name)})
        (work / "cuda.txt").write_text("\n".join(cuda) + "\n")
        cpu = _compile(
            uv, served,
            ["--constraints", "serve.txt", "--excludes", "cuda.txt", "--no-emit-package", "torch"], work, "serve-cpu",
        )
        lean = _compile(uv, [*data["dependencies"], *data["build"]], ["--constraints", "dev.txt"], work, "lean")
    torch = [p for p in parse(serve) if p.name == "torch"]
    assert torch, "serve.txt pins no torch"
    torch_lines = requirement_lines(dataclasses.replace(p, hashes=()) for p in torch)  # the +cpu builds differ
    outputs = {
        "dev": _header("make setup / make test: the service, its tests and tools") + dev,
        "serve": _header("The cuda image (and cpu-full with TORCH_INDEX_URL empty): the service with torch") + serve,
        "serve-cpu": _header("The stages with CPU-only torch (cpu-full, preparing the cpu image's model): "
                             f"serve.txt less torch and {', '.join(cuda)}") + cpu,
        "torch": _header("Those stages install this torch from TORCH_INDEX_URL (no hashes: the `+cpu` builds "
                         "live on PyTorch's index, not PyPI)") + torch_lines,
        "lean": _header("The cpu image: the lean server alone, no torch (it serves a prepared OpenVINO model)") + lean,
    }
    for name, text in outputs.items():
        LOCKS[name].write_text(text)
        print(f"wrote {LOCKS[name].relative_to(REPO)} ({len(parse(text))} pins)")
    lock_installer(uv)


def lock_installer(uv: str) -> None:
    """pip.txt from installer.in: the installer's own pin, hashed like every other."""
    requirements = [line.split("#", 1)[0].strip() for line in INSTALLER_IN.read_text().splitlines()]
    with tempfile.TemporaryDirectory(prefix="crossvit-lock-") as tmp:
        text = _compile(uv, [r for r in requirements if r], [], Path(tmp), "installer", constrained=False)
    header = _header("requirements/install.py installs this pip first, then the lock it is given",
                     "requirements/installer.in", installer_digest())
    INSTALLER.write_text(header + text.replace("pyproject.toml", "requirements/installer.in"))
    print(f"wrote {INSTALLER.relative_to(REPO)} ({len(parse(text))} pins)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", default="uv", help="the uv executable (make lock installs a pinned one)")
    parser.add_argument("--upgrade", action="store_true",
                        help="resolve afresh to the newest releases instead of keeping dev.txt's pins where they fit")
    parser.add_argument("--installer-only", action="store_true",
                        help="rewrite pip.txt alone (after raising installer.in), leaving the locks' pins as they are")
    args = parser.parse_args(argv)
    if args.installer_only:
        lock_installer(_resolve_uv(args.uv))
    else:
        lock(args.uv, upgrade=args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
