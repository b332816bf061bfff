"""storage: the same calls on local paths and on gs:// URIs served by a real GCS emulator on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from microfed.training import storage
from microfed.training.errors import MicrofedError
from microfed.training.io import write_safetensors
from tests.conftest import write_tree
from tests.gcs_emulator import GcsEmulator, gcs  # noqa: F401

TREE = {
    "manifest.json": b'{"num_examples": 3}\n',
    "shard-00000/images.safetensors": bytes(range(256)) * 3,
    "shard-00000/labels.safetensors": b"\x00\x01\x02",
    "shard-00001/deep/er/file.bin": b"nested",
}


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- URIs -------------------------------------------------------------------------------------------------


def test_is_gcs_and_split() -> None:
    assert storage.is_gcs("gs://b-1/x") and not storage.is_gcs("/tmp/x") and not storage.is_gcs(Path("x"))
    assert storage.split_gcs("gs://my-bucket/a/b.zip") == ("my-bucket", "a/b.zip")
    assert storage.split_gcs("gs://my-bucket") == ("my-bucket", "")
    assert storage.split_gcs("gs://my-bucket/") == ("my-bucket", "")


@pytest.mark.parametrize("uri", ["gs://", "gs:///key", "s3://x/y", "/local/path", "gs://UPPER/k"])
def test_split_gcs_rejects_what_is_not_a_bucket_uri(uri: str) -> None:
    with pytest.raises(MicrofedError, match="gs://BUCKET/PATH") as err:
        storage.split_gcs(uri)
    assert uri in err.value.message


def test_a_gcs_uri_mangled_by_pathlib_is_reported() -> None:
    with pytest.raises(MicrofedError, match="as str"):
        storage.is_gcs(Path("gs://bucket/key"))


def test_missing_credentials_say_how_to_authenticate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    storage.client.cache_clear()
    try:
        with pytest.raises(MicrofedError, match="no Google Cloud credentials") as err:
            storage.client()
        assert "Workload Identity" in err.value.hint and "gcloud auth application-default login" in err.value.hint
    finally:
        storage.client.cache_clear()


def test_join() -> None:
    assert storage.join("gs://b/runs/", "r1", "/model.safetensors") == "gs://b/runs/r1/model.safetensors"
    assert storage.join("gs://b", "x") == "gs://b/x"
    assert storage.join("/tmp/runs", "r1", "m.bin") == "/tmp/runs/r1/m.bin"


# --- bytes ------------------------------------------------------------------------------------------------


def test_bytes_round_trip(base: str) -> None:
    uri = storage.join(base, "sub", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")  # a replace, not an append
    assert storage.read_bytes(uri) == b"second"
    assert storage.exists(uri) and storage.exists(storage.join(base, "sub"))  # a file and its folder
    assert not storage.exists(storage.join(base, "su"))  # a prefix of a name is not a folder


def test_reading_a_missing_file_names_it(base: str) -> None:
    uri = storage.join(base, "missing.json")
    with pytest.raises(MicrofedError, match="not found") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value)


def test_safetensors_written_through_storage_reads_back_equal(base: str, tmp_path: Path) -> None:
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "n": torch.tensor([7], dtype=torch.int64)}
    data = write_safetensors(tmp_path / "local.safetensors", tensors, {"round": "3"})
    uri = storage.join(base, "model.safetensors")
    storage.write_bytes(uri, data)
    back = st_load(storage.read_bytes(uri))
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(back[key], tensor) and back[key].dtype == tensor.dtype


@pytest.mark.integration
def test_generation_precondition_on_gcs(gcs: GcsEmulator) -> None:  # noqa: F811
    uri = gcs.uri("global/model.safetensors")
    storage.write_bytes(uri, b"v1", if_generation_match=0)  # 0: only if absent
    with pytest.raises(MicrofedError, match="generation precondition failed") as err:
        storage.write_bytes(uri, b"v2", if_generation_match=0)
    assert uri in str(err.value)

    generation = storage.client().bucket(gcs.bucket).get_blob("global/model.safetensors").generation
    with pytest.raises(MicrofedError, match="generation precondition failed"):
        storage.write_bytes(uri, b"v2", if_generation_match=generation + 1)
    assert storage.read_bytes(uri) == b"v1"  # the failed writes changed nothing
    storage.write_bytes(uri, b"v3", if_generation_match=generation)
    assert storage.read_bytes(uri) == b"v3"


def test_generation_precondition_on_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    storage.write_bytes(path, b"v1", if_generation_match=0)
    with pytest.raises(MicrofedError, match="already exists"):
        storage.write_bytes(path, b"v2", if_generation_match=0)
    with pytest.raises(MicrofedError, match="gs:// objects only"):
        storage.write_bytes(path, b"v2", if_generation_match=5)
    assert path.read_bytes() == b"v1"
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"]  # no temporary files left behind


# --- trees ------------------------------------------------------------------------------------------------


def test_upload_list_download_round_trip(base: str, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    storage.upload_tree(src, base)
    assert storage.list_files(base) == sorted(TREE)
    assert storage.list_files(storage.join(base, "shard-00000")) == ["images.safetensors", "labels.safetensors"]
    got = storage.download_tree(base, tmp_path / "dst")
    assert read_tree(got) == TREE


def test_list_files_of_a_missing_folder_is_empty(base: str) -> None:
    assert storage.list_files(storage.join(base, "nothing-here")) == []


@pytest.mark.integration
def test_download_only_the_named_files(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    storage.upload_tree(write_tree(tmp_path / "src", TREE), gcs.uri("shards"))
    only = ["manifest.json", "shard-00001/deep/er/file.bin"]
    got = storage.download_tree(gcs.uri("shards"), tmp_path / "dst", only=only)
    assert read_tree(got) == {name: TREE[name] for name in only}


@pytest.mark.integration
def test_download_of_a_missing_file_or_empty_prefix_names_the_uri(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(MicrofedError, match="no files") as err:
        storage.download_tree(gcs.uri("empty"), tmp_path / "a")
    assert gcs.uri("empty") in str(err.value)
    storage.write_bytes(gcs.uri("shards/manifest.json"), b"{}")
    with pytest.raises(MicrofedError, match="not found") as err:
        storage.download_tree(gcs.uri("shards"), tmp_path / "b", only=["shard-7.safetensors"])
    assert gcs.uri("shards/shard-7.safetensors") in str(err.value)
    assert list_local(tmp_path / "b") == []  # the failed transfer left no partial file


def list_local(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


@pytest.mark.integration
def test_object_names_cannot_escape_the_download_folder(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(MicrofedError, match="outside"):
        storage.download_tree(gcs.uri("x"), tmp_path / "dst", only=["../evil.bin"])
    assert not (tmp_path / "evil.bin").exists()


# --- staging ----------------------------------------------------------------------------------------------


def test_staged_input_on_a_local_path_does_not_copy(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    with storage.staged_input(str(src)) as path:
        assert path == src
    with storage.staged_file(str(src / "manifest.json")) as path:
        assert path == src / "manifest.json"
    assert storage.download_tree(str(src), tmp_path / "unused") == src
    assert not (tmp_path / "unused").exists()


@pytest.mark.integration
def test_staged_input_from_gcs_is_removed_afterwards(gcs: GcsEmulator, tmp_path: Path) -> None:  # noqa: F811
    storage.upload_tree(write_tree(tmp_path / "src", TREE), gcs.uri("shards"))
    with storage.staged_input(gcs.uri("shards"), only=["manifest.json"]) as path:
        assert read_tree(path) == {"manifest.json": TREE["manifest.json"]}
    assert not path.exists()


@pytest.mark.integration
def test_staged_file_keeps_the_name_and_is_removed_afterwards(gcs: GcsEmulator) -> None:  # noqa: F811
    storage.write_bytes(gcs.uri("datasets/shapes.zip"), b"PK\x05\x06" + bytes(18))
    with storage.staged_file(gcs.uri("datasets/shapes.zip")) as path:
        assert path.name == "shapes.zip" and path.read_bytes() == b"PK\x05\x06" + bytes(18)
    assert not path.exists()


def test_staged_file_of_a_missing_file_names_it(base: str) -> None:
    uri = storage.join(base, "missing.zip")
    with pytest.raises(MicrofedError, match="not found") as err, storage.staged_file(uri):
        pass
    assert uri in str(err.value)


def test_staged_output_uploads_on_success(base: str) -> None:
    with storage.staged_output(base) as out:
        write_tree(out, TREE)
    assert storage.list_files(base) == sorted(TREE)
    assert storage.read_bytes(storage.join(base, "shard-00001/deep/er/file.bin")) == b"nested"
    if storage.is_gcs(base):
        assert not out.exists()  # the staging folder is gone


@pytest.mark.integration
def test_staged_output_uploads_nothing_when_the_block_raises(gcs: GcsEmulator) -> None:  # noqa: F811
    with pytest.raises(RuntimeError, match="training diverged"), storage.staged_output(gcs.uri("model")) as out:
        write_tree(out, TREE)
        raise RuntimeError("training diverged")
    assert storage.list_files(gcs.uri("model")) == []
    assert not storage.exists(gcs.uri("model"))
    assert not out.exists()


def test_upload_tree_to_a_local_folder_copies_every_file(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", TREE)
    storage.upload_tree(src, str(tmp_path / "dst"))
    assert read_tree(tmp_path / "dst") == TREE
