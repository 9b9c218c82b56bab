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

A model config (TF Serving's --model_config_file, server/registry/model_config.py) replaces the repository as the
source: its models, each from its own base_path, with their own version policies and version labels. `reload()`
replaces the config while serving (HandleReloadConfigRequest, the config file's poll): it is checked whole first
(labels by TF Serving's rule: a label names a version available now, unless `allow_unavailable_labels` lets a new
label name any), then the labels move at once (a request resolves its label and takes its version in one step of
the event loop: none sees neither), and one sync loads what the new config adds and retires what it no longer
names, each after the requests it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server.base import metrics
from server.base.errors import ModelNotFoundError, NotAllowedError, UnavailableError, quoted
from server.registry import repository
from server.registry.model_config import ServingConfig
from server.registry.version_policy import VersionPolicy
from server.runtimes.base import ModelRuntime, load_failure

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
    load_requests: int = 0  # RepositoryModelLoads waiting for their sync
    on_disk: tuple[int, ...] = ()  # version folders the last complete listing of this model found
    aspired: tuple[int, ...] = ()  # what its version policy asked for of those
    absent: int = 0  # complete listings in a row without its folder: at 2 it is gone
    versions: dict[int, Version] = field(default_factory=dict)

    def latest(self) -> Version | None:
        available = [v for v in self.versions.values() if v.state is State.AVAILABLE]
        return max(available, key=lambda v: v.number) if available else None

    def live(self) -> list[Version]:
        """Versions to report: every one but those that ended."""
        return sorted((v for v in self.versions.values() if v.state is not State.END), key=lambda v: v.number)


Loader = Callable[[repository.ModelVersion], ModelRuntime]
ABSENT_LISTINGS_TO_RETIRE = 2  # complete listings in a row without a model's folder before it is gone
INITIAL_SCAN_RETRIES = 5  # start-up lists the repository again while part of it changed under the scan


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
        self._source: Callable[[], repository.Listing] = functools.partial(repository.scan, repository_path)
        self._config: ServingConfig | None = None  # a model config, when one replaces the repository
        self._labels: dict[str, dict[str, int]] = {}  # model -> version label -> version; replaced whole, never edited
        self._reload_lock = asyncio.Lock()
        self.allow_unavailable_labels = False  # --allow-version-labels-for-unavailable-models
        # One of --workers: each worker holds its own models, and a reload by RPC would reach only the one it hit.
        self.one_of_workers = False
        self._load = load
        self._retire_queue = retire_queue
        self._policy_for = policy_for
        self._builtin = set(builtin)
        self._models: dict[str, Model] = {}
        self._seen: dict[tuple[str, int], str] = {}  # fingerprint of each version folder at the previous scan
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._sync_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # retirements and notifications: referenced until done
        self._phase = Phase.STARTING
        # --workers: whether every worker of the server serves (server/workers/). Until then this process reads as
        # STARTING even with its own models ready, so that readiness means the whole server serves.
        self.whole_server_serving: Callable[[], bool] = lambda: True
        self.changed = asyncio.Condition()  # notified on every change of phase or state (health Watch)

    # -- the server's phase -----------------------------------------------------------------------

    def heap_frozen(self) -> None:
        """The start-up heap was just frozen (server.base.metrics.freeze_startup_heap): so were the loaded versions."""
        for model in self._models.values():
            for entry in model.versions.values():
                entry.frozen = entry.runtime is not None

    @property
    def phase(self) -> Phase:
        """The phase every reader sees: SERVING only once the whole server serves (`whole_server_serving`)."""
        if self._phase is Phase.SERVING and not self.whole_server_serving():
            return Phase.STARTING
        return self._phase

    def set_phase(self, phase: Phase) -> None:
        self._phase = phase
        self._publish()

    def republish(self) -> None:
        """The whole server serves now (`whole_server_serving` turned true): tell the readers that are told (the
        ready gauge, health Watch), as set_phase does."""
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
        if (
            model.load_requests
            or any(v.state in (State.START, State.LOADING) for v in live)
            or (self.phase is Phase.STARTING and not live)
        ):
            return "loading", ""
        failed = [v for v in live if v.state is State.FAILED]
        if failed:
            return "failed", failed[-1].error
        return "unavailable", self._why_none_serves(model)

    @staticmethod
    def _why_none_serves(model: Model) -> str:
        """The true reason a model has no available version, for callers and RepositoryIndex."""
        if model.unloaded:
            return "unloaded by request (RepositoryModelLoad serves it again)"
        if any(v.state is State.UNLOADING for v in model.versions.values()):
            return "its versions are retiring"
        if not model.on_disk:
            return "no version on disk"
        on_disk = ", ".join(map(str, model.on_disk))
        if not model.aspired:
            return f"no version on disk is one its version policy serves (on disk: {on_disk})"
        return f"version {max(model.aspired)} is on disk and loads once its files stop changing"

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

    # -- the model config and version labels -----------------------------------------------------

    @property
    def config(self) -> ServingConfig | None:
        return self._config

    def use_config(self, config: ServingConfig) -> None:
        """Serve the models of a model config instead of the repository, with its policies and labels (at start-up,
        before the first sync, and in `reload` once the config is checked). Labels move here, all at once."""
        self._config = config
        self._source = functools.partial(repository.scan_models, {n: e.base_path for n, e in config.models.items()})
        policies = {name: entry.policy for name, entry in config.models.items()}
        self._policy_for = lambda name: policies.get(name, VersionPolicy("latest"))
        self._set_labels(config.labels())

    def _set_labels(self, labels: dict[str, dict[str, int]]) -> None:
        old, self._labels = self._labels, labels  # one assignment: a request sees the old map or the new one
        for model, by_label in old.items():
            for label, version in by_label.items():
                if labels.get(model, {}).get(label) != version:
                    with contextlib.suppress(KeyError):
                        metrics.VERSION_LABEL.remove(model, label, str(version))
        for model, by_label in labels.items():
            for label, version in by_label.items():
                metrics.VERSION_LABEL.labels(model, label, str(version)).set(1)

    def check_labels(self, config: ServingConfig) -> None:
        """TF Serving's rule for a config's labels (server_core.cc, UpdateModelVersionLabelMap): each names a version
        available now; with `allow_unavailable_labels`, a label that is new or keeps its version may name any.
        Raises NotAllowedError (FAILED_PRECONDITION, as there) naming every label that breaks it."""
        problems = []
        for name, entry in config.models.items():
            for label, version in sorted(entry.labels.items()):
                if self.allow_unavailable_labels and self._labels.get(name, {}).get(label) in (None, version):
                    continue
                model = self._models.get(name)
                found = model.versions.get(version) if model is not None else None
                if found is None or found.state is not State.AVAILABLE:
                    problems.append(
                        f"Request to assign label to version {version} of model {name}, which is not currently "
                        f"available for inference (label '{label}')"
                    )
        if problems:
            raise NotAllowedError(
                "; ".join(problems) + ". Load the version first (its version policy), then label it in a later "
                "config, or start the server with --allow-version-labels-for-unavailable-models"
            )

    async def reload(self, config: ServingConfig, from_file: bool = False) -> None:
        """Replace the model config while serving (one reload at a time): checked whole first, so that a config
        refused leaves the old one serving untouched; then labels move at once and one sync loads what the config
        adds (waited for) and retires what it no longer names, after the requests that hold it."""
        if self._config is None:
            raise NotAllowedError(
                "this server serves the repository --model-repository; start it with --model-config-file to manage "
                "its models by model config"
            )
        if self.one_of_workers and not from_file:
            raise NotAllowedError(
                "with --workers each worker process holds its own models, and this call reaches one of them: change "
                "the --model-config-file instead, which --model-config-file-poll-seconds reloads in every worker"
            )
        async with self._reload_lock:
            self.check_labels(config)
            self.use_config(config)
            await self.sync(settled=True)
            log.info("model config applied: %s", ", ".join(config.models) or "no models")

    def labels(self, name: str) -> dict[str, int]:
        """The model's version labels (label -> version)."""
        return dict(self._labels.get(name, {}))

    def version_for_label(self, name: str, label: str) -> int:
        """The version a label names now; NOT_FOUND naming the model's labels when it has no such label."""
        labels = self._labels.get(name, {})
        version = labels.get(label)
        if version is not None:
            return version
        self._model(name)  # an unknown model: the usual error
        known = ", ".join(f"{k} -> {v}" for k, v in sorted(labels.items()))
        raise ModelNotFoundError(
            f"model {quoted(name)} has no version label {quoted(label)}; "
            + (f"its labels: {known}" if known else "it has no labels (a model config's version_labels names them)")
        )

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

    async def sync(self, initial: bool = False, only: str | None = None, settled: bool = False) -> None:
        """Bring the served versions in line with the repository and the version policies (one sync at a
        time). `initial`: the start-up load, which takes every complete version at once and raises if a
        built-in model fails. `only`: one model (RepositoryModelLoad). `settled`: take every version on disk as
        complete, as at start-up (a model config just applied: its operator says the folders are ready)."""
        async with self._sync_lock:
            listing = await self._scan(retries=INITIAL_SCAN_RETRIES if initial else 0)
            if not listing.complete:
                return  # the repository itself could not be listed: no news, everything keeps serving
            names = sorted({*listing.models, *self._models}) if only is None else [only]
            for name in names:
                if name in listing.unreadable:
                    continue  # its folder changed while we read it: no news, never "no versions"
                try:
                    await self._sync_model(name, listing, initial, settled)
                except Exception:
                    if initial and name in self._builtin:
                        raise
                    log.exception("syncing model %s failed; the other models go on", name)
                # What this scan saw, to tell next time whether a folder is still changing.
                self._seen = {key: value for key, value in self._seen.items() if key[0] != name}
                self._seen.update({(name, v.version): v.fingerprint for v in listing.models.get(name, [])})

    async def _scan(self, retries: int) -> repository.Listing:
        """One listing of the repository (off the event loop); at start-up, listed again while any of it changed
        under us, so that a built-in model is not skipped for a moment's noise."""
        loop = asyncio.get_running_loop()
        listing = await loop.run_in_executor(self._loader, self._source)
        for _ in range(retries):
            if listing.complete and not listing.unreadable:
                break
            await asyncio.sleep(0.1)
            listing = await loop.run_in_executor(self._loader, self._source)
        return listing

    async def _sync_model(self, name: str, listing: repository.Listing, initial: bool, settled: bool = False) -> None:
        on_disk = listing.models.get(name, [])
        model = self._models.get(name)
        if model is None:
            if not on_disk:
                return
            model = self._models[name] = Model(name, self._policy_for(name), builtin=name in self._builtin)
        model.policy = self._policy_for(name)  # a reloaded model config may have changed it
        # Gone only when its folder is absent from two complete listings in a row: one listing is not enough
        # to take a model's last version away. A model the model config no longer names is gone at once.
        model.absent = 0 if name in listing.folders else model.absent + 1
        gone = model.absent >= ABSENT_LISTINGS_TO_RETIRE or (
            self._config is not None and name not in self._config.models
        )
        model.on_disk = tuple(v.version for v in on_disk)
        # Complete: a manifest (checked when loading), or files unchanged since the previous scan.
        complete = [
            v
            for v in on_disk
            if initial or settled or v.has_manifest or self._seen.get((name, v.version)) == v.fingerprint
        ]
        aspired = set() if model.unloaded else model.policy.aspired([v.version for v in complete])
        model.aspired = tuple(sorted(aspired))
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
        if not aspired and not model.unloaded and not gone:
            # Nothing on disk to serve, yet the model's folder is there (or was, one listing ago): its last versions
            # keep serving (TF Serving refuses to unload all versions too). Only failed ones are let go.
            for entry in list(model.versions.values()):
                if entry.state is State.FAILED and entry.number not in model.on_disk:
                    entry.state = State.END
                    self._publish()
            return
        for entry in list(model.versions.values()):
            if entry.state is State.AVAILABLE and entry.number not in aspired:
                self._retire(entry)
            elif entry.state is State.FAILED and entry.number not in aspired:
                entry.state = State.END
                self._publish()
        if gone and not model.unloaded and all(v.state is State.END for v in model.versions.values()):
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
        self._keep(asyncio.get_running_loop().create_task(self._finish_retiring(entry)))

    def _keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference until the task ends: the event loop keeps only a weak one."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_retiring(self, entry: Version) -> None:
        """Wait until no request holds the version, end its batcher queue, and let its memory go."""
        if entry.holders:
            await entry.released.wait()
        if entry.runtime is not None:
            await self._retire_queue(entry.runtime)  # type: ignore[misc]
        entry.runtime = None
        entry.state = State.END
        model = self._models.get(entry.name)
        if (
            model is not None
            and self._config is not None
            and entry.name not in self._config.models
            and all(v.state is State.END for v in model.versions.values())
        ):
            del self._models[entry.name]  # removed from the model config, and its last version has retired
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
        model = self._models.get(name)
        if model is not None:
            model.unloaded = False
        # Shielded: a caller that gives up must not leave a version half-loaded (LOADING for ever).
        await asyncio.shield(self._sync_requested(model, name))
        if name not in self._models:
            raise ModelNotFoundError(f"no model {quoted(name)} in the repository")
        if self._models[name].latest() is None:
            state, error = self.state_of(name)
            raise UnavailableError(f"model '{name}' did not load: {error or state}")

    async def _sync_requested(self, model: Model | None, name: str) -> None:
        """Sync one model; until then it reads as "loading", not as what the last sync left."""
        if model is not None:
            model.load_requests += 1
        try:
            await self.sync(only=name)
        finally:
            if model is not None:
                model.load_requests -= 1

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
        for task in list(self._tasks):
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
        self._keep(asyncio.get_running_loop().create_task(self._notify()))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()
