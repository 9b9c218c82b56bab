"""The one owner of model state: every version of every model, its state, and the server's own phase.

Per version the states are TF Serving's (`core/servable_state.h`): start, loading, available, unloading, end, and
failed (with the load error). Every reader takes its answer from here at the moment it asks: gRPC health,
`modelserver_model_ready`, ListModels, metadata, OIP ServerReady/ModelReady/RepositoryIndex, TF Serving
GetModelStatus. So they agree at every instant, drain included.

New versions without a restart: `sync()` scans the repository (every --repository-poll-seconds, on SIGHUP, and
on an OIP RepositoryModelLoad). A version the policy aspires to is loaded off the event loop, warmed up at every
allowed batch size, and only then becomes what "latest" means; a version no longer aspired to stops taking new
requests once a newer one is available, finishes what it holds, and is then retired (its batcher loop ends,
its metric series stop, its memory is released). A version that fails to load is reported with its error and
retried only when its files change; the previous version keeps serving, and every other model is synced anyway.

Half-written versions: a version with our manifest loads only when every file matches it; one without a manifest
loads only once its files are unchanged over two scans (one poll apart). Copying into a hidden folder and
renaming it into place is atomic and needs no wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server import metrics, repository
from server.errors import ModelNotFoundError, UnavailableError, quoted
from server.runtime import ModelRuntime, load_failure
from server.version_policy import VersionPolicy

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """The server's own phase; only SERVING is ready."""

    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"  # after SIGTERM: not ready (load balancers stop routing), still serving (--shutdown-delay)
    DRAINING = "draining"  # new requests are refused with UNAVAILABLE, accepted ones finish
    CLOSING = "closing"  # new requests are held, then refused once the listener has told clients to go away


ACCEPTING = (Phase.SERVING, Phase.STOPPING)


class State(enum.Enum):
    START = "start"
    LOADING = "loading"
    AVAILABLE = "available"
    UNLOADING = "unloading"
    END = "end"
    FAILED = "failed"


@dataclass(eq=False)
class Version:
    """One version of one model: its files, its state, and its runtime while loaded."""

    name: str
    number: int
    path: Path
    fingerprint: str
    state: State = State.START
    error: str = ""
    runtime: ModelRuntime | None = None
    holders: int = 0  # requests admitted on it and not yet answered (queued or running)
    frozen: bool = False  # loaded before the start-up heap was frozen (gc.freeze): out of the collector's reach
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class Model:
    name: str
    policy: VersionPolicy
    builtin: bool = False
    unloaded: bool = False  # by RepositoryModelUnload: nothing aspired until a RepositoryModelLoad
    versions: dict[int, Version] = field(default_factory=dict)

    def latest(self) -> Version | None:
        available = [v for v in self.versions.values() if v.state is State.AVAILABLE]
        return max(available, key=lambda v: v.number) if available else None

    def live(self) -> list[Version]:
        """Versions to report: every one but those that ended."""
        return sorted((v for v in self.versions.values() if v.state is not State.END), key=lambda v: v.number)


Loader = Callable[[repository.ModelVersion], ModelRuntime]


