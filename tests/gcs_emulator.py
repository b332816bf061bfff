"""A real GCS-compatible HTTP server on loopback for tests: gcp-storage-emulator in a child process.

Use it from a test module with `from tests.gcs_emulator import gcs  # noqa: F401` and a `gcs` argument. Each
test gets a fresh bucket on one server per pytest session, and STORAGE_EMULATOR_HOST pointing at it (so
`microfed.training.storage` and any worker process started by the test talk to the emulator, not to Google).

The child process binds port 0 and reports the port it got, so there is no race for a "free" port; it exits
when its stdin closes, so it cannot outlive the test session even if pytest is killed.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import pytest

__all__ = ["GcsEmulator", "gcs"]

_HOST = "127.0.0.1"
_START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class GcsEmulator:
    """The emulator as a test sees it: its address and a bucket of the test's own."""

    host: str  # http://127.0.0.1:PORT, the value of STORAGE_EMULATOR_HOST
    bucket: str

    def uri(self, path: str = "") -> str:
        """gs://<bucket>/<path>."""
        return f"gs://{self.bucket}/{path.lstrip('/')}"


# --- the child process -------------------------------------------------------------------------------------


def _object_name(request: Any) -> str | None:
    """The object an upload request creates: `?name=` or the JSON metadata (multipart or resumable start)."""
    if "name" in request.query:
        return str(request.query["name"][0])
    data = request.data
    meta = data.get("meta", data) if isinstance(data, dict) else {}
    return meta.get("name") if isinstance(meta, dict) else None


def _with_generation_precondition(insert: Callable[..., Any]) -> Callable[..., Any]:
    """Make the emulator's upload handler honour `ifGenerationMatch` as GCS does (the emulator ignores it).

    Real GCS answers 412 when the object's generation differs (0 meaning "must not exist"); without this, a
    test of the precondition path would pass against the emulator for the wrong reason.
    """
    from gcp_storage_emulator.exceptions import NotFound

    def checked(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = request.query.get("ifGenerationMatch")
        if wanted is not None:
            try:
                current = int(storage.get_file_obj(request.params["bucket_name"], _object_name(request))["generation"])
            except NotFound:
                current = 0
            if int(wanted[0]) != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet", "errors": []}})
                return None
        return insert(request, response, storage, *args, **kwargs)

    return checked


def _serve() -> None:
    """Child process: serve an in-memory emulator on loopback until stdin closes."""
    from http.server import HTTPServer

    from gcp_storage_emulator import server as emu
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.storage import Storage

    checked = _with_generation_precondition(objects.insert)
    for _, methods in emu.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is objects.insert:
                methods[method] = checked
    objects.insert = checked  # the router's fallback for uploads posted without the /upload prefix

    httpd = HTTPServer((_HOST, 0), functools.partial(emu.RequestHandler, Storage(use_memory_fs=True)))
    print(httpd.server_address[1], flush=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    sys.stdin.read()  # returns when the parent closes the pipe or exits
    httpd.shutdown()


# --- the parent (pytest) side ------------------------------------------------------------------------------


def _answers(host: str) -> bool:
    # No proxies: an http_proxy in the environment must not capture loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(host + "/", timeout=1) as response:
            return bool(response.status == HTTPStatus.OK)
    except (urllib.error.URLError, OSError):
        return False


class _Server:
    """One emulator child process and its address."""

    def __init__(self) -> None:
        # The child's stderr, kept for the error message if it fails to start; it lives as long as the child.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self._proc.stdout is not None
        port = self._proc.stdout.readline().strip()
        if not port.isdigit():
            self.stop()
            raise RuntimeError(f"gcp-storage-emulator did not start: {self._log_tail()}")
        self.host = f"http://{_HOST}:{port}"
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers(self.host):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"gcp-storage-emulator at {self.host} does not answer: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()


_shared: _Server | None = None


def _session_server(config: pytest.Config) -> _Server:
    """Start the emulator on first use; stop it when the pytest session ends (one start costs ~1 s)."""
    global _shared
    if _shared is None:
        _shared = _Server()
        config.add_cleanup(_stop_shared)
    return _shared


def _stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


@pytest.fixture
def gcs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcsEmulator]:
    """A fresh bucket on the session's emulator, with STORAGE_EMULATOR_HOST set for this test."""
    # Imported here, not at the top: the emulator child process runs this file and needs none of it.
    from microfed.training import storage

    server = _session_server(request.config)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), _HOST, "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    storage.client.cache_clear()  # a client made before the variable was set would talk to Google
    bucket = f"microfed-test-{uuid.uuid4().hex[:12]}"
    storage.client().create_bucket(bucket)
    try:
        yield GcsEmulator(host=server.host, bucket=bucket)
    finally:
        storage.client.cache_clear()  # later tests must not reuse the emulator's anonymous client


if __name__ == "__main__":
    _serve()
