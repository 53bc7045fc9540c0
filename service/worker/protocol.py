"""What the pool (parent) and a worker process say to each other: the one module both sides import.

A worker is spawned with its `ReplicaSpec` and its `Slots` (shared memory); after that only these
small messages cross its pipe. Pixels and logits never do: the parent writes a batch's branch-0
inputs into a slot and sends `Run`; the worker writes both branches' logits into the same slot
and answers `Done`. While starting, the worker says `Trying` before each compute mode it compiles
and checks, so that a death then names the mode (the pool skips it from then on), `Preparing` before a
one-off step that may outlast the start's time limit (quantising, say), and `Ready`
(with the golden record the parent's self-test compares its answers with) or `Fatal` when done.
An idle worker answers `Ping` with `Pong`: the watchdog's sign of life.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..golden import GoldenRecord

__all__ = [
    "Done", "Failed", "Fatal", "Ping", "Pong", "Preparing", "Ready", "ReplicaSpec", "Run", "Slots", "Stop", "ToParent",
    "ToWorker", "Trying",
]


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a worker needs, small and picklable (the app itself never crosses)."""

    worker_id: int
    variant: str
    weights: str | None  # checkpoint file; None: serve the prepared OpenVINO model (no checkpoint at hand)
    weights_sha256: str  # of that file, as the parent verified it: checked before loading; names the prepared model
    weights_source: str  # configured, local, fetched, random: recorded when the worker prepares the model
    pretrained: bool
    device: str
    backend: str  # torch or openvino (resolved by the parent)
    backend_fallback: bool  # may fall back to torch when the backend cannot start (backend=auto)
    precision: str  # auto, fp32, bf16, fp16, int8
    threads: int
    thread_options: tuple[int, ...]  # every thread count the parent may send with a batch
    max_batch_size: int
    cache_dir: str | None = None  # converted models; None: convert at every start
    log_level: str = "info"
    log_format: str = "text"
    labels_file: str | None = None  # the served class names (None: ImageNet-1k's): the golden record names them
    calibration_dir: str | None = None  # int8's calibration images (None: the package's default set)
    skip_modes: tuple[str, ...] = ()  # modes ("openvino/bf16") that killed a worker or failed its self-test
    abort_modes: tuple[str, ...] = ()  # test only: os.abort() on trying these (CROSSVIT_TEST_ABORT_MODES)


@dataclass
class Slots:
    """One worker's shared-memory buffers: S slots of up to B images, and both branches' logits.

    Plain numpy views of one POSIX shared-memory block (no torch: the lean server has none). The
    parent allocates and finally unlinks it; a spawned worker receives its name and attaches.
    """

    shape: tuple[int, int, int, int]  # (S, B, H, C): slots, batch, input side, classes
    x: np.ndarray = field(init=False, repr=False)  # (S, B, 3, H, H) float32: branch 0's input
    logits: np.ndarray = field(init=False, repr=False)  # (S, B, 2, C) float32: branch 0 and branch 1
    _block: shared_memory.SharedMemory = field(init=False, repr=False)

    @classmethod
    def allocate(cls, slots: int, batch: int, size: int, num_classes: int) -> Slots:
        new = cls((slots, batch, size, num_classes))
        new._attach(shared_memory.SharedMemory(create=True, size=new._bytes()))
        return new

    def _dims(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        s, b, h, c = self.shape
        return (s, b, 3, h, h), (s, b, 2, c)

    def _bytes(self) -> int:
        x, logits = self._dims()
        return 4 * (int(np.prod(x)) + int(np.prod(logits)))

    def _attach(self, block: shared_memory.SharedMemory) -> None:
        x, logits = self._dims()
        self._block = block
        self.x = np.ndarray(x, np.float32, block.buf)
        self.logits = np.ndarray(logits, np.float32, block.buf, offset=4 * int(np.prod(x)))

    def __getstate__(self) -> dict[str, Any]:  # what crosses to the spawned worker: the block's name
        return {"shape": self.shape, "name": self._block.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.shape = state["shape"]
        self._attach(shared_memory.SharedMemory(name=state["name"]))

    @property
    def count(self) -> int:
        return self.shape[0]

    def release(self) -> None:
        """The parent's last word: unmap and remove the block (the workers are gone)."""
        del self.x, self.logits
        self._block.close()
        self._block.unlink()


# -- parent -> worker ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """Compute slot `slot`'s first `n` images on `threads` CPU threads (the parent shares the cores)."""

    batch_id: int
    slot: int
    n: int
    threads: int


@dataclass(frozen=True)
class Ping:
    """Are you there? (sent to an idle worker that has been silent for a while)"""


@dataclass(frozen=True)
class Stop:
    """Exit now (the parent is shutting down)."""


ToWorker = Run | Ping | Stop


# -- worker -> parent ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trying:
    """About to compile and check `mode` ("openvino/bf16"); in force until Ready or Fatal."""

    mode: str


@dataclass(frozen=True)
class Preparing:
    """A one-off step of this start began (converting the model, quantising it, waiting for another worker's):
    the start's time limit counts from now, `budget_s` long (None: WORKER_START_TIMEOUT_S), so a long
    preparation is not mistaken for a hang, and the parent can say what the start is doing."""

    what: str
    budget_s: float | None = None


@dataclass(frozen=True)
class Ready:
    """Started: `info` is what /v1/models and the log show (backend, mode, guard figures, timings);
    `golden` the reference answers the parent's self-test checks this worker's served ones against."""

    info: dict[str, Any]
    golden: GoldenRecord


@dataclass(frozen=True)
class Fatal:
    """Could not start (an exception it caught, not a crash); the worker exits next."""

    error: str


@dataclass(frozen=True)
class Done:
    batch_id: int
    slot: int
    seconds: float  # the compute time, as the worker measured it


@dataclass(frozen=True)
class Failed:
    """The batch could not be computed (out of device memory); the worker lives on."""

    batch_id: int
    slot: int
    reason: str


@dataclass(frozen=True)
class Pong:
    pass


ToParent = Trying | Preparing | Ready | Fatal | Done | Failed | Pong
