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

# A second concept set from the same teacher (alignment reuse), and public unlabelled sentences that both
# models embed as anchors: none of them is any concept's labelled example.
OTHER_TOPICS = {
    "sports": [
        "the striker scored a late goal",
        "the tennis final went to five sets",
        "she won the marathon in record time",
        "the team lost the basketball game",
        "a cyclist crashed in the sprint",
        "the referee showed a red card",
    ],
    "food": [
        "a bowl of tomato soup with bread",
        "bake the cake for forty minutes",
        "fresh pasta with garlic and basil",
        "he grilled the chicken on the barbecue",
        "a spicy curry with rice",
        "the chef chopped the onions",
    ],
    "music": [
        "the orchestra played a symphony",
        "she sang the chorus twice",
        "a guitar solo ended the song",
        "the band released a new album",
        "the pianist practised scales",
        "drums and bass filled the club",
    ],
}

PUBLIC_TEXTS = [
    "a squirrel climbs the oak tree",
    "the farmer feeds the pigs",
    "wolves howl in the forest",
    "a snake slides across the sand",
    "the price of gold went up",
    "the bank raised its fees",
    "he paid the tax bill late",
    "the currency lost value",
    "it will be windy and wet tomorrow",
    "the river froze in the cold",
    "a rainbow after the shower",
    "the temperature dropped below zero",
    "the goalkeeper saved a penalty",
    "runners warmed up before the race",
    "a sandwich with cheese and ham",
    "the soup needs more salt",
    "a violin concert in the hall",
    "the singer toured europe",
    "the train arrived on time",
    "she painted the kitchen walls",
    "the library opens at nine",
    "he fixed the broken chair",
    "the children played in the park",
    "a letter arrived this morning",
]


def purity(assignment: list[int], truth: list[int]) -> float:
    """Fraction of points whose cluster's majority label is their own label."""
    total = 0
    for cluster in set(assignment):
        members = [t for a, t in zip(assignment, truth, strict=True) if a == cluster]
        total += max(members.count(t) for t in set(members))
    return total / len(truth)
