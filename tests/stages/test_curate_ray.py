"""Pieces of the curation adapters that need no Ray cluster: checkpoint archives."""
from __future__ import annotations

from stages.curate_ray import pack, unpack


def test_pack_and_unpack_a_checkpoint_directory(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    dst = tmp_path / "out"
    dst.mkdir()
    unpack(pack(str(src)), str(dst))
    assert (dst / "config.json").read_text() == '{"a": 1}'
    assert (dst / "sub" / "weights.bin").read_bytes() == bytes(range(256))
