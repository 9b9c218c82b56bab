"""Repository scans while folders change under them (server/registry/): a listing that
could not be read completely is no news, and no scan, however unlucky, leaves a model that is on disk without a
serving version. No TensorFlow here: the version folders are stand-ins and the manager loads them with a stand-in
loader, so that thousands of scans race thousands of folder changes in seconds."""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.registry import repository
from server.registry.manager import ModelManager, Phase, State
from server.registry.version_policy import VersionPolicy

ASSET_FOLDERS = 30  # a version whose walk takes long enough for a deletion to overtake it
CHANGES = 40  # publish-and-delete rounds per test


def make_version(folder: Path, assets: int = ASSET_FOLDERS) -> Path:
    """A stand-in version folder: what scan() looks for (saved_model.pb), and many asset folders to walk."""
    folder.mkdir(parents=True)
    (folder / repository.SAVED_MODEL_FILE).write_bytes(b"stand-in")
    for index in range(assets):
        (folder / "assets" / str(index)).mkdir(parents=True)
        (folder / "assets" / str(index) / "vocabulary.txt").write_text("a\nb\n")
    return folder


@contextmanager
def churning(model_dir: Path, rounds: int = CHANGES) -> Iterator[threading.Event]:
    """A thread that publishes version 2 (atomic rename, or an in-place copy), empties or half-writes it, and
    deletes it (rmtree) `rounds` times beside a version 1 that never moves. The event is set once it is done; the
    thread is always stopped and joined, whatever the test does."""
    source = make_version(model_dir.parent / f".source-{uuid.uuid4().hex}")
    done, stop = threading.Event(), threading.Event()

    def churn() -> None:
        target = model_dir / "2"
        for index in range(rounds):
            if stop.is_set():
                break
            kind = index % 4
            if kind == 0:  # atomic: copied aside, renamed into place
                staging = model_dir / f".copy-{index}"
                shutil.copytree(source, staging)
                staging.rename(target)
            elif kind == 1:  # in place: the scan may see it half-copied
                shutil.copytree(source, target)
            elif kind == 2:  # empty
                target.mkdir()
            else:  # half-written: assets first, no saved_model.pb yet
                shutil.copytree(source / "assets", target / "assets")
            shutil.rmtree(target)
        done.set()

    thread = threading.Thread(target=churn, name="churn-version-2")
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the churning thread did not stop"


def test_a_scan_never_drops_a_version_that_stayed_on_disk(tmp_path: Path) -> None:
    """Every listing either names version 1 or says the model could not be read: never "no versions" (the bug:
    a folder deleted mid-walk made the whole model vanish from the listing)."""
    make_version(tmp_path / "multi_input" / "1")
    listings = unreadable = wrong = 0
    with churning(tmp_path / "multi_input") as done:
        while not done.is_set():
            listing = repository.scan(tmp_path)
            listings += 1
            assert listing.complete
            assert "multi_input" in listing.folders
            if "multi_input" in listing.unreadable:
                unreadable += 1
            elif 1 not in [v.version for v in listing.models.get("multi_input", [])]:
                wrong += 1
    assert wrong == 0, f"{wrong} of {listings} listings lost version 1"
    assert listings > 0


def test_an_absent_repository_is_no_news(tmp_path: Path) -> None:
    listing = repository.scan(tmp_path / "not-mounted")
    assert not listing.complete and listing.models == {}


def test_a_fingerprint_of_a_folder_that_vanishes_raises(tmp_path: Path) -> None:
    version = make_version(tmp_path / "m" / "1", assets=2)
    before = repository.fingerprint(version)
    assert repository.fingerprint(version) == before  # stable while nothing changes
    (version / "assets" / "0" / "vocabulary.txt").write_text("changed\n")
    assert repository.fingerprint(version) != before
    shutil.rmtree(version)
    with pytest.raises(OSError):
        repository.fingerprint(version)


# -- the manager, with stand-in runtimes ------------------------------------------------------------


@dataclass
class StandIn:
    """What the manager holds for a loaded version; the stand-in loader reads the folder as a real load would."""

    name: str
    version: int


def load_stand_in(found: repository.ModelVersion) -> StandIn:
    (found.path / repository.SAVED_MODEL_FILE).read_bytes()  # gone mid-load: the load fails, as TensorFlow's would
    return StandIn(found.name, found.version)


async def no_queue(runtime: object) -> None:
    return None


def new_manager(repo: Path, policy: str = "latest") -> ModelManager:
    return ModelManager(repo, load_stand_in, no_queue, lambda name: VersionPolicy.parse(policy))  # type: ignore[arg-type]


def available(manager: ModelManager, name: str = "multi_input") -> list[int]:
    return [v.number for v in manager.versions(name) if v.state is State.AVAILABLE]


