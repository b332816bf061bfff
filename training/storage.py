"""Local paths and `gs://bucket/prefix` URIs behind one small API.

Every step accepts either form for its inputs and outputs. Local paths are used in place; `gs://` URIs go through
google-cloud-storage: on a cluster with Workload Identity or application default credentials, in tests against
an emulator named by `STORAGE_EMULATOR_HOST` (which the client library honours).

Nothing is half-written: a local file is written to a temporary name in its folder and renamed; a GCS object
is replaced by a single upload, which readers see whole or not at all. A folder is a set of such files, so
a folder is complete only once its writer has finished: outputs are staged and uploaded after the step's
block succeeded (`staged_output`), never while it runs.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePath

from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage as gcs
from google.cloud.storage.retry import DEFAULT_RETRY

from microfed.training.errors import MicrofedError
from microfed.training.io import atomic_write_bytes

__all__ = [
    "client",
    "download_tree",
    "exists",
    "is_gcs",
    "join",
    "list_files",
    "read_bytes",
    "split_gcs",
    "staged_file",
    "staged_input",
    "staged_output",
    "upload_tree",
    "write_bytes",
]

SCHEME = "gs://"
# GCS bucket names: 3-222 characters of lower-case letters, digits, '-', '_' and '.', starting and ending
# with a letter or digit. Checking here turns a typo into an error that names the URI, not an HTTP 400.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# Parallel transfers: a folder of many small files (an ImageFolder dataset) is latency-bound one by one.
# Eight stays within the HTTP connection pool the client keeps per host (ten).
_TRANSFER_THREADS = 8
# A whole-object upload of the same bytes is idempotent for our writers, so transient errors are retried
# even without a generation precondition (the library only retries conditional uploads by default).
_UPLOAD_RETRY = DEFAULT_RETRY
_AUTH_HINT = (
    "on GKE bind the pod's Kubernetes service account to a Google service account (Workload Identity); "
    "locally run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
)


def is_gcs(uri: str | Path) -> bool:
    """Whether `uri` names a GCS object or prefix (`gs://...`)."""
    text = str(uri)
    # Path("gs://b/k") collapses the double slash to "gs:/b/k": catch the mangled URI here, where the cause is
    # known, instead of letting it become a local folder called "gs:".
    if isinstance(uri, PurePath) and text.startswith("gs:/"):
        raise MicrofedError(
            f"{text}: a gs:// URI was turned into a local path", hint="pass gs:// URIs as str, not pathlib.Path"
        )
    return text.startswith(SCHEME)


def split_gcs(uri: str | Path) -> tuple[str, str]:
    """(bucket, key) of `gs://bucket/key`; the key is "" for the bucket itself and never starts with '/'."""
    text = str(uri)
    if not text.startswith(SCHEME):
        raise MicrofedError(f"{text}: not a gs:// URI", hint="expected gs://BUCKET/PATH")
    bucket, _, key = text.removeprefix(SCHEME).partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise MicrofedError(
            f"{text}: {bucket!r} is not a valid bucket name",
            hint="expected gs://BUCKET/PATH, BUCKET being 3-222 lower-case letters, digits, '-', '_' or '.'",
        )
    return bucket, key.lstrip("/")


@functools.cache
def client() -> gcs.Client:
    """The process's storage client (cached: it holds the HTTP connection pool and the credentials).

    Tests that change STORAGE_EMULATOR_HOST call `client.cache_clear()`.
    """
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # The emulator checks no credentials; anonymous ones keep the client from looking for real ones.
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "microfed-emulator")
        return gcs.Client(project=project, credentials=AnonymousCredentials())
    try:
        return gcs.Client()
    except DefaultCredentialsError as e:
        raise MicrofedError(f"no Google Cloud credentials for gs:// access ({e})", hint=_AUTH_HINT) from None


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a local path or a gs:// URI (pathlib would collapse the gs:// double slash)."""
    if not is_gcs(base):
        return str(Path(base, *parts))
    pieces = [str(base).rstrip("/"), *(p.strip("/") for p in parts)]
    return "/".join(p for p in pieces if p)


@contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Turn the client library's HTTP errors into errors that name the URI and say what to do."""
    try:
        yield
    except gexc.NotFound:
        raise MicrofedError(f"{uri}: not found", hint="check the bucket and path (`gcloud storage ls URI`)") from None
    except gexc.PreconditionFailed:
        raise MicrofedError(
            f"{uri}: not written: the object already exists or another writer replaced it "
            "(generation precondition failed)",
            hint="read it again before writing, or write to a new path",
        ) from None
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise MicrofedError(
            f"{uri}: access denied ({e.message})",
            hint="grant the workload's service account roles/storage.objectUser on the bucket; " + _AUTH_HINT,
        ) from None


def _blob(uri: str) -> gcs.Blob:
    bucket, key = split_gcs(uri)
    if not key:
        raise MicrofedError(f"{uri}: names a bucket, not an object", hint="expected gs://BUCKET/PATH")
    return client().bucket(bucket).blob(key)


def read_bytes(uri: str | Path) -> bytes:
    """The whole content of a local file or a GCS object."""
    if not is_gcs(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise MicrofedError(f"{uri}: file not found") from None
    with _gcs_errors(str(uri)):
        data: bytes = _blob(str(uri)).download_as_bytes()
    return data


def write_bytes(uri: str | Path, data: bytes, *, if_generation_match: int | None = None) -> None:
    """Replace a file or object with `data` as a whole.

    `if_generation_match` is GCS's optimistic lock: the write happens only if the object is at that generation
    (0: only if it does not exist yet). A local file has no generations; there only 0 is accepted.
    """
    if is_gcs(uri):
        _write_object(str(uri), data, if_generation_match)
        return
    if if_generation_match not in (None, 0):
        raise MicrofedError(f"{uri}: generation preconditions other than 0 apply to gs:// objects only")
    # Check-then-write is not atomic across processes; on local disk the single writer per file (rank 0) is
    # what makes it safe, the check only guards against overwriting an earlier run's file.
    if if_generation_match == 0 and Path(uri).exists():
        raise MicrofedError(f"{uri}: already exists", hint="write to a new path or delete the old file")
    atomic_write_bytes(uri, data)


def _write_object(uri: str, data: bytes, if_generation_match: int | None) -> None:
    blob = _blob(uri)
    with _gcs_errors(uri):
        if if_generation_match is None:
            blob.upload_from_string(data, content_type="application/octet-stream", retry=_UPLOAD_RETRY)
        else:
            # The library's default retry for conditional uploads: safe, the precondition makes it idempotent.
            blob.upload_from_string(
                data, content_type="application/octet-stream", if_generation_match=if_generation_match
            )


def exists(uri: str | Path) -> bool:
    """Whether a file or folder exists; for gs://, an object or any object under `uri/`."""
    if not is_gcs(uri):
        return Path(uri).exists()
    bucket, key = split_gcs(uri)
    with _gcs_errors(str(uri)):
        if not key:
            return bool(client().bucket(bucket).exists())
        if client().bucket(bucket).blob(key).exists():
            return True
        return any(True for _ in client().list_blobs(bucket, prefix=_folder_prefix(key), max_results=1))


def _folder_prefix(key: str) -> str:
    """The object-name prefix of the files under a folder key ("" for the bucket root)."""
    return key.rstrip("/") + "/" if key.strip("/") else ""


def list_files(uri_prefix: str | Path) -> list[str]:
    """Sorted '/'-separated names of the files under a folder or prefix, relative to it (recursive).

    A missing folder lists as empty, as a prefix with no objects does.
    """
    if not is_gcs(uri_prefix):
        root = Path(uri_prefix)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bucket, key = split_gcs(uri_prefix)
    prefix = _folder_prefix(key)
    with _gcs_errors(str(uri_prefix)):
        names = [b.name[len(prefix) :] for b in client().list_blobs(bucket, prefix=prefix)]
    # Objects ending in '/' are the placeholders the Cloud Console creates for empty folders: not files.
    return sorted(n for n in names if n and not n.endswith("/"))


def _inside(root: Path, name: str) -> Path:
    """root/name, refusing names that would land outside root (object names may contain '..')."""
    dest = (root / name).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise MicrofedError(f"{name}: refusing a file name that points outside {root}")
    return dest


def _download(uri: str, dest: Path) -> None:
    """One object to a local file, through a temporary name so a failed transfer leaves nothing behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        with _gcs_errors(uri):
            _blob(uri).download_to_filename(tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _run_all(fn: Callable[[str], None], names: list[str]) -> None:
    """fn(name) for every name on a few threads; the first error is raised (after the others finish)."""
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        list(pool.map(fn, names))  # consuming the results raises the first worker's error here


def download_tree(uri: str | Path, local_dir: Path, only: Iterable[str] | None = None) -> Path:
    """Copy the files under a gs:// folder (or just the relative names in `only`) into local_dir.

    A local `uri` is returned as is, without copying: callers read from whatever path comes back.
    """
    if not is_gcs(uri):
        return Path(uri)
    names = list(only) if only is not None else list_files(uri)
    if only is None and not names:
        raise MicrofedError(f"{uri}: no files under this prefix", hint="check the URI (`gcloud storage ls URI`)")
    _run_all(lambda name: _download(join(uri, name), _inside(local_dir, name)), names)
    return local_dir


def _atomic_copy(src: Path, dest: Path) -> None:
    """Copy a file so readers of dest see the old file or the whole new one (streamed, not read into memory)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _upload(src: Path, uri: str) -> None:
    with _gcs_errors(uri):
        _blob(uri).upload_from_filename(src, retry=_UPLOAD_RETRY)


def upload_tree(local_dir: Path, uri: str | Path) -> None:
    """Copy every file under local_dir to uri/<relative name>, each one atomically (not the tree as a whole)."""
    names = list_files(local_dir)
    if is_gcs(uri):
        _run_all(lambda name: _upload(local_dir / name, join(uri, name)), names)
        return
    target = Path(uri)
    if target.resolve() == local_dir.resolve():
        return  # staged_output on a local path wrote in place
    for name in names:
        _atomic_copy(local_dir / name, target / name)


@contextmanager
def staged_input(uri: str | Path, only: Iterable[str] | None = None) -> Iterator[Path]:
    """A local folder with the input's files: the path itself, or a temporary download of a gs:// prefix."""
    if not is_gcs(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="microfed-in-") as tmp:
        yield download_tree(uri, Path(tmp), only)


@contextmanager
def staged_output(uri: str | Path) -> Iterator[Path]:
    """A local folder to write an output into; for gs://, uploaded only when the block finishes without error.

    A failed step therefore leaves no partial output on GCS (a local folder is written in place, file by file).
    """
    if not is_gcs(uri):
        path = Path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="microfed-out-") as tmp:
        yield Path(tmp)
        # Reached only when the block did not raise: an exception propagates out of the yield above.
        upload_tree(Path(tmp), uri)


@contextmanager
def staged_file(uri: str | Path) -> Iterator[Path]:
    """A local copy of one file (a dataset zip): the path itself, or a temporary download keeping its name."""
    if not is_gcs(uri):
        path = Path(uri)
        if not path.is_file():
            raise MicrofedError(f"{uri}: file not found")
        yield path
        return
    _, key = split_gcs(uri)
    with tempfile.TemporaryDirectory(prefix="microfed-in-") as tmp:
        # Keep the object's base name: readers recognise a dataset zip by its suffix.
        dest = Path(tmp) / (PurePath(key).name or "object")
        _download(str(uri), dest)
        yield dest
