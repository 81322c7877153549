#!/usr/bin/env python3
"""How much emotion the image vectors hold: a linear probe on the vectors farcer's vision
encoder wrote to its cache, for the MELD faces proxy (tools/make_meld_faces_proxy.py).

1. Face -> FER label: multinomial logistic regression on the vectors of FER's `train/`
   faces, the L2 weight chosen on a fifth of `train/` held out, scored on `validation/`.
2. Face -> utterance label on the proxy's dev: the same probe (refit on all of `train/`)
   reads each dev utterance's face and names the utterance's gold label. This is what the
   faces alone give on the proxy, without any text: the bar a multimodal model's gain over
   its shuffled-image control can be read against.

Needs numpy only (run it in a throwaway venv); reads the vectors that a `farcer train` or
`farcer eval` on the proxy cached (it says how many faces have none).

    python tools/faces_probe.py --store ~/.cache/farcer/vectors/<key>.safetensors \
        --faces ../shared/data/faces-fer --proxy data/meld-faces --out runs/faces-probe.json
"""
import argparse
import hashlib
import json
import os
import struct

import numpy as np

FER = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "joy",
       "neutral": "neutral", "sad": "sadness", "surprise": "surprise"}
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]


def load_store(path):
    """A safetensors file of f32 vectors keyed by the image's sha256 -> {hash: vector}."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(raw[base + a:base + b], dtype="<f4")
    return out


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def faces(root, split, store):
    xs, ys, missing = [], [], 0
    for fer, label in FER.items():
        d = os.path.join(root, split, fer)
        for f in sorted(os.listdir(d)):
            v = store.get(sha(os.path.join(d, f)))
            if v is None:
                missing += 1
                continue
            xs.append(v)
            ys.append(LABELS.index(label))
    return np.stack(xs), np.array(ys), missing


def fit(x, y, l2, steps=500, lr=0.5):
    """Softmax regression by full-batch gradient descent on standardised inputs."""
    k = len(LABELS)
    w = np.zeros((x.shape[1], k))
    b = np.zeros(k)
    onehot = np.eye(k)[y]
    for _ in range(steps):
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


def scores(gold, pred):
    k = len(LABELS)
    acc = float((gold == pred).mean())
    f1s, support = [], []
    for c in range(k):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        support.append(int((gold == c).sum()))
    wf1 = float(np.dot(f1s, support) / max(1, sum(support)))
    present = [f for f, s in zip(f1s, support) if s > 0]
    return {"accuracy": 100 * acc, "weighted_f1": 100 * wf1,
            "macro_f1": 100 * float(np.mean(present))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--faces", default="../shared/data/faces-fer")
    ap.add_argument("--proxy", default="data/meld-faces")
    ap.add_argument("--out")
    a = ap.parse_args()
    store = load_store(a.store)
    xtr, ytr, miss_tr = faces(a.faces, "train", store)
    xva, yva, miss_va = faces(a.faces, "validation", store)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    norm = lambda x: (x - mu) / sd
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ytr))
    cut = len(idx) // 5
    held, fit_idx = idx[:cut], idx[cut:]
    best = None
    for l2 in [1e-4, 1e-3, 1e-2, 1e-1]:
        w, b = fit(norm(xtr[fit_idx]), ytr[fit_idx], l2)
        acc = scores(ytr[held], (norm(xtr[held]) @ w + b).argmax(1))["accuracy"]
        if best is None or acc > best[1]:
            best = (l2, acc)
    w, b = fit(norm(xtr), ytr, best[0])
    report = {
        "faces": {"train": len(ytr), "validation": len(yva),
                  "without_vector": miss_tr + miss_va},
        "l2": best[0],
        "fer_validation": scores(yva, (norm(xva) @ w + b).argmax(1)),
        "fer_validation_majority": scores(yva, np.full_like(yva, np.bincount(ytr).argmax())),
    }
    gold, pred, skipped = [], [], 0
    for line in open(os.path.join(a.proxy, "dev.jsonl")):
        for u in json.loads(line)["utterances"]:
            v = store.get(sha(u["image"])) if u.get("image") else None
            if v is None or u.get("label") not in LABELS:
                skipped += 1
                continue
            gold.append(LABELS.index(u["label"]))
            pred.append(int((norm(v[None]) @ w + b).argmax(1)[0]))
    report["proxy_dev_faces_only"] = scores(np.array(gold), np.array(pred))
    report["proxy_dev_faces_only"]["utterances"] = len(gold)
    report["proxy_dev_faces_only"]["skipped"] = skipped
    print(json.dumps(report, indent=1))
    if a.out:
        json.dump(report, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
