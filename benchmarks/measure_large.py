"""Wall time and peak memory of the reference on the ``large`` family.

    OMP_NUM_THREADS=1 python benchmarks/measure_large.py [--families F,G] [CASE_ID ...]

Each case runs in a fresh process (peak resident memory is per process): the
matrix-free families (default agreement, exactness, robustness; ``--families
mc,invariance`` for the Monte-Carlo and invariance checks) with the reference
candidate in its worker process, as ``kfac-oracle check reference --cases ID``
runs them. Prints one line per case: checks by status, seconds, and the peak
resident memory of the harness and of the candidate's worker.
"""

from __future__ import annotations

import collections
import resource
import subprocess
import sys
import time

FAMILIES = ["agreement", "exactness", "robustness"]


def measure(case_id: str, families: list[str]) -> str:
    """Run one case; a line with its verdicts, time and peak memory."""
    from kfac_oracle.reference.candidate import ReferenceKFAC
    from kfac_oracle.runner.run import run

    start = time.perf_counter()
    records = run(ReferenceKFAC(), case_id, families=families, time_limit=None)
    seconds = time.perf_counter() - start
    status = dict(collections.Counter(r.status for r in records))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return (
        f"{case_id} ({','.join(families)}): {status} in {seconds:.0f} s; peak RSS "
        f"harness {own:.0f} MiB, "
        f"worker {worker:.0f} MiB"
    )


def main(argv: list[str]) -> None:
    """Each case in its own process."""
    families = FAMILIES
    if argv[:1] == ["--families"] and len(argv) >= 2:
        families = argv[1].split(",")
        argv = argv[2:]
    option = ["--families", ",".join(families)]
    if len(argv) == 1 and not argv[0].startswith("large*"):
        print(measure(argv[0], families), flush=True)
        return
    from kfac_oracle.catalogue import load_cases

    ids = argv or [c.id for c in load_cases("large*")]
    for case_id in ids:
        subprocess.run([sys.executable, __file__, *option, case_id], check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
