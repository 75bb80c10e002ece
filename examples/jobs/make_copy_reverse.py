"""Write examples/jobs/copy_reverse.jsonl: prompt/completion pairs of a copy-or-reverse task a tiny model can learn.

Each prompt asks to copy or to reverse a few words from the tiny models' tokenizer corpus (most are one token);
the completion is the answer. Deterministic: `python examples/jobs/make_copy_reverse.py` rewrites the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

_WORD_TEXT = (
    "river mountain city light dark morning evening weather rain sun cloud wind story book write read learn teach "
    "think make build run walk happy sad strong gentle bright quiet loud fast slow new old first last good great "
    "little long high small large quick brown fox lazy dog"
)
WORDS = tuple(_WORD_TEXT.split())


def examples(num_examples: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(num_examples):
        words = rng.sample(WORDS, k=rng.randint(3, 6))
        task = rng.choice(("copy", "reverse"))
        answer = words if task == "copy" else words[::-1]
        out.append({"prompt": f"{task}: {' '.join(words)}\n", "completion": " ".join(answer)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("copy_reverse.jsonl"))
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = [json.dumps(e) for e in examples(args.num_examples, args.seed)]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
