"""misa_compile.load of a file that is not a readable .pt2 raises LoadError naming the file and
what is wrong, and keeps torch.export's logged tracebacks off the console."""
from __future__ import annotations

import zipfile

import pytest

import misa_compile
from misa_compile import MisaConfig
from misa_compile.export import LoadError

from .factories import indexer_host


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory) -> bytes:
    model, inputs = indexer_host()
    path = tmp_path_factory.mktemp("saved") / "good.pt2"
    misa_compile.export(model, inputs, config=MisaConfig(active_heads=2, block_size=4)).save(path)
    return path.read_bytes()


def flipped_every_97th_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    for index in range(0, len(damaged), 97):
        damaged[index] ^= 0xFF
    return bytes(damaged)


def one_bit_flipped_in_a_member(data: bytes, path) -> bytes:
    path.write_bytes(data)
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
    damaged = bytearray(data)
    # The member's data follows its 30-byte local header, name and extra field; its middle is
    # safely inside the data.
    damaged[member.header_offset + 30 + len(member.filename) + member.compress_size // 2 + 64] ^= 1
    return bytes(damaged)


def a_zip_of_something_else(path) -> bytes:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return path.read_bytes()


@pytest.mark.parametrize("make, problem", [
    (lambda data, tmp: b"", "the file is empty"),
    (lambda data, tmp: b"not a zip at all" * 10, "not a torch.export archive"),
    (lambda data, tmp: data[: len(data) // 2], "not a torch.export archive"),
    (lambda data, tmp: flipped_every_97th_byte(data), "the archive is damaged"),
    (lambda data, tmp: one_bit_flipped_in_a_member(data, tmp / "scratch.pt2"),
     "fails its checksum"),
    (lambda data, tmp: a_zip_of_something_else(tmp / "other.zip"),
     "was not written by torch.export.save"),
], ids=["empty", "garbage", "truncated", "bytes_flipped", "one_bit_flipped", "other_zip"])
def test_unreadable_files_raise_load_error_naming_the_path(saved_bytes, tmp_path, capfd, make,
                                                           problem):
    path = tmp_path / "model.pt2"
    path.write_bytes(make(saved_bytes, tmp_path))
    with pytest.raises(LoadError) as caught:
        misa_compile.load(path)
    message = str(caught.value)
    assert message.startswith(f"misa_compile.load: cannot load {path}: ") and problem in message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "deserializing" not in err, err


def test_a_missing_file_or_a_folder_is_a_load_error(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        misa_compile.load(tmp_path / "missing.pt2")
    with pytest.raises(LoadError, match="it is a folder"):
        misa_compile.load(tmp_path)


def test_the_intact_file_still_loads(saved_bytes, tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(saved_bytes)
    program = misa_compile.load(path)
    assert any(getattr(node.target, "namespace", None) == "misa" for node in program.graph.nodes)
