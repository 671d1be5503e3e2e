"""Shard writing: byte-identical for the same samples, never empty, never a dotted key, never a half shard."""

from __future__ import annotations

import numpy as np
import pytest

from shards.shardset import ShardWriter, read_shard, write_shard


def _samples(n=3):
    rng = np.random.default_rng(0)
    return [{"key": f"img{i}", "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "cls": i, "json": {"b": 1, "a": i}}
            for i in range(n)]


def test_same_samples_same_bytes_and_round_trip(tmp_path):
    write_shard(tmp_path / "a.tar", _samples())
    write_shard(tmp_path / "b.tar", _samples())
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    back = list(read_shard(tmp_path / "a.tar"))
    assert [s["key"] for s in back] == ["img0", "img1", "img2"]
    assert all(np.array_equal(s["image"], o["image"]) and s["json"] == o["json"] for s, o in zip(back, _samples()))


def test_empty_shard_and_dotted_key_are_refused_without_leftovers(tmp_path):
    with pytest.raises(ValueError, match="empty shard"):
        write_shard(tmp_path / "e.tar", [])
    bad = _samples()
    bad[1]["key"] = "img.1"
    with pytest.raises(ValueError, match="contains a dot"):
        write_shard(tmp_path / "d.tar", bad)
    assert list(tmp_path.iterdir()) == []


def test_shard_appears_only_when_complete(tmp_path):
    with ShardWriter(tmp_path / "s.tar") as sink:
        sink.write(_samples()[0])
        assert not (tmp_path / "s.tar").exists() and sink.tmp.exists() and sink.tmp.name.startswith("s.tar.")
    assert (tmp_path / "s.tar").exists() and list(tmp_path.iterdir()) == [tmp_path / "s.tar"]
