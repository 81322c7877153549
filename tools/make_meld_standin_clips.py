#!/usr/bin/env python3
"""Stand-in MELD clips: one small synthetic video per utterance, in MELD.Raw's layout
(train_splits/, dev_splits_complete/, output_repeated_splits_test/, each
dia{D}_utt{U}.mp4), for running `farcer prepare meld` + `train` + `eval` end to end on
machines without MELD's videos. Needs only python3 (stdlib) and ffmpeg.

The content carries no information about the emotion by default (a colour drawn from the
utterance's ids), so scores measure the plumbing, not vision. `--label-colour` makes the
colour follow the gold label instead: a deliberately leaky signal, to check that the
projection learns from images end to end. Clip lengths follow the CSV times (clamped to
0.2-3 s), so the "0.5 s or less" rule is exercised; `--broken N` writes N corrupt files to
exercise the unreadable-clip path.

    python3 tools/make_meld_standin_clips.py --csv-dir ../shared/data/meld --out /tmp/meld-raw --dialogues 40
"""
import argparse
import concurrent.futures as cf
import csv
import hashlib
import os
import subprocess

FOLDERS = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
LABEL_COLOURS = {"neutral": "0x969696", "joy": "0xf5d750", "surprise": "0x78c8eb", "anger": "0xcd3c32",
                 "sadness": "0x3c5096", "disgust": "0x78a046", "fear": "0x8250a0"}


def seconds(t):
    hms, _, frac = t.strip().replace(".", ",").partition(",")
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s + float("0." + (frac or "0"))


def rows(csv_dir, split, dialogues):
    with open(os.path.join(csv_dir, f"{split}_sent_emo.csv"), encoding="utf-8", newline="") as f:
        keep = []
        seen = []
        for r in csv.DictReader(f):
            d = int(r["Dialogue_ID"])
            if d not in seen:
                seen.append(d)
            if dialogues and len(seen) > dialogues:
                break
            keep.append(r)
        return keep


def make(job):
    path, colour, dur = job
    if os.path.exists(path):
        return "reused"
    tmp = path + ".tmp.mp4"
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
           f"color=c={colour}:s=160x120:d={dur:.2f}:r=10", "-c:v", "mpeg4", "-y", tmp]
    subprocess.run(cmd, check=True)
    os.replace(tmp, path)
    return "written"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--splits", default="train,dev,test")
    ap.add_argument("--dialogues", type=int, default=0, help="first N dialogues per split (0: all)")
    ap.add_argument("--label-colour", action="store_true")
    ap.add_argument("--broken", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    jobs = []
    for split in a.splits.split(","):
        folder = os.path.join(a.out, FOLDERS[split])
        os.makedirs(folder, exist_ok=True)
        for r in rows(a.csv_dir, split, a.dialogues):
            name = f"dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}.mp4"
            if a.label_colour:
                colour = LABEL_COLOURS[r["Emotion"].strip().lower()]
            else:
                colour = "0x" + hashlib.sha256(name.encode()).hexdigest()[:6]
            dur = min(3.0, max(0.2, seconds(r["EndTime"]) - seconds(r["StartTime"])))
            jobs.append((os.path.join(folder, name), colour, dur))
    with cf.ThreadPoolExecutor(a.jobs) as ex:
        done = list(ex.map(make, jobs))
    for path, _, _ in jobs[-a.broken:] if a.broken else []:
        with open(path, "wb") as f:
            f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    print(f"{len(jobs)} clips ({done.count('written')} written, {done.count('reused')} reused, "
          f"{a.broken} made unreadable) under {a.out}")


if __name__ == "__main__":
    main()
