#!/usr/bin/env python3
"""A MELD proxy with real faces: MELD's dialogues (text and labels) with a FER2013 face
for every utterance, written as farcer JSON lines (`jsonl:<out>`).

MELD's own video frames are not on these machines; FER2013 faces are
(../shared/data/faces-fer, see its SOURCE.md). Each utterance gets a face whose
expression is its gold label with probability --p (default 0.8) and a random label's
otherwise, so a model can learn from the faces but cannot trust them blindly. MELD's
train dialogues get faces from FER's `train/`, MELD's dev dialogues from `validation/`
(never mixed); dev is written as both `dev.jsonl` (validation) and `test.jsonl` (for
`farcer eval --split test`), since the proxy is scored on dev. Images are named by
absolute path, never copied. Standard library only.

    python3 tools/make_meld_faces_proxy.py --meld ../shared/data/meld \
        --faces ../shared/data/faces-fer --out data/meld-faces
    farcer train --config <cfg with data = "jsonl:data/meld-faces"> --out runs/x
"""
import argparse
import csv
import io
import json
import os
import random

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
FER = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "joy",
       "neutral": "neutral", "sad": "sadness", "surprise": "surprise"}


def read_text(path):
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def dialogues(path):
    """MELD CSV -> [(dialogue id, [utterance dicts])] in file order."""
    out, index = [], {}
    for row in csv.DictReader(io.StringIO(read_text(path))):
        d = row["Dialogue_ID"].strip()
        if d not in index:
            index[d] = len(out)
            out.append((d, []))
        out[index[d]][1].append({
            "id": row["Utterance_ID"].strip(),
            "speaker": row["Speaker"].strip(),
            "text": " ".join(row["Utterance"].split()),
            "label": row["Emotion"].strip().lower(),
        })
    return out


def faces(folder):
    """label -> sorted absolute image paths."""
    by = {}
    for name, label in FER.items():
        d = os.path.join(folder, name)
        by[label] = sorted(os.path.abspath(os.path.join(d, f)) for f in os.listdir(d)
                           if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if not by[label]:
            raise SystemExit(f"{d}: no images")
    return by


def attach(dials, pool, p, rng):
    shown = agree = 0
    for _, utts in dials:
        for u in utts:
            label = u["label"] if rng.random() < p else rng.choice(LABELS)
            u["image"] = rng.choice(pool[label])
            shown += 1
            agree += label == u["label"]
    return agree / max(shown, 1)


def write(path, dials):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for d, utts in dials:
            f.write(json.dumps({"id": d, "utterances": utts}, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meld", default="../shared/data/meld")
    ap.add_argument("--faces", default="../shared/data/faces-fer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--p", type=float, default=0.8, help="chance that a face shows the gold label")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not 0.0 <= a.p <= 1.0:
        raise SystemExit("--p must be in [0, 1]")
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    train = dialogues(os.path.join(a.meld, "train_sent_emo.csv"))
    dev = dialogues(os.path.join(a.meld, "dev_sent_emo.csv"))
    at = attach(train, faces(os.path.join(a.faces, "train")), a.p, rng)
    ad = attach(dev, faces(os.path.join(a.faces, "validation")), a.p, rng)
    write(os.path.join(a.out, "train.jsonl"), train)
    write(os.path.join(a.out, "dev.jsonl"), dev)
    write(os.path.join(a.out, "test.jsonl"), dev)
    with open(os.path.join(a.out, "labels.txt"), "w") as f:
        f.write("\n".join(LABELS) + "\n")
    print(f"{a.out}: {len(train)} train / {len(dev)} dev dialogues; faces agree with the gold "
          f"label for {100 * at:.1f}% / {100 * ad:.1f}% of utterances")


if __name__ == "__main__":
    main()