def test_syncs_racing_folder_changes_always_leave_a_version_serving(tmp_path: Path) -> None:
    """Sync after sync while version 2 is published and deleted every way: after every sync, and at every moment
    a request could ask (between the steps of a sync), a version serves."""
    make_version(tmp_path / "multi_input" / "1")

    async def run() -> tuple[int, int]:
        manager = new_manager(tmp_path)
        await manager.sync(initial=True)
        assert available(manager) == [1]
        syncs = gaps = 0
        watching = True

        async def watch() -> None:  # a reader between the sync's steps, as a request or a readiness probe is
            nonlocal gaps
            while watching:
                if not manager.is_known("multi_input") or not available(manager):
                    gaps += 1
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            with churning(tmp_path / "multi_input") as done:
                while not done.is_set():
                    await manager.sync()
                    syncs += 1
                    if not available(manager):
                        gaps += 1
            await manager.sync()
            await manager.sync()
            await asyncio.sleep(0.05)  # the retirement of version 2, if it was loaded last, ends
            assert available(manager) == [1]
        finally:
            watching = False
            await watcher
            await manager.close()
        return syncs, gaps

    syncs, gaps = asyncio.run(run())
    assert syncs > 0
    assert gaps == 0, f"{gaps} moments without a serving version in {syncs} syncs"


def test_a_model_is_retired_only_when_its_folder_is_gone_from_two_listings(tmp_path: Path) -> None:
    make_version(tmp_path / "multi_input" / "1")
    make_version(tmp_path / "other" / "1", assets=1)

    async def run() -> None:
        manager = new_manager(tmp_path)
        await manager.sync(initial=True)
        shutil.rmtree(tmp_path / "multi_input" / "1")  # the folder stays, empty of versions
        for _ in range(3):
            await manager.sync()
        assert available(manager) == [1], "the last version was retired while the model's folder is there"
        assert manager.state_of("multi_input") == ("available", "")

        shutil.rmtree(tmp_path / "multi_input")
        await manager.sync()
        assert available(manager) == [1], "one listing without the folder took the model's last version"
        await manager.sync()
        await asyncio.sleep(0.05)
        assert manager.model_names() == ["other"]
        await manager.sync()
        assert not manager.is_known("multi_input")
        await manager.close()

    asyncio.run(run())


def test_a_version_gone_while_it_loads_fails_cleanly_and_the_previous_one_serves(tmp_path: Path) -> None:
    make_version(tmp_path / "multi_input" / "1", assets=1)
    version_2 = tmp_path / "multi_input" / "2"

    def load(found: repository.ModelVersion) -> StandIn:
        if found.version == 2:
            shutil.rmtree(version_2)  # deleted between its listing and its load
        return load_stand_in(found)

    async def run() -> None:
        manager = ModelManager(tmp_path, load, no_queue, lambda name: VersionPolicy.parse("latest"))  # type: ignore[arg-type]
        await manager.sync(initial=True)
        make_version(version_2, assets=1)
        await manager.sync()  # no manifest: complete only once unchanged over two scans
        assert {v.number: v.state for v in manager.versions("multi_input")} == {1: State.AVAILABLE}
        await manager.sync()  # loads version 2, which vanishes
        versions = {v.number: v for v in manager.versions("multi_input")}
        assert {n: v.state for n, v in versions.items()} == {1: State.AVAILABLE, 2: State.FAILED}
        assert versions[2].runtime is None  # nothing half-loaded kept
        assert manager.resolve("multi_input").number == 1
        await manager.sync()
        assert {v.number: v.state for v in manager.versions("multi_input")} == {1: State.AVAILABLE}
        await manager.close()

    asyncio.run(run())


def test_the_reason_no_version_serves_is_the_true_one(tmp_path: Path) -> None:
    make_version(tmp_path / "multi_input" / "1", assets=1)

    async def run() -> None:
        manager = new_manager(tmp_path)
        await manager.sync(initial=True)
        manager.set_phase(Phase.SERVING)
        await manager.unload_model("multi_input")
        await asyncio.sleep(0.05)
        assert manager.state_of("multi_input")[1].startswith("unloaded by request")
        async with manager._sync_lock:  # a sync in progress: the load waits for it
            loading = asyncio.create_task(manager.load_model("multi_input"))
            await asyncio.sleep(0.01)
            assert manager.state_of("multi_input") == ("loading", "")
        await loading
        assert available(manager) == [1]

        policy_manager = new_manager(tmp_path, policy="specific:3")
        await policy_manager.sync(initial=True)
        policy_manager.set_phase(Phase.SERVING)
        state, reason = policy_manager.state_of("multi_input")
        assert state == "unavailable" and "version policy" in reason and "on disk: 1" in reason
        await manager.close()
        await policy_manager.close()

    asyncio.run(run())
