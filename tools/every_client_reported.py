"""Exit 1 unless every round of a finished ``fedmpq simulate`` run aggregated every client it
sampled (``tools/gpu_check.sh``: a client that fails is left out of its round with a logged
warning and the run still exits 0, so a broken CUDA-graph capture would otherwise pass).

    python tools/every_client_reported.py OUT/results.json
"""
from __future__ import annotations

import json
import sys

from fedmpq.federation import sample_clients


def main(path: str) -> int:
    r = json.load(open(path))
    c = r["config"]
    bad = []
    for x in r["rounds"]:
        want = len(sample_clients(c, x["round"]))
        got = (len(x["reported"]), len(x.get("aggregated", x["reported"])))  # older runs lack "aggregated"
        if got != (want, want):
            bad.append(f"round {x['round']}: {got[0]} reported, {got[1]} aggregated of {want}")
    if not r["rounds"]:
        bad.append("no rounds")
    for line in bad:
        print(f"every_client_reported: {line} (the run's log says why)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