class ModelManager:
    """Model versions and the server's phase. Runs on the event loop; loading runs on its own thread."""

    def __init__(
        self,
        repository_path: Path,
        load: Loader,
        retire_queue: Callable[[ModelRuntime], object],
        policy_for: Callable[[str], VersionPolicy],
        builtin: Iterable[str] = (),
    ) -> None:
        """`load` opens and warms one version (blocking); `retire_queue(runtime)` ends the batcher's work on a
        retired version (a coroutine)."""
        self._repository = repository_path
        self._load = load
        self._retire_queue = retire_queue
        self._policy_for = policy_for
        self._builtin = set(builtin)
        self._models: dict[str, Model] = {}
        self._seen: dict[tuple[str, int], str] = {}  # fingerprint of each version folder at the previous scan
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._sync_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.phase = Phase.STARTING
        self.changed = asyncio.Condition()  # notified on every change of phase or state (health Watch)

    # -- the server's phase -----------------------------------------------------------------------

    def heap_frozen(self) -> None:
        """The start-up heap was just frozen (server.metrics.freeze_startup_heap): so were the loaded versions."""
        for model in self._models.values():
            for entry in model.versions.values():
                entry.frozen = entry.runtime is not None

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._publish()

    # -- readers ----------------------------------------------------------------------------------

    def server_ready(self) -> bool:
        return self.phase is Phase.SERVING

    def is_ready(self, name: str, version: int = 0) -> bool:
        """Whether the model (and version, 0 = latest) answers requests now and the server is ready."""
        model = self._models.get(name)
        if model is None or self.phase is not Phase.SERVING:
            return False
        if version == 0:
            return model.latest() is not None
        entry = model.versions.get(version)
        return entry is not None and entry.state is State.AVAILABLE

    def model_names(self) -> list[str]:
        """Models with a version that serves (or served: draining counts)."""
        return sorted(name for name, model in self._models.items() if model.latest() is not None)

    def known(self) -> list[str]:
        """Every model of the repository the manager knows, whatever the state of its versions."""
        return sorted(self._models)

    def is_known(self, name: str) -> bool:
        return name in self._models

    def versions(self, name: str) -> list[Version]:
        """The model's versions that have not ended, ascending (raises NOT_FOUND for an unknown model)."""
        return self._model(name).live()

    def state_of(self, name: str) -> tuple[str, str]:
        """The model's state as one word ("loading", "available", "failed", "unloading", "unavailable") and the
        load error, if any: what ListModels and RepositoryIndex show for a model."""
        model = self._model(name)
        latest = model.latest()
        if latest is not None:
            return ("available" if self.phase in (Phase.STARTING, Phase.SERVING) else "unloading"), ""
        live = model.live()
        if any(v.state in (State.START, State.LOADING) for v in live) or (self.phase is Phase.STARTING and not live):
            return "loading", ""
        failed = [v for v in live if v.state is State.FAILED]
        if failed:
            return "failed", failed[-1].error
        return "unavailable", "unloaded" if model.unloaded else "no version on disk"

    def resolve(self, name: str, version: int = 0) -> Version:
        """The available version that serves a request (0 = latest), or the error that tells the caller why none
        does: UNAVAILABLE while it loads or when it failed, NOT_FOUND for what does not exist."""
        model = self._models.get(name)
        if model is None:
            if self.phase is Phase.STARTING:
                raise UnavailableError(
                    f"the server is starting: model {quoted(name)} may still be loading; retry shortly"
                )
            known = ", ".join(self.model_names()) or "none"
            raise ModelNotFoundError(f"no model named {quoted(name)}; available models: {known}")
        if version == 0:
            latest = model.latest()
            if latest is not None:
                return latest
            state, error = self.state_of(name)
            if state == "loading":
                raise UnavailableError(f"model '{name}' is loading; retry shortly")
            if state == "failed":
                raise UnavailableError(f"model '{name}' failed to load and is not served: {error}")
            raise UnavailableError(f"model '{name}' has no version available ({error}); load one and retry")
        entry = model.versions.get(version)
        if entry is not None and entry.state is State.AVAILABLE:
            return entry
        if entry is not None and entry.state in (State.START, State.LOADING):
            raise UnavailableError(f"model '{name}' version {version} is loading; retry shortly")
        if entry is not None and entry.state is State.FAILED:
            raise UnavailableError(f"model '{name}' version {version} failed to load: {entry.error}")
        loaded = ", ".join(str(v.number) for v in model.live() if v.state is State.AVAILABLE) or "none"
        raise ModelNotFoundError(
            f"model '{name}' has no loaded version {version}; loaded versions: {loaded} (0 = latest)"
        )

    def _model(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            self.resolve(name)  # raises the right error: UNAVAILABLE while starting, else NOT_FOUND
        assert model is not None
        return model

    # -- requests hold the version they run on ----------------------------------------------------

    def acquire(self, name: str, version: int = 0) -> Version:
        """The version a request runs on, held until `release`: it is not retired while requests hold it."""
        entry = self.resolve(name, version)
        entry.holders += 1
        entry.released.clear()
        return entry

    def release(self, entry: Version) -> None:
        entry.holders -= 1
        if entry.holders == 0:
            entry.released.set()

    # -- loading and retiring ---------------------------------------------------------------------

    async def sync(self, initial: bool = False, only: str | None = None) -> None:
        """Bring the served versions in line with the repository and the version policies (one sync at a
        time). `initial`: the start-up load, which takes every complete version at once and raises if a
        built-in model fails. `only`: one model (RepositoryModelLoad)."""
        async with self._sync_lock:
            loop = asyncio.get_running_loop()
            found = await loop.run_in_executor(self._loader, repository.scan, self._repository)
            names = sorted({*found, *self._models}) if only is None else [only]
            for name in names:
                try:
                    await self._sync_model(name, found.get(name, []), initial)
                except Exception:
                    if initial and name in self._builtin:
                        raise
                    log.exception("syncing model %s failed; the other models go on", name)
            for name in names:  # what this scan saw, to tell next time whether a folder is still changing
                self._seen = {key: value for key, value in self._seen.items() if key[0] != name}
                self._seen.update({(name, v.version): v.fingerprint for v in found.get(name, [])})

    async def _sync_model(self, name: str, on_disk: list[repository.ModelVersion], initial: bool) -> None:
        model = self._models.get(name)
        if model is None:
            if not on_disk:
                return
            model = self._models[name] = Model(name, self._policy_for(name), builtin=name in self._builtin)
        # Complete: a manifest (checked when loading), or files unchanged since the previous scan.
        complete = [
            v for v in on_disk if initial or v.has_manifest or self._seen.get((name, v.version)) == v.fingerprint
        ]
        aspired = set() if model.unloaded else model.policy.aspired([v.version for v in complete])
        for candidate in sorted((v for v in complete if v.version in aspired), key=lambda v: -v.version):
            entry = model.versions.get(candidate.version)
            if entry is not None and entry.state in (State.LOADING, State.AVAILABLE, State.UNLOADING):
                continue
            if entry is not None and entry.state is State.FAILED and entry.fingerprint == candidate.fingerprint:
                continue  # retried only when its files change
            await self._load_version(model, candidate, initial)
        # Retire what is no longer aspired, once something aspired serves (or nothing is aspired at all): a new
        # version that failed leaves the one before it serving.
        serving = [v for v in aspired if v in model.versions and model.versions[v].state is State.AVAILABLE]
        if aspired and not serving:
            return
        for entry in list(model.versions.values()):
            if entry.state is State.AVAILABLE and entry.number not in aspired:
                self._retire(entry)
            elif entry.state is State.FAILED and entry.number not in aspired:
                entry.state = State.END
                self._publish()
        if not on_disk and not model.unloaded and all(v.state is State.END for v in model.versions.values()):
            del self._models[name]  # its folder is gone and so is every version: the model is no more
            self._publish()

    async def _load_version(self, model: Model, found: repository.ModelVersion, initial: bool) -> None:
        entry = Version(model.name, found.version, found.path, found.fingerprint, State.LOADING)
        model.versions[found.version] = entry
        self._publish()
        started = time.perf_counter()
        try:
            if found.has_manifest and not await asyncio.get_running_loop().run_in_executor(
                self._loader, repository.is_intact, found.path
            ):
                raise ValueError("its files do not match its manifest (still being copied, or damaged)")
            entry.runtime = await asyncio.get_running_loop().run_in_executor(self._loader, self._load, found)
        except Exception as error:
            # The path stays in the log; callers see the version's place in the repository, not the server's files.
            entry.state, entry.error = State.FAILED, load_failure(model.name, found.version, found.path, error)
            log.error("cannot load model '%s' version %d from %s: %s", model.name, found.version, found.path, error)
            self._publish()
            if initial and model.builtin:
                raise RuntimeError(entry.error) from error
            return
        entry.state = State.AVAILABLE
        metrics.MODEL_LOAD_DURATION.labels(model.name).set(time.perf_counter() - started)
        log.info("loaded %s version %d (%s) in %.2fs", model.name, found.version, found.format,
                 time.perf_counter() - started)  # fmt: skip
        self._publish()

    def _retire(self, entry: Version) -> None:
        entry.state = State.UNLOADING
        self._publish()
        task = asyncio.get_running_loop().create_task(self._finish_retiring(entry))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _finish_retiring(self, entry: Version) -> None:
        """Wait until no request holds the version, end its batcher queue, and let its memory go."""
        if entry.holders:
            await entry.released.wait()
        if entry.runtime is not None:
            await self._retire_queue(entry.runtime)  # type: ignore[misc]
        entry.runtime = None
        entry.state = State.END
        self._publish()
        log.info("retired %s version %d", entry.name, entry.number)
        if entry.frozen:
            # Its objects sit among those frozen at start-up, out of the collector's reach: one full collection
            # (a pause of the event loop, paid once per version loaded at start-up) lets their memory go. Later
            # versions were never frozen, and the collector reclaims them as it goes.
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def add_available(self, runtime: ModelRuntime) -> None:
        """Serve a runtime opened elsewhere (an embedding program, the batching tests' gated runtimes): it is
        available at once, and stays until the repository's scans say otherwise."""
        model = self._models.setdefault(runtime.name, Model(runtime.name, self._policy_for(runtime.name)))
        entry = Version(runtime.name, runtime.version, Path(), "", State.AVAILABLE, runtime=runtime)
        model.versions[runtime.version] = entry
        self._publish()

    async def load_model(self, name: str) -> None:
        """RepositoryModelLoad: (re)load the model's aspired versions from the repository now."""
        if name in self._models:
            self._models[name].unloaded = False
        # Shielded: a caller that gives up must not leave a version half-loaded (LOADING for ever).
        await asyncio.shield(self.sync(only=name))
        if name not in self._models:
            raise ModelNotFoundError(f"no model {quoted(name)} in the repository")
        if self._models[name].latest() is None:
            state, error = self.state_of(name)
            raise UnavailableError(f"model '{name}' did not load: {error or state}")

    async def unload_model(self, name: str) -> None:
        """RepositoryModelUnload: retire every version; polling leaves it unloaded until a RepositoryModelLoad."""
        model = self._model(name)
        async with self._sync_lock:
            model.unloaded = True
            for entry in list(model.versions.values()):
                if entry.state is State.AVAILABLE:
                    self._retire(entry)

    async def poll(self, seconds: float) -> None:
        """Sync every `seconds` until cancelled; a failed scan is logged and the next one goes on."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.sync()
            except Exception:
                log.exception("scanning the model repository %s failed; trying again in %.1fs", self._repository,
                              seconds)  # fmt: skip

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- publishing -------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Push the new state where readers cannot ask us at the moment they read: the ready gauge (scraped on
        another thread), and health watchers."""
        for model in self._models.values():
            for entry in model.versions.values():
                labels = (model.name, str(entry.number))
                if entry.state is State.END:
                    with contextlib.suppress(KeyError):
                        metrics.MODEL_READY.remove(*labels)
                    continue
                ready = entry.state is State.AVAILABLE and self.phase is Phase.SERVING
                metrics.MODEL_READY.labels(*labels).set(1 if ready else 0)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()
