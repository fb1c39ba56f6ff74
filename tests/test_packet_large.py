"""Large packets (marked slow: run with `pytest -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from m2kt.benchmarks.harness.packets import make_body
from m2kt.format import open_packet, verify_packet, write_packet

pytestmark = pytest.mark.slow
MiB = 1 << 20


def test_round_trip_of_a_256_mib_tensor(tmp_path: Path, signing_key) -> None:
    rng = np.random.default_rng(1)
    big = rng.random((256 * MiB // 4 // 1024, 1024), dtype=np.float32)
    tensors = {"concepts": rng.random((4, 8), dtype=np.float32), "traces": big}
    written = write_packet(tmp_path / "big.m2kt", make_body(), tensors, signing_key)
    assert written.size > 256 * MiB
    verify_packet(written.path, signing_key.verify_key)
    with open_packet(written.path) as packet:
        assert np.array_equal(packet.tensors["traces"], big)


READER = """
import json, resource, sys
from m2kt.format.keys import VerifyKey
from m2kt.format import open_packet, verify_packet
path, key = sys.argv[1], VerifyKey.from_raw(bytes.fromhex(sys.argv[2]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open_packet(path) as p:
    views = p.tensors
    shape = list(views["traces"].shape)
    first = float(views["traces"][0, 0]); last = float(views["traces"][-1, -1])
after_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
verify_packet(path, key)
after_verify = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "open_kib": after_open, "verify_kib": after_verify, "shape": shape}))
"""


def test_reading_and_verifying_1_gib_keeps_memory_far_below_the_file(tmp_path: Path, signing_key) -> None:
    rows = (1024 * MiB) // 4 // 1024
    source_file = tmp_path / "source.f32"
    with open(source_file, "wb") as f:
        f.truncate(rows * 1024 * 4)  # sparse zeros: the writer streams it without holding it
    source = np.memmap(source_file, dtype=np.float32, mode="r", shape=(rows, 1024))
    written = write_packet(
        tmp_path / "1g.m2kt", make_body(), {"concepts": np.ones((4, 8), np.float32), "traces": source}, signing_key
    )
    del source
    source_file.unlink()
    assert written.size >= 1024 * MiB

    proc = subprocess.run(
        [sys.executable, "-c", READER, str(written.path), signing_key.verify_key.raw.hex()],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(proc.stdout)
    assert rss["shape"] == [rows, 1024]
    limit_kib = written.size // 1024 // 8  # an eighth of the file
    assert rss["open_kib"] - rss["base_kib"] < limit_kib, rss
    assert rss["verify_kib"] - rss["base_kib"] < limit_kib, rss
