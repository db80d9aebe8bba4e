"""Runs the reference DSIR (PyPI data-selection 1.0.3) on JSONL files and writes
what ablate's implementation is compared with, as JSON on stdout: the bucket
counts of raw and target, every raw document's log importance weight (in file
order), its length metadata, the ids of the deterministic top-k selection, and
the seconds spent computing the weights.

usage: python dsir_reference.py --target T.jsonl --k K --num-proc N --work DIR RAW.jsonl...
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
from data_selection import HashedNgramDSIR


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw", nargs="+")
    ap.add_argument("--target", required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    dsir = HashedNgramDSIR(args.raw, [args.target], cache_dir=str(work / "cache"), num_proc=args.num_proc)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    raw_counts = dsir._fit_bow(dsir.raw_datasets, num_tokens_to_fit=None)
    target_counts = dsir._fit_bow(dsir.target_datasets, num_tokens_to_fit=None)
    start = time.perf_counter()
    dsir.compute_importance_weights()
    seconds = time.perf_counter() - start
    shards = dsir._get_virtually_sharded_datasets(dsir.raw_datasets)
    weights = np.concatenate([np.load(work / "cache" / "log_importance_weights" / f"{s['overall_idx']}.npy") for s in shards])
    lengths = np.concatenate([np.load(work / "cache" / "perexample_metadata" / f"{s['overall_idx']}.npy") for s in shards])
    out = work / "selected"
    dsir.resample(out_dir=str(out), num_to_sample=args.k, cache_dir=str(work / "resample-cache"), top_k=True)
    selected = []
    for f in sorted(out.glob("*.jsonl")):
        selected.extend(json.loads(line)["id"] for line in f.read_text().splitlines() if line.strip())
    json.dump(
        {
            "raw_counts": [int(c) for c in raw_counts],
            "target_counts": [int(c) for c in target_counts],
            "log_weights": [float(w) for w in weights],
            "lengths": [float(x) for x in lengths],
            "top_k_ids": selected,
            "seconds": seconds,
            "documents": int(len(weights)),
        },
        __import__("sys").stdout,
    )


if __name__ == "__main__":
    main()
