"""The storage seam (nowcast.storage): folder swaps, zarr leftovers and disk-error messages."""

from __future__ import annotations

import errno

import pytest

from nowcast import storage


def _folder(path, text):
    path.mkdir()
    (path / "file").write_text(text)
    return path


def test_replace_swaps_a_folder_in_one_step(tmp_path, monkeypatch):
    final, new = _folder(tmp_path / "store", "old"), _folder(tmp_path / "store.tmp-1", "new")
    renames = []
    monkeypatch.setattr(storage.os, "replace", lambda *a: renames.append(a))
    storage.replace(str(new), str(final))
    assert (final / "file").read_text() == "new"
    assert renames == []  # no window with nothing at the final path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_without_an_exchange_the_old_folder_is_moved_aside_first(tmp_path, monkeypatch):
    final, new = _folder(tmp_path / "store", "old"), _folder(tmp_path / "store.tmp-1", "new")
    monkeypatch.setattr(storage, "exchange", lambda first, second: False)
    storage.replace(str(new), str(final))
    assert (final / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_exchange_refuses_a_missing_path_with_its_name(tmp_path):
    existing = _folder(tmp_path / "a", "a")
    with pytest.raises(FileNotFoundError) as err:
        storage.exchange(str(existing), str(tmp_path / "missing"))
    assert err.value.filename == str(existing)


def test_zarr_temporaries_of_killed_chunk_writes_are_removed(tmp_path):
    chunks = tmp_path / "cube.zarr" / "rain_rate" / "c" / "0"
    chunks.mkdir(parents=True)
    (chunks / "0").write_bytes(b"chunk")
    (chunks / "1.3f2a9c.partial").write_bytes(b"half a chunk")
    assert storage.remove_zarr_temporaries(tmp_path / "cube.zarr") == 1
    assert sorted(p.name for p in chunks.iterdir()) == ["0"]


@pytest.mark.parametrize(
    "code,words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only")]
)
def test_a_disk_errno_becomes_one_line_naming_the_path(tmp_path, code, words):
    target = tmp_path / "out.nc"
    explained = storage.disk_write_error(OSError(code, "x"), target)
    assert isinstance(explained, storage.DiskWriteError)
    message = str(explained)
    assert str(target) in message and words in message and "\n" not in message


def test_an_errno_less_library_error_is_a_full_disk_only_when_the_disk_is_full(
    tmp_path, monkeypatch
):
    hdf_error = RuntimeError("NetCDF: HDF error")  # what netCDF4 raises on a full disk
    target = tmp_path / "out.nc"
    assert storage.disk_write_error(hdf_error, target) is None  # a bug stays a bug
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1024)
    assert "the disk is full" in str(storage.disk_write_error(hdf_error, target))


def test_the_free_space_check_names_the_estimate_and_the_free_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "free_bytes", lambda path: 3 * 1024)
    storage.check_free_space(tmp_path, 2 * 1024, "patch store")  # fits: nothing raised
    with pytest.raises(storage.DiskWriteError) as err:
        storage.check_free_space(tmp_path / "x.zarr", 5 * 1024 * 1024, "patch store")
    message = str(err.value)
    assert "x.zarr" in message and "patch store" in message
    assert "5.0 MiB" in message and "3.0 KiB free" in message


def test_atomic_path_removes_its_temporary_and_explains_a_full_disk(tmp_path, monkeypatch):
    def full(tmp, final):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "replace", full)
    with pytest.raises(storage.DiskWriteError) as err:
        with storage.atomic_path(tmp_path / "report") as tmp:
            _folder(tmp_path / tmp.rsplit("/", 1)[-1], "partial")
    assert str(tmp_path / "report") in str(err.value)
    assert list(tmp_path.iterdir()) == []
