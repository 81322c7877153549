#!/usr/bin/env python3
"""Writes a small IEMOCAP-shaped corpus under tests/fixtures/iemocap/ (the corpus itself is
licensed and not on our machines). Same layout and line formats as the release:

  Session{N}/dialog/transcriptions/{dialog}.txt   "Ses01F_impro01_F000 [006.2901-008.2357]: text"
  Session{N}/dialog/EmoEvaluation/{dialog}.txt    "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]"
                                                  followed by "C-E2:\tNeutral;\t()" annotator lines

with the quirks farcer must handle: non-turn lines ("M: [BREATHING]"), unannotated turns
(`...MXX0`), `xxx` turns, labels outside the six targets (sur, fea, oth), lines out of
time order. Deterministic: python3 tools/make_iemocap_fixture.py
"""
import os
import random

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "iemocap")
CODES = ["neu", "fru", "ang", "sad", "exc", "hap", "sur", "fea", "oth", "xxx"]
NAMES = {"neu": "Neutral", "fru": "Frustration", "ang": "Anger", "sad": "Sadness", "exc": "Excited",
         "hap": "Happiness", "sur": "Surprise", "fea": "Fear", "oth": "Other", "dis": "Disgust"}
LINES = ["Excuse me.", "Do you have your forms?", "Yeah.", "Let me see them.", "Is there a problem?",
         "Who told you to get in this line?", "You did.", "I'm sorry, you need a different form.",
         "This is ridiculous.", "I've been waiting an hour.", "Okay, fine.", "Thank you so much!",
         "That's wonderful news.", "I can't believe it.", "Whatever."]


def main():
    rng = random.Random(1)
    dialogs = [(1, "Ses01F_impro01", 24), (1, "Ses01M_script01_1", 13), (2, "Ses02F_impro02", 30),
               (2, "Ses02M_impro03", 9), (3, "Ses03F_script02_2", 17), (5, "Ses05F_impro01", 28),
               (5, "Ses05M_script01_1b", 15)]
    for session, name, n in dialogs:
        base = os.path.join(ROOT, f"Session{session}", "dialog")
        os.makedirs(os.path.join(base, "transcriptions"), exist_ok=True)
        os.makedirs(os.path.join(base, "EmoEvaluation"), exist_ok=True)
        t = 1.0
        trans, evals = [], ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        counters = {"F": 0, "M": 0}
        for i in range(n):
            spk = "F" if i % 2 == 0 else "M"
            dur = round(rng.uniform(0.8, 4.0), 4)
            start, end = t, t + dur
            t = end + round(rng.uniform(0.1, 1.0), 4)
            if i == 3:  # an unannotated turn: in the transcript, not in the evaluation
                trans.append(f"{name}_{spk}XX0 [{start:08.4f}-{end:08.4f}]: [LAUGHTER] {rng.choice(LINES)}")
                continue
            tid = f"{name}_{spk}{counters[spk]:03d}"
            counters[spk] += 1
            trans.append(f"{tid} [{start:08.4f}-{end:08.4f}]: {rng.choice(LINES)}")
            code = rng.choice(CODES)
            evals.append(f"[{start:.4f} - {end:.4f}]\t{tid}\t{code}\t[2.5000, 3.0000, 2.5000]")
            if code == "xxx":
                votes = rng.sample(["fru", "ang", "neu", "sad"], 3)
            else:
                votes = [code, code, rng.choice(["neu", code, "fru"])]
            for k, v in enumerate(votes):
                extra = "; Anger" if (code == "xxx" and k == 0) else ""
                evals.append(f"C-E{k + 1}:\t{NAMES[v]};{extra}\t()")
            evals.append(f"C-{spk}{session}:\t{NAMES[votes[0]]};\t(self)")
            evals.append(f"A-E1:\tval 3; act 3; dom  3;\t()")
            evals.append("")
            if i == 5:
                trans.append("M: [BREATHING]")
        trans[1], trans[2] = trans[2], trans[1]  # out of time order, as some files are
        with open(os.path.join(base, "transcriptions", f"{name}.txt"), "w") as f:
            f.write("\n".join(trans) + "\n")
        with open(os.path.join(base, "EmoEvaluation", f"{name}.txt"), "w") as f:
            f.write("\n".join(evals) + "\n")
    print("wrote", ROOT)


if __name__ == "__main__":
    main()
