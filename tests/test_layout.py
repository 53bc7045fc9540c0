"""Imports point one way: the rules of the layout, checked on the source (every import, relative ones
resolved, function-level ones included).

- model/ is the model alone: nothing of the service, the weights tooling or the client;
- client/ stands alone (its own distribution): nothing of the server, and no torch, OpenVINO or numpy;
- the worker process's side (service/worker/) never imports the HTTP face (service/api/, the app), the
  uploads or the parent's inference machinery: what both sides share is service/worker/protocol.py;
- the imaging (service/imaging/) is pure: nothing of the HTTP face, the uploads, inference or the worker;
- the self-test's golden images, record and comparison (service/golden/) are read by both sides: besides
  the imaging, nothing of either; the INT8 calibration set and guard (service/quantization/) likewise;
- inference (the parent's engine, batcher, pool) never imports the HTTP face;
- of the server, only service/schemas.py imports the client, and only its wire models.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service", "weights", "client")

WORKER_SIDE = ("service.worker",)
PARENT_AND_HTTP = ("service.app", "service.cli", "service.api", "service.uploads", "service.inference")
# (importer prefixes, forbidden import prefixes, why)
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("model",), ("service", "weights", "client"), "the model package stands alone"),
    (("client",), ("service", "model", "weights", "torch", "openvino", "numpy"),
     "the client is its own distribution (httpx, pydantic, tqdm)"),
    (WORKER_SIDE, PARENT_AND_HTTP, "the worker process shares only service.worker.protocol with the parent"),
    (("service.imaging",), ("service.api", "service.uploads", "service.inference", "service.worker", "service.app"),
     "the imaging is pure: bytes in, pixels out"),
    (("service.golden",), ("service.api", "service.uploads", "service.inference", "service.worker", "service.app"),
     "the golden record is shared by the worker and the parent: it imports neither"),
    (("service.quantization",), ("service.api", "service.uploads", "service.inference", "service.worker",
                                 "service.app"),
     "the INT8 calibration images and guard are read by the worker's quantisation: nothing of either side"),
    (("service.inference",), ("service.api", "service.app", "service.cli"), "inference knows nothing of HTTP"),
]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> Iterator[str]:
    """Every module `path` imports, absolute."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                yield f"{prefix}.{node.module}" if node.module else prefix
                if not node.module:  # `from . import x`: x may be a module
                    yield from (f"{prefix}.{alias.name}" for alias in node.names)
            elif node.module:
                yield node.module


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(root: Path) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            for imported in imports(path, root):
                for importers, forbidden, why in RULES:
                    if _under(module, importers) and _under(imported, forbidden):
                        found.append(f"{module} imports {imported}: {why}")
                if _under(imported, ("client",)) and not _under(module, ("client",)) and (
                        module != "service.schemas" or imported != "client.wire"):
                    found.append(f"{module} imports {imported}: only service.schemas imports the client (client.wire)")
    return found


def test_imports_point_one_way() -> None:
    assert violations(REPO) == []


@pytest.mark.parametrize(("file", "line"), [
    ("client/extra.py", "from service.engine import Engine"),
    ("client/extra.py", "import torch"),
    ("model/extra.py", "from service import routes"),
    ("service/worker/backends/extra.py", "from ...inference.pool import WorkerPool"),
    ("service/worker/extra.py", "from ..api.deps import EngineDep"),
    ("service/imaging/extra.py", "from ..uploads.bodies import Body"),
    ("service/golden/extra.py", "from ..inference.pool import WorkerPool"),
    ("service/inference/extra.py", "from ..api import v1"),
    ("service/routes_extra.py", "from client.api import Client"),
])
def test_a_forbidden_import_is_found(tmp_path: Path, file: str, line: str) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(line + "\n")
    assert violations(tmp_path), line
