"""The photo store itself, no service needed: Qdrant Edge in a folder (and qdrant-client's local mode standing
in for a Qdrant server, which speaks the same API): fusion, date filters, copies, remembered refusals, bad
folders, one process at a time (a search handed the store between two batches), kill -9 mid-write, the
migration of an index written by the old local mode, and copying an index to a server."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from embed_client.__main__ import main
from embed_client.store import (
    CAPTION_VECTOR,
    EDGE_FOLDER,
    IMAGE_VECTOR,
    MIGRATED_FOLDER,
    RRF_K,
    EdgeStore,
    PhotoRecord,
    PhotoStore,
    ServerStore,
    StoreBusy,
    StoreError,
    copy_store,
    date_bound,
    point_id,
)
from tests.conftest import REPO

IMAGE, CAPTION = 32, 16


def unit(vector: np.ndarray) -> list[float]:
    return (vector / np.linalg.norm(vector)).astype(np.float32).tolist()


def photo(number: int, *, caption: bool = False, taken_at: str | None = None, sha256: str | None = None) -> PhotoRecord:
    """A photo record with vectors drawn from its number (the same number, the same vectors)."""
    rng = np.random.default_rng(number)
    record = PhotoRecord(
        path=f"/photos/{number:04d}.jpg",
        size=1000 + number,
        mtime_ns=10**18 + number,
        sha256=sha256 or f"{number:064x}",
        taken_at=taken_at,
        caption=f"caption {number}" if caption else None,
    )
    record.vectors[IMAGE_VECTOR] = unit(rng.normal(size=IMAGE))
    if caption:
        record.vectors[CAPTION_VECTOR] = unit(rng.normal(size=CAPTION))
    return record


def library(count: int = 60) -> list[PhotoRecord]:
    years = ["2018-05-01T10:00:00", "2019-03-02T11:30:00", "2019-12-31T23:59:59", "2020-01-01T00:00:00", None]
    return [photo(n, caption=n % 3 == 0, taken_at=years[n % len(years)]) for n in range(count)]


@pytest.fixture
def store(tmp_path):
    with EdgeStore(tmp_path / "store") as opened:
        opened.ensure(IMAGE, CAPTION)
        opened.upsert(library())
        opened.optimize()
        yield opened


def test_one_point_per_path_and_what_it_carries(store):
    first = library()[3]
    again = photo(3, caption=True, taken_at="2021-01-01T00:00:00")
    store.upsert([again])  # the same path: replaced, not added
    assert store.count() == 60 and store.count(with_caption=True) == 20
    got = store.get(first.path)
    assert got.taken_at == "2021-01-01T00:00:00" and got.caption == "caption 3"
    np.testing.assert_allclose(got.vectors[IMAGE_VECTOR], first.vectors[IMAGE_VECTOR], rtol=1e-6)
    assert {r.path for r in store.records()} == {r.path for r in library()}
    assert store.vector_sizes() == {IMAGE_VECTOR: IMAGE, CAPTION_VECTOR: CAPTION}


def test_the_engine_fuses_by_reciprocal_rank_as_cormack_defines_it(store):
    rng = np.random.default_rng(99)
    image, caption = unit(rng.normal(size=IMAGE)), unit(rng.normal(size=CAPTION))
    found = store.query(image=image, caption=caption, limit=30, pool=30)
    ranks = [{hit.record.path: rank for rank, hit in enumerate(hits, 1)} for hits in (found.image, found.caption)]
    assert len(found.image) == 30 and len(found.caption) == 20  # every photo with a caption
    for hit in found.fused:  # 1/(60 + rank), ranks counted from 1
        expected = sum(1 / (RRF_K + rank[hit.record.path]) for rank in ranks if hit.record.path in rank)
        assert hit.score == pytest.approx(expected, rel=1e-5)
    scores = [hit.score for hit in found.fused]
    assert scores == sorted(scores, reverse=True)
    # The single lists are exact here (60 points): the same order as numpy's cosines.
    vectors = {r.path: np.array(r.vectors[IMAGE_VECTOR]) for r in library()}
    exact = sorted(vectors, key=lambda path: -float(vectors[path] @ np.array(image)))[:30]
    assert [hit.record.path for hit in found.image] == exact


def test_a_date_range_is_served_by_the_payload_index(store):
    rng = np.random.default_rng(5)
    image = unit(rng.normal(size=IMAGE))
    in_2019 = store.search(image, IMAGE_VECTOR, 100, after=date_bound("2019"), before=date_bound("2020"))
    expected = {r.path for r in library() if r.taken_at and r.taken_at.startswith("2019")}
    assert {hit.record.path for hit in in_2019} == expected and len(expected) == 24
    assert {hit.record.path for hit in store.search(image, IMAGE_VECTOR, 100, after=date_bound("2020-01-01"))} == {
        r.path for r in library() if r.taken_at == "2020-01-01T00:00:00"
    }
    assert date_bound("2019-07") == "2019-07-01T00:00:00" and date_bound("2019-07-14T18:30") == "2019-07-14T18:30:00"
    with pytest.raises(ValueError, match="not a date"):
        date_bound("last summer")


def test_copies_are_found_by_their_hash_and_refusals_are_points_without_vectors(store):
    copy = photo(7, sha256=library()[7].sha256)
    copy.path = "/elsewhere/0007 copy.jpg"
    refused = PhotoRecord("/photos/broken.jpg", 3000, 10**18, "ff" * 32, error="HTTP 400: the file is truncated")
    store.upsert([copy, refused])
    assert store.copies([library()[7].sha256, library()[8].sha256]) == {
        library()[7].sha256: sorted(["/photos/0007.jpg", "/elsewhere/0007 copy.jpg"]),
        library()[8].sha256: ["/photos/0008.jpg"],
    }
    assert store.count() == 61  # the refusal is no photo
    assert refused.path not in {r.path for r in store.records()}
    remembered = {r.path: r for r in store.records(include_failed=True)}[refused.path]
    assert remembered.error == "HTTP 400: the file is truncated" and remembered.vectors == {}
    assert store.find_by_hash("ff" * 32).error == remembered.error
    hits = store.search(unit(np.ones(IMAGE)), IMAGE_VECTOR, 100)
    assert refused.path not in {hit.record.path for hit in hits} and len(hits) == 61


def test_a_store_of_another_dimension_is_refused_with_the_reason(store):
    with pytest.raises(StoreError, match="holds image vectors of size 32, but the service gives 768"):
        store.ensure(768, CAPTION)
    with pytest.raises(StoreError, match="have 32 dimensions, but the query has 768"):
        store.search([0.1] * 768, IMAGE_VECTOR, 5)


def test_folders_that_are_not_a_store_are_refused_and_left_alone(tmp_path):
    pictures = tmp_path / "Pictures"
    pictures.mkdir()
    (pictures / "beach.jpg").write_bytes(b"a photo")
    with pytest.raises(StoreError, match="is not a photo index \\(it holds beach.jpg\\)"):
        EdgeStore(pictures)
    assert os.listdir(pictures) == ["beach.jpg"]  # nothing written into someone's folder
    with pytest.raises(StoreError, match="is a file, not a store folder"):
        EdgeStore(pictures / "beach.jpg")
    with pytest.raises(StoreError, match="there is no photo index at"):
        EdgeStore(tmp_path / "nothing yet", create=False)
    assert not (tmp_path / "nothing yet").exists()
    with EdgeStore(tmp_path / "store") as opened:  # created, but empty: a search finds no collection in it
        opened.ensure(IMAGE, None)
    with pytest.raises(StoreError, match="holds no collection 'holidays' \\(it holds: photos\\)"):
        EdgeStore(tmp_path / "store", "holidays", create=False)
    with pytest.raises(StoreError, match="not a collection name"):
        EdgeStore(tmp_path / "store", "../photos")


def test_the_command_line_names_a_bad_store_and_exits_with_its_code(tmp_path, capsys):
    pictures = tmp_path / "Pictures"
    pictures.mkdir()
    (pictures / "beach.jpg").write_bytes(b"a photo")
    like = ["search", "--like", str(pictures / "beach.jpg"), "--service", "http://127.0.0.1:9"]
    assert main([*like, "--store", str(pictures)]) == 3  # refused before anything is sent anywhere
    assert "is not a photo index" in capsys.readouterr().err
    assert main([*like, "--store", str(tmp_path / "none")]) == 3
    assert "there is no photo index at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["search", "cats", "--after", "last summer"])
    assert usage.value.code == 2 and "not a date" in capsys.readouterr().err


# -- one process at a time ----------------------------------------------------------------------------------

OWNER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {repo!r})
    from tests.test_photo_store import IMAGE, CAPTION, photo
    from embed_client.store import EdgeStore

    store = EdgeStore({store!r}, role="index")
    store.ensure(IMAGE, CAPTION)
    number = 0
    for line in sys.stdin:
        if line.strip() == "batch":  # one batch of 10 photos, then a chance to let a waiting search in
            store.upsert([photo(n) for n in range(number, number + 10)])
            number += 10
            print(json.dumps({{"written": number, "handed_over": store.hand_over()}}), flush=True)
        elif line.strip() == "close":
            store.close()
            print("closed", flush=True)
    """
)


