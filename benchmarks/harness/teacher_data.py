"""Probe data shared by the teacher tests and benchmarks/teacher_concepts.py."""

from __future__ import annotations

TOPICS = {
    "animals": [
        "a dog barks at night",
        "the cat sleeps on the sofa",
        "a horse runs in the field",
        "birds fly south in winter",
        "the cow eats grass",
        "a rabbit hides in its burrow",
        "the lion hunts a zebra",
        "fish swim in the river",
        "an owl hoots in the dark",
        "the puppy chews a bone",
    ],
    "finance": [
        "the stock market fell sharply",
        "interest rates rose again",
        "she took out a bank loan",
        "bonds and equities rallied",
        "the company reported quarterly profits",
        "inflation hit savings",
        "investors sold their shares",
        "the central bank cut rates",
        "the fund lost money",
        "mortgage payments went up",
    ],
    "weather": [
        "heavy rain is expected today",
        "a sunny afternoon at the beach",
        "a snow storm hits tonight",
        "strong winds are blowing",
        "thunder and lightning overnight",
        "the forecast says fog",
        "a heat wave this week",
        "hail damaged the cars",
        "clouds gathered over the hills",
        "a cold front moves in",
    ],
}


def purity(assignment: list[int], truth: list[int]) -> float:
    """Fraction of points whose cluster's majority label is their own label."""
    total = 0
    for cluster in set(assignment):
        members = [t for a, t in zip(assignment, truth, strict=True) if a == cluster]
        total += max(members.count(t) for t in set(members))
    return total / len(truth)
