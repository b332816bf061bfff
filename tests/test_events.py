"""The event channel across processes (training/step_log.py): the local launcher hands the events file to its
workers, and their lines, appended at the same time, never interleave."""

from __future__ import annotations

import itertools
import json
import os
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from microfed.training.launch import launch_local
from microfed.training.step_log import EVENTS_ENV

pytestmark = pytest.mark.integration

# A stand-in worker: many events at once, each longer than a pipe's atomic write (PIPE_BUF, 4096 bytes on Linux)
# and a page, so that interleaved writes would show as broken lines.
EMITTER = textwrap.dedent("""
    import os
    import sys
    import time

    from microfed.training.step_log import event

    rank = int(os.environ["RANK"])
    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))  # both start writing at once
    for i in range(int(sys.argv[2])):
        event("epoch", rank=rank, round=i, payload=str(rank) * (9000 + i))
""")
N = 1000


def test_two_workers_events_reach_the_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "emitter.py").write_text(EMITTER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))  # what `microfed run` sets for a step; the launcher passes it on
    launch_local(2, [str(time.time() + 5), str(N)], log_dir=tmp_path / "logs", module="emitter", echo_rank0=False)
    lines = events.read_bytes().split(b"\n")
    assert lines.pop() == b""  # every line ends with its newline
    records = [json.loads(line) for line in lines]  # each line one whole JSON object
    assert Counter(r["rank"] for r in records) == {0: N, 1: N}
    for r in records:
        assert r["payload"] == str(r["rank"]) * (9000 + r["round"])
    for rank in (0, 1):
        assert [r["round"] for r in records if r["rank"] == rank] == list(range(N))
    assert len({r["pid"] for r in records}) == 2
    # and they were written at the same time: the ranks' lines alternate in the file
    assert sum(a["rank"] != b["rank"] for a, b in itertools.pairwise(records)) > 10
