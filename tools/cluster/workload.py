"""The test cluster's workload: what the end-to-end test's pods run (python3 in the pod).

    workload.py write PATH SEED MIB        MIB MiB of data derived from SEED, then fsync
    workload.py verify PATH SEED MIB       the same data read back, byte for byte
    workload.py churn PATH SEED MIB STOP   rewrite MIB MiB slots in turn, fsync every 4,
                                           until the file STOP exists; then verify the
                                           last generation of every slot
    workload.py capacity DIR 0 MIB         fails unless DIR's filesystem holds MIB MiB

Several actions run in turn when separated by ``--`` (``verify ... -- churn ...``).
Every I/O error ends the run with status 1 and the error on stderr; ``churn`` prints the
longest write-plus-fsync pause it saw, which the end-to-end test reports.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

MiB = 1 << 20


def block(seed: int, index: int, generation: int = 0) -> bytes:
    """1 MiB of data that only (seed, index, generation) produce."""
    digest = hashlib.sha256(f"{seed}:{index}:{generation}".encode()).digest()
    return digest * (MiB // len(digest))


def write(path: str, seed: int, mib: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for index in range(mib):
            os.pwrite(fd, block(seed, index), index * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str, seed: int, mib: int, generations: list[int] | None = None) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in range(mib):
            generation = generations[index] if generations else 0
            if os.pread(fd, MiB, index * MiB) != block(seed, index, generation):
                sys.exit(f"{path}: MiB {index} differs from what was written")
    finally:
        os.close(fd)


def churn(path: str, seed: int, mib: int, stop: str) -> None:
    generations = [0] * mib
    write(path, seed, mib)
    print("churn: rewriting", flush=True)  # what the e2e waits for before its faults
    fd = os.open(path, os.O_WRONLY)
    longest = 0.0
    step = 0
    try:
        while not os.path.exists(stop):
            index = step % mib
            began = time.monotonic()
            os.pwrite(fd, block(seed, index, generations[index] + 1), index * MiB)
            if step % 4 == 3:
                os.fsync(fd)
            generations[index] += 1
            longest = max(longest, time.monotonic() - began)
            step += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    verify(path, seed, mib, generations)
    print(f"churn: {step} MiB written, longest pause {longest:.2f} s", flush=True)


def main(argv: list[str]) -> None:
    if "--" in argv:
        cut = argv.index("--")
        main(argv[:cut])
        main(argv[cut + 1 :])
        return
    action, path, seed, mib = argv[0], argv[1], int(argv[2]), int(argv[3])
    try:
        if action == "write":
            write(path, seed, mib)
        elif action == "verify":
            verify(path, seed, mib)
        elif action == "churn":
            churn(path, seed, mib, argv[4])
        elif action == "capacity":
            stat = os.statvfs(path)
            total_mib = stat.f_blocks * stat.f_frsize // MiB
            if total_mib < mib:
                sys.exit(f"{path}: the filesystem holds {total_mib} MiB, not {mib}")
        else:
            sys.exit(f"unknown action {action}")
    except OSError as exc:
        sys.exit(f"I/O error: {exc}")
    print(f"{action}: {mib} MiB ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
