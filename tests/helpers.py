"""Shared test helpers (fixtures live in conftest.py): the CLI runner, one-line error checks, hand-built stores, the
naive Q reference and the run settings several test modules share."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import cli
from pipeline.layout import STUDENT_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]

# A small student and a short schedule for distill tests (any DistillConfig field may be added).
STUDENT = dict(student="resnet8", model_kwargs={"base_width": 8}, epochs=2, batch_size=64, lr=0.01, device="cpu")


def run_cli(*args, expect_ok: bool = True):
    """Runs `kdpipe ARGS` in-process; asserts success (or failure) and returns the result."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if expect_ok:
        assert result.exit_code == 0, (
            f"kdpipe {' '.join(map(str, args))} failed:\n{result.output}\n{result.exception!r}"
        )
    else:
        assert result.exit_code != 0, f"kdpipe {' '.join(map(str, args))} should have failed:\n{result.output}"
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    """Failed with click's `Error: ...` line naming the problem; no traceback reached the user."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@contextlib.contextmanager
def small_chunks(min_bytes: int = 1 << 20):
    """A context with chunks of `min_bytes` (1 MiB), so small test stores span several blocks (resume, streaming)."""
    import cache.store

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache.store, "MIN_CHUNK_BYTES", min_bytes)
        yield


class Disk:
    """A small disk at `path` for write-fault tests: `fill()` takes its free space, `read_only()` makes it read-only,
    `restore()` undoes either.

    Where this process may mount (root in a container that allows it) it is a real tmpfs of `size_mib`: a ballast
    file fills it, a remount makes it read-only, and every writer (kdpipe's, zarr's, a mkdir) meets the fault.
    Elsewhere the fault is injected into kdpipe's file writes under `path` (the `open` of `pipeline.engine.runtime`),
    with the errno the real disk gives.
    """

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, size_mib: int = 16) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(self.path)]
        self.real = subprocess.run(mount, capture_output=True).returncode == 0
        self.fault: int | None = None
        if not self.real:
            import pipeline.engine.runtime

            monkeypatch.setattr(pipeline.engine.runtime, "open", self._open, raising=False)

    def _open(self, file, *args, **kwargs):
        if self.fault is not None and Path(file).is_relative_to(self.path):
            raise OSError(self.fault, os.strerror(self.fault), str(file))
        return open(file, *args, **kwargs)

    @property
    def ballast(self) -> Path:
        return self.path / "ballast"

    def fill(self, leave_bytes: int = 0) -> None:
        """No space left, or only `leave_bytes` of it."""
        if not self.real:
            self.fault = errno.ENOSPC
            return
        stat = os.statvfs(self.path)
        with open(self.ballast, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(1, stat.f_bavail * stat.f_frsize - leave_bytes))

    def read_only(self) -> None:
        if self.real:
            self._remount("ro")
        else:
            self.fault = errno.EROFS

    def restore(self) -> None:
        """Writable again, with its space back."""
        if self.real:
            self._remount("rw")
            self.ballast.unlink(missing_ok=True)
        self.fault = None

    def _remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, capture_output=True)

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True)


def kdpipe_process(*args, **popen) -> subprocess.Popen:
    """`kdpipe ARGS` in a process of its own, running this checkout's code (not an installed kdpipe's)."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **popen)


HOLD = """
import contextlib, sys, time
from cache.lock import OutputLock
with contextlib.ExitStack() as stack:
    for output, lock_file in zip(sys.argv[2::2], sys.argv[3::2]):
        stack.enter_context(OutputLock(output, lock_file, sys.argv[1]))
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def locked_elsewhere(command: str, *locks: tuple[Path, Path]):
    """Another process holding kdpipe's locks on outputs, given as (output, lock file), as `kdpipe COMMAND` would;
    yields it, and SIGKILLs it at the end (leaving its lock files behind, as a killed kdpipe does)."""
    args = [str(a) for lock in locks for a in lock]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, command, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def tree_bytes(*folders: Path) -> dict[str, bytes]:
    """Every file under the folders, by path, with its bytes."""
    return {str(p): p.read_bytes() for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class TouchOnLoad:
    """Pickles as a call that creates `path` when unpickled (code run from an input file, with no shell)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_image_folder(root, counts: dict[str, dict[str, int]], size: int = 8, seed: int = 0) -> Path:
    """A class-per-folder image tree: `counts[split][class]` random-pixel PNGs named 000.png, 001.png, ..., stored
    uncompressed so that every image of one size has the same byte count."""
    rng = np.random.default_rng(seed)
    for split, classes in counts.items():
        for name, count in classes.items():
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                write_png(folder / f"{k:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return Path(root)


def write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, compress_level=0)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """A distill run's student weights."""
    return load_file(str(Path(run_dir) / STUDENT_WEIGHTS))


def own_classifier_top1(run_dir: Path) -> float:
    """The test top-1 of a run's own classifier, recomputed here from its saved weights and recorded preprocessing,
    image by image in plain eval mode: the oracle for the top-1 that distill reports for a method that trains one."""
    from pipeline.data.datasets import Preprocessing, load_split
    from pipeline.engine.checkpoints import read_model_spec
    from pipeline.models.zoo import create_model

    spec = read_model_spec(Path(run_dir) / STUDENT_WEIGHTS)
    net = create_model(spec.model, spec.num_classes, input_size=spec.input_size, model_kwargs=spec.model_kwargs)
    net.load_state_dict(weights(run_dir))
    test = load_split(spec.dataset, "test", preprocessing=Preprocessing.from_dict(spec.preprocessing))
    with torch.no_grad():
        correct = sum(int(net.eval()(test[i][0][None]).argmax()) == int(test[i][1]) for i in range(len(test)))
    return 100 * correct / len(test)