@pytest.fixture
def owner(tmp_path):
    """An indexing process that writes one batch per line it is sent, and hands over after each."""
    code = OWNER.format(repo=str(REPO), store=str(tmp_path / "store"))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def batch() -> dict:
        child.stdin.write("batch\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    yield child, batch
    child.kill()
    child.wait()


def test_a_search_waits_for_the_indexer_to_hand_the_store_over_between_batches(owner, tmp_path):
    child, batch = owner
    assert batch() == {"written": 10, "handed_over": False}  # nobody waits
    assert batch() == {"written": 20, "handed_over": False}
    waiting, seen, notes = threading.Event(), {}, []

    def search() -> None:
        def notify(message: str) -> None:
            notes.append(message)
            waiting.set()

        with EdgeStore(tmp_path / "store", create=False, role="search", wait=600, notify=notify) as reader:
            seen["count"] = reader.count()
            seen["paths"] = {r.path for r in reader.records()}

    reader = threading.Thread(target=search)
    reader.start()
    assert waiting.wait(600), "the search never started waiting"
    assert f"process {child.pid} (indexing since" in notes[0]
    assert batch() == {"written": 30, "handed_over": True}  # the reply comes once the search is done
    reader.join()
    assert seen["count"] == 30 and seen["paths"] == {photo(n).path for n in range(30)}
    assert batch() == {"written": 40, "handed_over": False}  # and the indexer goes on with the store
    child.stdin.write("close\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "closed"
    with EdgeStore(tmp_path / "store", create=False) as after:
        assert after.count() == 40


def test_a_second_indexer_is_refused_at_once_and_a_search_that_waits_too_long_is_told_why(owner, tmp_path, capsys):
    child, batch = owner
    batch()
    with pytest.raises(StoreBusy, match=f"being indexed by process {child.pid} .*one indexing run at a time"):
        EdgeStore(tmp_path / "store", role="index")
    with pytest.raises(StoreBusy, match=f"still in use by process {child.pid} .* after 0 s"):
        EdgeStore(tmp_path / "store", create=False, role="search", wait=0)
    like = ["search", "--like", __file__, "--service", "http://127.0.0.1:9", "--wait", "0"]
    assert main([*like, "--store", str(tmp_path / "store")]) == 75
    assert f"still in use by process {child.pid}" in capsys.readouterr().err
    assert batch() == {"written": 20, "handed_over": False}  # the refused ones left nothing queued


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from tests.test_photo_store import IMAGE, CAPTION, photo
    from embed_client.store import EdgeStore

    store = EdgeStore({store!r}, role="index")
    store.ensure(IMAGE, CAPTION)
    number = 0
    while True:  # batches of 50 photos, one after the other, until killed
        store.upsert([photo(n, caption=n % 2 == 0) for n in range(number, number + 50)])
        number += 50
        print(number, flush=True)
    """
)


def test_kill_9_in_the_middle_of_writing_then_writing_again_keeps_every_photo_exactly_once(tmp_path):
    code = WRITER.format(repo=str(REPO), store=str(tmp_path / "store"))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reported = [int(child.stdout.readline()) for _ in range(4)]
    child.send_signal(signal.SIGKILL)  # while it writes the next batches
    child.wait()
    assert child.returncode == -signal.SIGKILL
    with EdgeStore(tmp_path / "store", create=False) as store:  # the lock went with the process
        count = store.count()
        assert count >= reported[-1] and count % 50 == 0  # whole batches: a batch is one logged operation
        for record in store.records(with_vectors=True):
            number = int(Path(record.path).stem)
            expected = photo(number, caption=number % 2 == 0)
            np.testing.assert_allclose(record.vectors[IMAGE_VECTOR], expected.vectors[IMAGE_VECTOR], rtol=1e-6)
            assert record.payload() == expected.payload()
        total = count + 100
        store.upsert([photo(n, caption=n % 2 == 0) for n in range(total)])  # "index again", and some more
        store.optimize()
        assert store.count() == total and len({r.path for r in store.records()}) == total


# -- the old local mode, and a Qdrant server ----------------------------------------------------------------


def write_local_mode(folder: Path, records: list[PhotoRecord]) -> None:
    """A store as the previous version wrote it: qdrant-client's local mode, the same collection layout."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(folder))
    vectors = {
        IMAGE_VECTOR: models.VectorParams(size=IMAGE, distance=models.Distance.COSINE),
        CAPTION_VECTOR: models.VectorParams(size=CAPTION, distance=models.Distance.COSINE),
    }
    client.create_collection("photos", vectors_config=vectors)
    points = [models.PointStruct(id=point_id(r.path), vector=r.vectors, payload=r.payload()) for r in records]
    client.upsert("photos", points=points, wait=True)
    client.close()


def test_an_index_written_by_the_old_local_mode_is_migrated_in_place_without_embedding(tmp_path):
    folder = tmp_path / "qdrant"
    write_local_mode(folder, library())
    (folder / EDGE_FOLDER / "photos.migrating").mkdir(parents=True)  # what an interrupted migration left
    notes: list[str] = []
    with EdgeStore(folder, create=False, role="search", notify=notes.append) as store:
        migrated = {r.path: r for r in store.records(with_vectors=True)}
        assert store.count(with_caption=True) == 20
    assert "written by qdrant-client's local mode: migrating it" in notes[0] and "migrated 60 photos" in notes[1]
    assert set(migrated) == {r.path for r in library()}
    for record in library():
        got = migrated[record.path]
        assert got.payload() == record.payload() and set(got.vectors) == set(record.vectors)
        for name, vector in record.vectors.items():
            np.testing.assert_allclose(got.vectors[name], vector, rtol=1e-6)
    assert sorted(os.listdir(folder / MIGRATED_FOLDER)) == ["meta.json", "photos"]
    assert not (folder / "meta.json").exists() and not (folder / EDGE_FOLDER / "photos.migrating").exists()
    notes.clear()
    with EdgeStore(folder, create=False) as store:  # once
        assert store.count() == 60 and notes == []


def test_a_local_mode_store_in_use_by_an_old_program_is_not_migrated_under_it(tmp_path):
    from qdrant_client import QdrantClient

    folder = tmp_path / "qdrant"
    write_local_mode(folder, library(5))
    old = QdrantClient(path=str(folder))  # holds qdrant-client's own lock, as a running old version would
    try:
        with pytest.raises(StoreBusy, match="open in a program using qdrant-client's local mode"):
            EdgeStore(folder)
    finally:
        old.close()
    assert (folder / "meta.json").exists() and not (folder / EDGE_FOLDER / "photos").exists()


def server(**kwargs) -> ServerStore:
    """qdrant-client's local mode speaks a Qdrant server's API: the server code path without a server."""
    from qdrant_client import QdrantClient

    return ServerStore("http://qdrant.example:6333", client=QdrantClient(location=":memory:"), **kwargs)


LOCAL_MODE_NOTES = (
    "ignore:Payload indexes have no effect:UserWarning",  # a real server builds them
    "ignore:Local mode performs exact:UserWarning",
)


@pytest.mark.filterwarnings(*LOCAL_MODE_NOTES)
def test_an_embedded_index_moves_to_a_server_with_its_vectors_and_searches_the_same(store):
    refused = PhotoRecord("/photos/broken.jpg", 3000, 10**18, "ff" * 32, error="HTTP 400: truncated")
    store.upsert([refused])
    target = server()
    assert copy_store(store, target) == 61
    assert target.vector_sizes() == store.vector_sizes()
    moved = {r.path: r for r in target.records(with_vectors=True, include_failed=True)}
    for record in store.records(with_vectors=True, include_failed=True):
        assert moved[record.path].payload() == record.payload()
        for name, vector in record.vectors.items():
            np.testing.assert_allclose(moved[record.path].vectors[name], vector, rtol=1e-6)
    assert target.count() == 60 and target.count(with_caption=True) == 20
    rng = np.random.default_rng(3)
    image, caption = unit(rng.normal(size=IMAGE)), unit(rng.normal(size=CAPTION))
    here = store.query(image=image, caption=caption, limit=10, pool=30, after="2019-01-01T00:00:00")
    there = target.query(image=image, caption=caption, limit=10, pool=30, after="2019-01-01T00:00:00")
    assert [h.record.path for h in there.image] == [h.record.path for h in here.image]
    assert [h.record.path for h in there.fused] == [h.record.path for h in here.fused]
    for a, b in zip(there.fused, here.fused, strict=True):
        assert math.isclose(a.score, b.score, rel_tol=1e-5)
    assert target.copies([library()[4].sha256]) == {library()[4].sha256: [library()[4].path]}
    assert copy_store(store, target) == 61 and target.count() == 60  # again: overwritten, not duplicated


def test_the_copy_command_moves_a_folder_to_another_store(store, tmp_path, capsys):
    store.close()
    assert main(["copy", "--store", str(tmp_path / "store"), "--to", str(tmp_path / "other")]) == 0
    assert "copied 60 points" in capsys.readouterr().out
    with PhotoStore(tmp_path / "other", create=False) as other:
        assert isinstance(other, EdgeStore) and other.count() == 60
