#!/usr/bin/env python3
"""Paired bootstrap of a weighted-F1 difference between two evaluations of the same
samples (say, real faces and the shuffled-image control): resamples the samples with
replacement, recomputes both scores on each resample, and reports the difference with its
95% interval and the share of resamples where it is not above zero. Standard library only.

    python3 tools/paired_bootstrap.py runs/x/predictions.jsonl runs/x/shuffled-images/predictions.jsonl
"""
import json
import random
import sys


def load(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        out[(r["dialogue_id"], r["utterance_id"], r.get("prompt_set", 0))] = (r["gold"], r["pred"])
    return out


def weighted_f1(pairs):
    labels = {g for g, _ in pairs}
    total, n = 0.0, len(pairs)
    for c in labels:
        tp = sum(1 for g, p in pairs if g == c and p == c)
        fp = sum(1 for g, p in pairs if g != c and p == c)
        fn = sum(1 for g, p in pairs if g == c and p != c)
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        total += f1 * sum(1 for g, _ in pairs if g == c)
    return 100 * total / n


def main():
    a, b = load(sys.argv[1]), load(sys.argv[2])
    keys = sorted(set(a) & set(b))
    if len(keys) != len(a) or len(keys) != len(b):
        sys.exit("the two files do not score the same samples")
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    rng = random.Random(0)
    diff = weighted_f1([a[k] for k in keys]) - weighted_f1([b[k] for k in keys])
    ds = []
    for _ in range(reps):
        s = [rng.choice(keys) for _ in keys]
        ds.append(weighted_f1([a[k] for k in s]) - weighted_f1([b[k] for k in s]))
    ds.sort()
    lo, hi = ds[int(0.025 * reps)], ds[int(0.975 * reps) - 1]
    p = sum(1 for d in ds if d <= 0) / reps
    print(json.dumps({"samples": len(keys), "weighted_f1_difference": round(diff, 2),
                      "ci95": [round(lo, 2), round(hi, 2)], "resamples": reps,
                      "share_not_above_zero": p}))


if __name__ == "__main__":
    main()
