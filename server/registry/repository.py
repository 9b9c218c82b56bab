"""The model repository: <repository>/<model>/<version>/ SavedModels, written atomically.

A built-in model is exported into a hidden temporary folder, a manifest of its files (size and
sha256) is written last, and only then is the folder renamed into place: a crash mid-export leaves
a temporary folder that is never loaded, never a half-written version. A version with a manifest is
loaded only when every file matches it. A user's own SavedModel (no manifest) is loaded as it is.

An export holds an exclusive lock (flock) on `<model>/.export.lock` from its check to its rename. Replicas that
share a repository therefore export a model once, and whoever holds the lock knows that every temporary folder
it finds was left by an export that ended early (a signal during start-up, a crash, SIGKILL: the kernel drops
the lock of a dead process) and removes it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from server.runtimes.keras import KERAS_FILE
from server.runtimes.savedmodel import SIGNATURE

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

MANIFEST = "modelserver-manifest.json"
EXPORT_LOCK = ".export.lock"
SAVED_MODEL_FILE = "saved_model.pb"


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    fingerprint: str = ""  # names, sizes and modification times of its files: changes while it is copied

    @property
    def format(self) -> str:
        """'keras' for a model.keras file, else 'savedmodel'."""
        return "keras" if (self.path / KERAS_FILE).is_file() else "savedmodel"

    @property
    def has_manifest(self) -> bool:
        return (self.path / MANIFEST).is_file()


def fingerprint(version_dir: Path) -> str:
    """A cheap summary of a folder's files (relative name, size, modification time): equal in two scans a poll
    apart only when nothing was written in between. Raises OSError when the folder cannot be read completely (a
    file or folder removed while we looked): a partial walk is no summary at all."""
    digest = hashlib.sha256()
    entries: list[tuple[str, os.stat_result]] = []

    def fail(error: OSError) -> None:
        raise error

    def stat(path: Path) -> os.stat_result:
        try:
            return path.stat()
        except FileNotFoundError:
            return path.lstat()  # a link to nothing is what it is; a file that is gone raises here

    for folder, _, files in os.walk(version_dir, onerror=fail):
        base = Path(folder)
        entries.append((str(base.relative_to(version_dir)), stat(base)))
        entries.extend((str((base / name).relative_to(version_dir)), stat(base / name)) for name in files)
    for name, info in sorted(entries):
        digest.update(f"{name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_files(root: Path) -> dict[str, dict[str, object]]:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def is_intact(version_dir: Path) -> bool:
    """True when a manifest exists and every file it lists is present with the same size and hash."""
    manifest_path = version_dir / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest: dict[str, object] = json.loads(manifest_path.read_text())
        return manifest["files"] == _manifest_files(version_dir)
    except (OSError, ValueError, KeyError):
        return False


def export_saved_model(
    model: keras.Model, version_dir: Path, seed: int, before_commit: Callable[[], None] | None = None
) -> None:
    """Export a Keras model as a SavedModel whose serving signature keeps input and output names.

    `before_commit` runs once the files are written and before the folder is renamed into place (the tests'
    "export" hold point: an export in progress)."""
    import keras
    import tensorflow as tf

    version_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = version_dir.parent / f".tmp-{version_dir.name}-{uuid.uuid4().hex}"
    input_signature = {
        t.name: tf.TensorSpec((None, *t.shape[1:]), tf.dtypes.as_dtype(t.dtype), name=t.name) for t in model.inputs
    }
    output_names = list(model.output_names)

    def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        # A single-input model takes its tensor itself, not a one-entry dict.
        outputs = model(inputs if len(inputs) > 1 else next(iter(inputs.values())))
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        # Returning a dict keeps the output names in the signature (SPEC §11).
        return dict(zip(output_names, outputs, strict=True))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[input_signature])
    try:
        archive.write_out(str(staging), verbose=False)
        manifest = {
            "model": version_dir.parent.name,
            "version": int(version_dir.name),
            "seed": seed,
            "files": _manifest_files(staging),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if before_commit is not None:
            before_commit()
        staging.rename(version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _exported_seed(version_dir: Path) -> int | None:
    try:
        return int(json.loads((version_dir / MANIFEST).read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def export_lock(model_dir: Path) -> Iterator[None]:
    """Hold the model's export lock (blocking while another process exports it; released by the kernel if this
    process dies)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with (model_dir / EXPORT_LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_abandoned_staging(model_dir: Path) -> list[Path]:
    """Delete the staging folders of exports that ended early. Call it holding the model's export lock: then no
    export of this model is in progress anywhere, so every staging folder is a leftover. Returns what was removed."""
    removed = []
    for staging in sorted(model_dir.glob(".tmp-*")):
        try:
            if staging.is_dir():
                shutil.rmtree(staging)
                removed.append(staging)
        except OSError as error:
            log.warning("cannot remove abandoned export folder %s: %s", staging, error)
    return removed


def ensure_exported(
    repository: Path,
    name: str,
    version: int,
    build: Callable[[int], keras.Model],
    seed: int,
    before_commit: Callable[[], None] | None = None,
) -> bool:
    """Export a built-in model unless an intact copy of that version, built with `seed`, is already there.

    Returns True when it exported. A damaged copy is moved aside (kept for inspection) and rebuilt. So is a copy
    built with another seed: the --seed setting decides the weights, so that every replica started with the same
    settings answers the same, whatever an earlier run left in a shared repository. Runs under the model's export
    lock (see the module's docstring); `before_commit` as in export_saved_model.
    """
    with export_lock(repository / name):
        return _ensure_exported_locked(repository, name, version, build, seed, before_commit)


def _ensure_exported_locked(
    repository: Path,
    name: str,
    version: int,
    build: Callable[[int], keras.Model],
    seed: int,
    before_commit: Callable[[], None] | None,
) -> bool:
    version_dir = repository / name / str(version)
    for staging in remove_abandoned_staging(version_dir.parent):
        log.warning("removed %s, left by an export that did not finish", staging)
    if is_intact(version_dir):
        exported_seed = _exported_seed(version_dir)
        if exported_seed == seed:
            return False
        aside = version_dir.parent / f".seed-{exported_seed}-{version}-{uuid.uuid4().hex}"
        log.warning(
            "model %s version %d was exported with seed %s, not --seed %d; moving it to %s and exporting again",
            name, version, exported_seed, seed, aside,
        )  # fmt: skip
        version_dir.rename(aside)
    elif version_dir.exists():
        damaged = version_dir.parent / f".damaged-{version}-{uuid.uuid4().hex}"
        log.warning("model %s version %d is not intact; moving it to %s and exporting again", name, version, damaged)
        version_dir.rename(damaged)
    export_saved_model(build(seed), version_dir, seed, before_commit)
    return True


@dataclass(frozen=True)
class Listing:
    """One scan of the repository, and how far it can be trusted.

    A folder that changes while it is read (a version deleted or renamed mid-walk, a permission change, an NFS
    hiccup) raises OSError part-way. Such a model is `unreadable`: its listing is no news, never "no versions",
    so the manager keeps what it serves. `complete` is False when the repository's own folder could not be
    listed: then nothing at all can be concluded."""

    models: dict[str, list[ModelVersion]] = field(default_factory=dict)  # versions ascending, by model name
    folders: frozenset[str] = frozenset()  # every model folder seen, with or without versions
    unreadable: frozenset[str] = frozenset()
    complete: bool = True


def _versions(model_dir: Path, name: str | None = None) -> list[ModelVersion]:
    """The model's version folders that hold a model, ascending; raises OSError when the folder changed under us.
    `name`: the model's name when it is not the folder's (a model config's base_path)."""
    name = model_dir.name if name is None else name
    versions = []
    for version_dir in model_dir.iterdir():
        if not (
            version_dir.name.isascii()
            and version_dir.name.isdigit()
            and int(version_dir.name) > 0
            and version_dir.is_dir()
        ):
            continue
        if (version_dir / SAVED_MODEL_FILE).is_file() or (version_dir / KERAS_FILE).is_file():
            versions.append(ModelVersion(name, int(version_dir.name), version_dir, fingerprint(version_dir)))
    return sorted(versions, key=lambda v: v.version)


def scan(repository: Path) -> Listing:
    """Every version folder of the repository that holds a model (a SavedModel or a model.keras file), by model
    name, each with its fingerprint. Hidden folders (staging, damaged copies, a copy in progress that will be
    renamed into place) are skipped. Whether a version is complete is decided by its loader: a manifest must
    match, and a folder without one must have stopped changing (server/registry/manager.py)."""
    try:
        model_dirs = sorted(p for p in repository.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as error:  # absent (an unmounted volume?) or unreadable: no news about any model
        log.warning("cannot list the model repository %s: %s", repository, error)
        return Listing(complete=False)
    found: dict[str, list[ModelVersion]] = {}
    unreadable = set()
    for model_dir in model_dirs:
        try:
            versions = _versions(model_dir)
        except OSError as error:  # changed while we looked: the next scan sees what it became
            log.info("repository scan of %s is incomplete (%s); keeping what it serves", model_dir, error)
            unreadable.add(model_dir.name)
            continue
        if versions:
            found[model_dir.name] = versions
    return Listing(found, frozenset(p.name for p in model_dirs), frozenset(unreadable))


def scan_models(base_paths: Mapping[str, Path]) -> Listing:
    """The versions of the models a model config names, each from its own base_path (TF Serving's
    --model_config_file), as `scan` lists a repository: a folder that cannot be listed, or changed while it was read,
    is no news about that model; one that does not exist (yet) is a model without versions."""
    found: dict[str, list[ModelVersion]] = {}
    present = set()
    unreadable = set()
    for name, base_path in base_paths.items():
        try:
            versions = _versions(base_path, name)
        except FileNotFoundError:
            log.info("model %s: no versions yet: its base_path %s does not exist", name, base_path)
            continue
        except OSError as error:
            log.info("scan of model %s at %s is incomplete (%s); keeping what it serves", name, base_path, error)
            unreadable.add(name)
            continue
        present.add(name)
        if versions:
            found[name] = versions
    return Listing(found, frozenset(present | unreadable), frozenset(unreadable))


def discover(repository: Path) -> dict[str, list[ModelVersion]]:
    """Every loadable SavedModel version in the repository, by model name, versions ascending: `scan`, less a
    version whose manifest says it is incomplete and `.keras` versions."""
    found: dict[str, list[ModelVersion]] = {}
    for name, versions in scan(repository).models.items():
        loadable = []
        for version in versions:
            if version.format != "savedmodel":
                continue
            if version.has_manifest and not is_intact(version.path):
                log.error("skipping %s: its files do not match its manifest", version.path)
                continue
            loadable.append(version)
        if loadable:
            found[name] = loadable
    return found
