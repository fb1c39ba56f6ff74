"""Packet I/O speed and memory: write, read (memory-mapped), verify — next to raw sha256.

    python -m m2kt.benchmarks.packet_io                 # 1 GiB packet
    python -m m2kt.benchmarks.packet_io --size-mib 256 --repeat 3

Verification must run at hashing speed: its reference is ``hashlib.sha256`` over the same
file, read in the same 8 MiB chunks, in the same process (and, for context, sha256 of the
same bytes already in memory). Reading must not pull the file into memory: the table shows
the resident-set growth of opening the packet and taking views of every tensor, and the
peak growth while verifying.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from m2kt.format import open_packet, verify_packet, write_packet
from m2kt.format.keys import SigningKey
from m2kt.format.manifest import (
    ConceptEntry,
    DataUsage,
    ExtractionInfo,
    ExtractionStep,
    ManifestBody,
    SafetyInfo,
    TeacherInfo,
)

MiB = 1 << 20
PROC = psutil.Process()


class PeakRSS:
    """Samples this process's RSS every few milliseconds while a block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = PROC.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, PROC.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, PROC.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_tensors(size: int, d: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = size // (4 * d)
    traces = np.empty((rows, d), np.float32)
    step = 1 << 20
    for i in range(0, rows, step):
        traces[i : i + step] = rng.random((min(step, rows - i), d), dtype=np.float32)
    return {"concepts": rng.random((64, d), dtype=np.float32), "traces": traces}


def body(d: int = 256) -> ManifestBody:
    return ManifestBody(
        topic="bench.io",
        teacher=TeacherInfo(model_name="bench", architecture="none", d_model=d),
        concepts=[ConceptEntry(id=f"c{i}", label=f"c{i}", kind="named", safety_score=0.0) for i in range(64)],
        extraction=ExtractionInfo(concepts=ExtractionStep(method="synthetic")),
        data_usage=DataUsage(probe_count=0, teacher_forward_passes=0),
        safety=SafetyInfo(scorer="none", version="0"),
    )


def time_hash_and_write(
    path: Path, tensors: dict[str, np.ndarray], key: SigningKey, repeat: int
) -> tuple[float, float]:
    """Seconds for sha256 of the big tensor in memory, and for write_packet; the tensors die with the call."""
    in_memory = memoryview(tensors["traces"].reshape(-1).view(np.uint8))
    t_mem_hash = best_of(repeat, lambda: hashlib.sha256(in_memory).hexdigest())
    t_write = best_of(repeat, lambda: write_packet(path, body(), tensors, key))
    return t_mem_hash, t_write


def sha256_file(path: Path, chunk: int = 8 * MiB) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the packet (default: a temp dir)")
    args = parser.parse_args()

    key = SigningKey.generate()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.m2kt"
        t_mem_hash, t_write = time_hash_and_write(path, make_tensors(args.size_mib * MiB), key, args.repeat)
        size = path.stat().st_size
        gc.collect()

        t_raw = best_of(args.repeat, lambda: sha256_file(path))

        def read() -> None:
            with open_packet(path) as packet:
                for arr in packet.tensors.values():
                    flat = arr.reshape(-1)
                    float(flat[:: 4096 // arr.itemsize].sum())  # touch every page

        t_read = best_of(args.repeat, read)
        with PeakRSS() as open_rss:
            packet = open_packet(path)
            views = packet.tensors
            assert views["traces"].nbytes > 0.99 * (size - 64 * 256 * 4 - 4096)
        del views
        packet.close()

        t_verify = best_of(args.repeat, lambda: verify_packet(path, key.verify_key))
        with PeakRSS() as verify_rss:
            verify_packet(path, key.verify_key)

    mb = size / 1e6
    raw = mb / t_raw
    rows = [
        ("raw sha256, file read in 8 MiB chunks (reference)", mb / t_raw, 1.0, "—"),
        ("raw sha256, bytes already in memory", mb / t_mem_hash, (mb / t_mem_hash) / raw, "—"),
        ("write_packet (hash + write + fsync)", mb / t_write, (mb / t_write) / raw, "—"),
        (
            "open_packet + fault in every page (mmap, cached)",
            mb / t_read,
            (mb / t_read) / raw,
            f"open+views: +{open_rss.growth / MiB:.1f} MiB",
        ),
        (
            "verify_packet (digest + signature + finite)",
            mb / t_verify,
            (mb / t_verify) / raw,
            f"peak +{verify_rss.growth / MiB:.1f} MiB",
        ),
    ]
    print(
        f"\npacket: {size / MiB:,.0f} MiB ({size:,} bytes), best of {args.repeat}, "
        f"{os.cpu_count()} CPU(s), numpy {np.__version__}\n"
    )
    print(f"| {'operation':<50} | {'MB/s':>8} | {'× raw sha256':>12} | {'resident memory':<26} |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 14}|{'-' * 28}|")
    for name, speed, ratio, rss in rows:
        print(f"| {name:<50} | {speed:>8,.0f} | {ratio:>12.2f} | {rss:<26} |")
    print(
        f"\nverify / raw sha256 = {(mb / t_verify) / raw:.2f} (expected ≥ 0.8); "
        f"verify peak RSS growth = {verify_rss.growth / size:.1%} of the file; "
        f"open RSS growth = {open_rss.growth / size:.1%} of the file"
    )


if __name__ == "__main__":
    main()
