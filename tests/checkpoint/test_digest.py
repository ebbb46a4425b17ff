"""The shard digest the journal records (pipeline.checkpoint.digest): the hash list's rule written out
here with hashlib alone, the same from the writer's stream (any split into buffers) and from the file,
every changed byte seen, journals from before the rule still checked, and the memory it holds bounded."""

import hashlib
import itertools
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.checkpoint import digest

pytestmark = pytest.mark.unit

PIECE = 64  # bytes: many pieces from small data


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(digest, "PIECE_BYTES", PIECE)


def by_hand(data: bytes) -> str:
    """sha256 of the concatenated sha256 digests of consecutive PIECE-byte pieces (one empty piece for
    no bytes): the rule, from hashlib directly."""
    pieces = [data[i : i + PIECE] for i in range(0, len(data), PIECE)] or [b""]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 5 * PIECE + 7),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 5 * PIECE + 7), max_size=8),
)
def test_stream_and_file_give_the_rule(tmp_path_factory, size, seed, cuts):
    data = random.Random(seed).randbytes(size)  # sizes drawn evenly: hypothesis' binary() stays short
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    hasher = digest.PieceHasher(threads=2, ahead=2)
    for a, b in itertools.pairwise(bounds):
        hasher.update(memoryview(data)[a:b])
    streamed = hasher.hexdigest()
    path = tmp_path_factory.mktemp("d") / "f"
    path.write_bytes(data)
    assert streamed == digest.file_digest(path, threads=3) == by_hand(data)


def test_every_changed_byte_changes_it(tmp_path):
    data = bytes(range(256)) * 2  # 8 pieces
    path = tmp_path / "f"
    path.write_bytes(data)
    rec = digest.record(len(data), digest.file_digest(path))
    assert digest.matches(path, rec)
    for i in range(len(data)):
        changed = bytearray(data)
        changed[i] ^= 1
        path.write_bytes(changed)
        assert not digest.matches(path, rec), i
    path.write_bytes(data + b"\0")  # one byte more: a new last piece
    assert not digest.matches(path, rec)


def test_a_journal_from_before_is_checked_by_its_plain_sha256(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    legacy = {"size": 1000, digest.LEGACY_FIELD: hashlib.sha256(b"x" * 1000).hexdigest()}
    assert digest.matches(path, legacy)
    path.write_bytes(b"x" * 999 + b"y")
    assert not digest.matches(path, legacy)
    assert not digest.matches(path, {"size": 1000})  # no digest at all: not kept


def test_pieces_waiting_for_a_thread_are_bounded(monkeypatch):
    release, started = threading.Event(), []

    def slow(parts):
        started.append(len(parts))
        release.wait(10)
        return b"\0" * 32

    monkeypatch.setattr(digest, "_sha256_of", slow)
    hasher = digest.PieceHasher(threads=1, ahead=2)
    hasher.update(b"a" * 2 * PIECE)  # two pieces: both may wait
    third = threading.Thread(target=hasher.update, args=(b"b" * PIECE,))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # the third waits for the oldest, so no more than `ahead` are held
    release.set()
    third.join(10)
    assert not third.is_alive()
    hasher.hexdigest()