def load_script(name: str):
    """A module from scripts/ (the soak), imported by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_store(
    path, features: dict, labels, dataset_size: int | None = None, num_classes: int | None = None, complete: bool = True
):
    """A feature store written directly from arrays (one 'train' split), for tests that need exact contents."""
    from cache.records import DatasetRecord, StoreIdentity, TeacherRecord
    from cache.store import ArraySpec, FeatureStore

    labels = np.asarray(labels, dtype=np.int64)
    num_classes = num_classes or int(labels.max()) + 1
    taps = [
        {"index": i, "name": name, "shape": list(x.shape[1:]), "kind": "map"}
        for i, (name, x) in enumerate(features.items())
    ]
    classes = [str(c) for c in range(num_classes)]
    identity = StoreIdentity(
        TeacherRecord("synthetic"), DatasetRecord("synthetic", num_classes, classes, {}), taps, "float16"
    )
    store = FeatureStore.create(
        path,
        {
            "identity": identity.to_json(),
            "config_hash": "test",
            "kdpipe_version": "test",
            "created": "now",
            "checkpoint_path": None,
        },
    )
    specs = [ArraySpec(f"features/{name}", x.shape[1:], "float16") for name, x in features.items()]
    specs.append(ArraySpec("labels", (), "int64", sets_block=False))
    part = store.create_split(
        "train",
        len(labels),
        specs,
        list(features),
        {"split": "train", "dataset_size": dataset_size or len(labels), "fingerprint": "test"},
    )
    for name, x in features.items():
        part.array(f"features/{name}")[:] = x.astype(np.float16)
    part.array("labels")[:] = labels
    if complete:
        for block in range(part.num_blocks):
            part.mark_block_done(block)
        part.mark_complete()
        store.mark_complete()
    return store


def naive_quality(x: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray, n_train: int) -> dict:
    """docs/method.md §1 (S, E, I and Q) written as plainly as possible: loops over samples and classes."""
    classes = sorted(set(labels.tolist()))
    C = len(classes)
    xa, ya = x[a].astype(np.float64), labels[a]
    n = len(xa)
    r = [math.sqrt(sum(v * v for v in xa[i])) for i in range(n)]
    g = [[abs(float(np.dot(xa[i], xa[j]))) / (r[i] * r[j]) for j in range(n)] for i in range(n)]
    members = {c: [i for i in range(n) if ya[i] == c] for c in classes}
    a_c = {c: np.mean([g[i][j] for i in members[c] for j in members[c]]) for c in classes}
    m_c = {c: min(g[i][j] for i in members[c] for j in members[c]) for c in classes}
    b_pairs = [np.mean([g[i][j] for i in members[c] for j in members[k]]) for c in classes for k in classes if c != k]
    S = np.mean(list(a_c.values())) - np.mean(b_pairs)
    delta = [
        min(float(np.linalg.norm(xa[i] - xa[j])) for i in members[c] for j in range(n) if ya[j] != c) for c in classes
    ]
    R = np.mean([np.mean([r[i] for i in members[c]]) for c in classes])
    d = min(n, xa.shape[1])
    E = (n_train / math.pi) ** (1 / d) * 2 * np.mean(delta) / R
    spectra = []
    for c in classes:
        z = x[b][labels[b] == c].astype(np.float32)
        z = z - z.mean(0)
        lam = np.linalg.svd(z, compute_uv=False) ** 2
        spectra.append(lam / lam.sum())
    M = max(int((labels[b] == c).sum()) for c in classes)
    rows = np.zeros((C, M), dtype=np.float32)
    for c, p in enumerate(spectra):
        rows[c, : len(p)] = p
    dims = []
    for row in rows:
        k, total = 0, np.float32(0)
        while total < np.float32(0.95):
            total += row[k]
            k += 1
        dims.append(min(k, M - 1))
    T = min(sum(dims), M)
    H = []
    for row in rows:
        q = row[:T]
        if (q == 0).any() or np.isnan(q).any():
            H.append(0.0)
        else:
            q = q / q.sum()
            H.append(-sum(v * math.log(v) for v in q))
    I = (1 - np.mean(list(m_c.values()))) * np.mean(H) / math.log(5)  # noqa: E741 (the method's name)
    return {"S": S, "I": I, "E": E, "Q": S + math.sqrt(I * E)}


@contextlib.contextmanager
def interrupted_in_epoch(monkeypatch, epoch: int):
    """Within the block, a distill run is interrupted (KeyboardInterrupt) as its epoch `epoch` starts."""
    from pipeline.engine.training import Trainer

    real_epoch = Trainer.run_epoch

    def dies(self, at, *rest):
        if at == epoch:
            raise KeyboardInterrupt
        return real_epoch(self, at, *rest)

    monkeypatch.setattr(Trainer, "run_epoch", dies)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "run_epoch", real_epoch)
