"""Put in bench/gpu/carry what a lent GPU machine lacks: `python bench/gpu/fetch.py [--python 3.12]`.

The lent machines hold torch, torchvision, timm, pillow, httpx, safetensors, huggingface-hub,
prometheus-client and tqdm, and reach no package index. This downloads, at the versions the lock pins
(hash-checked), the wheels of everything else the service, its gpu tests and the LitServe peer import,
for that machine's Python, into carry/wheels; and copies scikit-image's photos (the tests' images) into
carry/photos, so that scikit-image need not travel. bench/gpu/run.py installs them there; the device
tool carries the folder (`carry: ["bench/gpu/carry"]`; git ignores it).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / "bench" / "gpu" / "carry"
sys.path.insert(0, str(ROOT / "requirements"))

from lock import parse, requirement_lines  # noqa: E402

# Imported by the service, its tests or LitServe, and not on the lent machines.
PACKAGES = {
    "fastapi", "starlette", "uvicorn", "h11", "httptools", "pydantic", "pydantic-core", "pydantic-settings",
    "python-dotenv", "typing-inspection", "annotated-types", "annotated-doc", "python-multipart", "pytest",
    "pluggy", "iniconfig", "packaging", "litserve", "pyzmq", "anyio", "idna",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


def requirements(lock: Path) -> str:
    """The lock's pins (with their markers and hashes) for PACKAGES."""
    pins = [p for p in parse(lock.read_text()) if p.name in PACKAGES]
    missing = PACKAGES - {p.name for p in pins}
    if missing:
        sys.exit(f"not in {lock.name}: {sorted(missing)}")
    return requirement_lines(pins)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--python", default="3.12", help="the lent machine's Python version")
    args = parser.parse_args()
    wheels = CARRY / "wheels"
    shutil.rmtree(CARRY, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as req:
        req.write(requirements(ROOT / "requirements" / "dev.txt"))
        req.flush()
        abi = "cp" + args.python.replace(".", "")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--require-hashes", "--python-version", args.python, "--implementation", "cp", "--abi", abi,
                        "--abi", "abi3", "--abi", "none", *(f"--platform={p}" for p in PLATFORMS),
                        "-d", str(wheels), "-r", req.name], check=True)
    spec = importlib.util.find_spec("skimage")
    assert spec and spec.submodule_search_locations, "scikit-image (make setup installs it) holds the photos"
    photos = CARRY / "photos"
    photos.mkdir()
    for path in (Path(spec.submodule_search_locations[0]) / "data").iterdir():
        if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
            shutil.copy(path, photos / path.name)
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"{CARRY.relative_to(ROOT)}: {len(list(wheels.iterdir()))} wheels, "
          f"{len(list(photos.iterdir()))} photos, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
