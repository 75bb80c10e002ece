"""Complexity scoring on generated arithmetic prompts: the trained logistic scorer against a length-only baseline.

The prompt set is made here, with known difficulty. Each prompt asks for the value of a random expression
tree: `num_ops` operations (1-8), operands of `digits` digits (1-6), every compound operand in parentheses,
so the nesting depth is the tree's height. Difficulty is `num_ops + 1.5 * depth + 0.75 * digits`; a prompt
is hard when its difficulty reaches `--hard-cut`, then `--label-noise` of the labels are flipped (graders err).

Two things make length a weak cue, as in real traffic: a random preamble of 0-600 characters (tutor
framing, a student's story) that says nothing about difficulty, and "explain step by step" appended to a
random 30% of prompts, a cue word the default prior counts as hard.

Scorers, all evaluated on the same held-out prompts in one run:

  length_only        router.complexity.LengthOnlyScorer: longer is harder (the baseline)
  logistic_prior     LogisticComplexityScorer with its fixed initial weights, untrained
  logistic_trained   the same model after SGD on the training split

Metrics: ROC AUC (router.complexity.roc_auc, rank-sum with mid-ranks), and `large_share_at_recall`: the
least share of traffic the large tier must take so that >= `--recall` of the hard prompts reach it (lower
is cheaper). Ratios compare each scorer with `length_only`. Finally a TierSelector with the trained scorer,
calibrated to the share the training split needed, routes the held-out stream: its achieved large share
and hard recall show the calibration carrying over to unseen traffic.

    python bench/complexity.py
    python bench/complexity.py --seed 7 --num-prompts 20000

stdout is exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from router.complexity import (  # noqa: E402
    ComplexityScorer,
    LengthOnlyScorer,
    LogisticComplexityScorer,
    TierGroup,
    TierSelector,
    TierSelectorConfig,
    complexity_features,
    large_share_for_recall,
    roc_auc,
)

_PREAMBLES = (
    "You are a patient math tutor helping a student with homework.",
    "My little brother asked me this at dinner and we could not agree on the answer.",
    "The following comes from a worksheet our teacher handed out on Monday, and the class is stuck on it.",
    "I am checking a spreadsheet formula by hand before sending the report to my manager this afternoon.",
    "Context: the numbers below came from a warehouse inventory count; nobody double-checked them.",
)
_ASKS = ("Compute {e}.", "What is {e}?", "Evaluate {e} and give the final number.", "Find the value of {e}.")


@dataclass(frozen=True)
class Prompt:
    text: str
    num_ops: int
    depth: int
    digits: int
    is_hard: bool


def _expression(rng: random.Random, num_ops: int, digits: int) -> tuple[str, int]:
    """A random expression tree with `num_ops` operators; returns its text and height (= paren nesting + 1)."""
    if num_ops == 0:
        return str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)), 0
    num_left = rng.randint(0, num_ops - 1)
    left, left_height = _expression(rng, num_left, digits)
    right, right_height = _expression(rng, num_ops - 1 - num_left, digits)
    left = f"({left})" if left_height else left
    right = f"({right})" if right_height else right
    return f"{left} {rng.choice('+-*/')} {right}", 1 + max(left_height, right_height)


def make_prompts(rng: random.Random, count: int, *, hard_cut: float, label_noise: float) -> list[Prompt]:
    prompts = []
    for _ in range(count):
        num_ops, digits = rng.randint(1, 8), rng.randint(1, 6)
        expression, height = _expression(rng, num_ops, digits)
        depth = height - 1
        difficulty = num_ops + 1.5 * depth + 0.75 * digits
        is_hard = (difficulty >= hard_cut) != (rng.random() < label_noise)
        preamble = " ".join(rng.sample(_PREAMBLES, rng.randint(0, len(_PREAMBLES))))
        text = f"{preamble} {rng.choice(_ASKS).format(e=expression)}".strip()
        if rng.random() < 0.3:
            text += " Explain step by step."
        prompts.append(Prompt(text=text, num_ops=num_ops, depth=depth, digits=digits, is_hard=is_hard))
    return prompts


def evaluate(scorer: ComplexityScorer, prompts: list[Prompt], recall: float) -> dict:
    scores = [scorer.score(p.text) for p in prompts]
    labels = [p.is_hard for p in prompts]
    return {
        "auc": round(roc_auc(scores, labels), 4),
        "large_share_at_recall": round(large_share_for_recall(scores, labels, recall), 4),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt set, the split and the training order")
    parser.add_argument("--num-prompts", type=int, default=8000, help="prompts generated in all (default 8000)")
    parser.add_argument("--train-fraction", type=float, default=0.6, help="share used for training (default 0.6)")
    parser.add_argument("--epochs", type=int, default=5, help="SGD passes over the training split (default 5)")
    parser.add_argument("--recall", type=float, default=0.95, help="hard prompts that must reach the large tier")
    parser.add_argument("--hard-cut", type=float, default=13.0, help="difficulty at which a prompt is hard")
    parser.add_argument("--label-noise", type=float, default=0.03, help="share of labels flipped (default 0.03)")
    args = parser.parse_args(argv)
    if args.num_prompts < 100 or not 0.1 <= args.train_fraction <= 0.9 or not 0 < args.recall <= 1:
        parser.error("need --num-prompts >= 100, --train-fraction in [0.1, 0.9] and --recall in (0, 1]")
    return args


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    rng = random.Random(args.seed)
    prompts = make_prompts(rng, args.num_prompts, hard_cut=args.hard_cut, label_noise=args.label_noise)
    num_train = int(len(prompts) * args.train_fraction)
    train, test = prompts[:num_train], prompts[num_train:]

    trained = LogisticComplexityScorer()
    trained.fit([(complexity_features(p.text), p.is_hard) for p in train], epochs=args.epochs, seed=args.seed)
    scorers: dict[str, ComplexityScorer] = {
        "length_only": LengthOnlyScorer(),
        "logistic_prior": LogisticComplexityScorer(),
        "logistic_trained": trained,
    }
    results = {name: evaluate(scorer, test, args.recall) for name, scorer in scorers.items()}
    base = results["length_only"]
    for result in results.values():
        result["auc_vs_length_only"] = round(result["auc"] / base["auc"], 3)
        result["large_share_vs_length_only"] = round(result["large_share_at_recall"] / base["large_share_at_recall"], 3)

    # Calibrate on what training needed, then route unseen traffic and see what share and recall come out.
    target = evaluate(trained, train, args.recall)["large_share_at_recall"]
    selector = TierSelector(
        TierGroup(small="arith-small", large="arith-large"),
        trained,
        TierSelectorConfig(target_large_share=target, window=len(train), min_samples=min(200, len(train))),
    )
    for i, p in enumerate(train):  # warm the calibration window without counting these decisions
        selector.select(f"warm{i}", p.text)
    decisions = [selector.select(f"test{i}", p.text) for i, p in enumerate(test)]
    num_hard = sum(p.is_hard for p in test)
    return {
        "benchmark": "complexity",
        "seed": args.seed,
        "num_train": len(train),
        "num_test": len(test),
        "hard_share_test": round(num_hard / len(test), 4),
        "recall_target": args.recall,
        "scorers": results,
        "tier_selector": {
            "scorer": "logistic_trained",
            "target_large_share": round(target, 4),
            "achieved_large_share": round(sum(d.tier == "large" for d in decisions) / len(test), 4),
            "hard_recall": round(
                sum(d.tier == "large" and p.is_hard for d, p in zip(decisions, test, strict=True)) / num_hard, 4
            ),
        },
        "trained_weights": {k: round(v, 3) for k, v in sorted(trained.weights.items())}
        | {"bias": round(trained.bias, 3)},
        "wall_s": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("router.complexity").setLevel(logging.WARNING)  # one log line per tier decision is noise here
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
