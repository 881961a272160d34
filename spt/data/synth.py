"""A seeded synthetic persona-chat generator: the embedded default data (no real corpus ships here).

Each speaker has 3-5 persona facts drawn from a bank of a few hundred facts over 12 topics, and a
latent speaking *style* (terse, enthusiastic, formal, casual). Styles correlate with persona
content: every topic has a preferred style and a speaker mostly takes the preferred style of its
dominant topic. Responses answer the partner's question with the responder's matching persona fact,
worded in the responder's style. So which soft prompt suits an example (its style) is predictable
from the persona and context: prompt selection is a learnable, measurable problem.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .example import Example

STYLES = ("terse", "enthusiastic", "formal", "casual")

# topic -> (preferred style, [(fact template, fillers)], questions about the topic)
_Facts = list[tuple[str, list[str]]]
_PETS = ["dog", "cat", "parrot", "hamster", "rabbit", "turtle", "horse", "snake", "goldfish", "lizard",
         "ferret", "pig"]
_PLACES = ["japan", "italy", "mexico", "iceland", "brazil", "egypt", "canada", "thailand", "peru", "kenya",
           "norway", "india", "greece", "vietnam"]
_TOPICS: dict[str, tuple[str, _Facts, list[str]]] = {
    "pets": ("terse", [("i have a {}.", _PETS), ("my {} is my best friend.", _PETS),
                       ("i want to adopt a {}.", _PETS), ("i am allergic to my neighbor's {}.", _PETS)],
             ["do you have any pets ?", "are you an animal person ?"]),
    "family": ("terse", [("i have {}.", ["two sisters", "three brothers", "twin boys", "a baby daughter",
                                         "a big family", "four cousins", "an older brother", "a stepdad"]),
                         ("i live with {}.", ["my grandmother", "my parents", "my aunt", "my husband",
                                              "my wife", "my best friend", "my mom", "my roommates"])],
               ["tell me about your family .", "do you have kids or siblings ?"]),
    "home": ("terse", [("i live in {}.", ["a small town", "a big city", "an apartment downtown",
                                          "a cabin in the woods", "a house by the beach", "a tiny studio"]),
                       ("i grew up on {}.", ["a farm", "an island", "a ranch", "a military base"]),
                       ("i just moved to {}.", ["texas", "ohio", "oregon", "florida", "alaska", "maine"])],
             ["where do you live ?", "where are you from ?"]),
    "sports": ("enthusiastic", [("i play {} every weekend.", ["soccer", "basketball", "tennis", "volleyball",
                                                              "baseball", "hockey", "golf", "rugby"]),
                                ("my favorite team plays {}.", ["football", "baseball", "basketball", "hockey"]),
                                ("i coach a {} team.", ["soccer", "swim", "track", "softball"])],
               ["do you play any sports ?", "what sport do you like ?"]),
    "outdoors": ("enthusiastic", [("i love {}.", ["hiking", "camping", "surfing", "fishing", "rock climbing",
                                                  "skiing", "kayaking", "cycling"]),
                                  ("i go {} whenever i can.", ["hiking", "camping", "surfing", "fishing",
                                                               "sailing", "hunting"]),
                                  ("i own a {}.", ["canoe", "tent", "mountain bike", "snowboard", "sailboat",
                                                   "telescope"])],
                 ["do you like the outdoors ?", "what do you do outside ?"]),
    "travel": ("enthusiastic", [("i have been to {}.", _PLACES), ("i dream of visiting {}.", _PLACES),
                                ("my favorite trip was to {}.", _PLACES)],
               ["do you like to travel ?", "where have you traveled ?"]),
    "work": ("formal", [("i work as {}.", ["a nurse", "a lawyer", "an accountant", "a teacher", "an engineer",
                                           "a banker", "a pilot", "a librarian"]),
                        ("i used to be {}.", ["a chef", "a soldier", "a mail carrier", "a professor"]),
                        ("i am training to be {}.", ["a doctor", "a pharmacist", "an architect", "a judge"])],
             ["what do you do for a living ?", "what is your job ?"]),
    "books": ("formal", [("i enjoy reading {}.", ["history", "poetry", "mystery novels", "philosophy",
                                                  "science fiction", "biographies", "classic literature"]),
                         ("i am writing a book about {}.", ["economics", "my grandfather", "ancient rome",
                                                             "gardening"])],
              ["do you like to read ?", "what are you reading lately ?"]),
    "tech": ("formal", [("i build {}.", ["computers", "robots", "websites", "mobile apps"]),
                        ("i am learning {}.", ["programming", "electronics", "databases", "statistics"]),
                        ("i spend my evenings on {}.", ["open source software", "my home server",
                                                        "a chess engine", "online courses"])],
             ["are you into technology ?", "what do you do with computers ?"]),
    "music": ("casual", [("i play the {}.", ["guitar", "drums", "piano", "violin", "bass", "trumpet"]),
                         ("i listen to {} all day.", ["rap", "jazz", "country", "punk", "metal", "pop"]),
                         ("i sing in a {} band.", ["rock", "church", "wedding", "garage"])],
              ["what music do you like ?", "do you play an instrument ?"]),
    "food": ("casual", [("i love eating {}.", ["pizza", "tacos", "sushi", "burgers", "pancakes", "ice cream"]),
                        ("i cook {} on weekends.", ["pasta", "curry", "barbecue", "soup"]),
                        ("i can not stand {}.", ["spicy food", "mushrooms", "olives", "seafood"])],
             ["what is your favorite food ?", "do you like to cook ?"]),
    "hobbies": ("casual", [("i collect {}.", ["comic books", "old coins", "sneakers", "vinyl records"]),
                           ("i spend hours on {}.", ["video games", "knitting", "painting", "board games"]),
                           ("my hobby is {}.", ["photography", "gardening", "woodworking", "baking"])],
                ["what do you do for fun ?", "any hobbies ?"]),
}

# style -> (openers, answer body with {} for the fact clause, closers, greetings)
_STYLE_TEXT: dict[str, tuple[list[str], list[str], list[str], list[str]]] = {
    "terse": (["", "yes .", "well .", "ok ."], ["{} ."], ["", "", "you ?"], ["hi .", "hello ."]),
    "enthusiastic": (["oh wow !", "great question !", "yay !", "omg !"], ["{} !", "{} ! ! !"],
                     ["i absolutely love it !", "it is the best thing ever !", "so much fun !"],
                     ["hi there ! ! how are you doing today ?", "hello friend ! what a great day !"]),
    "formal": (["good question .", "indeed .", "certainly ."], ["i must say that {} .", "i would say {} ."],
               ["and yourself ?", "may i ask about you ?", "it is quite rewarding ."],
               ["good evening . how do you do ?", "greetings . it is a pleasure to meet you ."]),
    "casual": (["haha", "lol yeah", "ya", "hmm"], ["{} lol", "{} tbh", "{} haha"],
               ["wbu ?", "what about you ?", "kinda cool i guess"], ["hey whats up", "yo how is it going"]),
}

FACTS: list[tuple[str, str]] = [
    (template.format(filler), topic)
    for topic, (_, facts, _) in _TOPICS.items()
    for template, fillers in facts for filler in fillers
]
_FACTS_BY_TOPIC: dict[str, list[str]] = {t: [f for f, ft in FACTS if ft == t] for t in _TOPICS}


@dataclass(frozen=True)
class Speaker:
    persona: tuple[str, ...]
    topics: tuple[str, ...]
    style: str


def sample_speaker(rng: random.Random, style_consistency: float = 0.8, clear_majority: bool = False) -> Speaker:
    """3-5 facts of distinct topics; the style follows the dominant topic with prob ``style_consistency``
    (0: a style drawn independently of the persona).

    ``clear_majority``: draw the style first and then a strict majority of the topics from that style's
    topics, so the persona decides the style without ties (the demo's tuning data)."""
    n = rng.randint(3, 5)
    if clear_majority:
        target = rng.choice(STYLES)
        own = [t for t in _TOPICS if _TOPICS[t][0] == target]
        others = [t for t in _TOPICS if _TOPICS[t][0] != target]
        topics = rng.sample(own, min(len(own), n // 2 + 1))
        topics += rng.sample(others, n - len(topics))
        rng.shuffle(topics)
    else:
        topics = rng.sample(list(_TOPICS), n)
    facts = [rng.choice(_FACTS_BY_TOPIC[topic]) for topic in topics]
    dominant = Counter(_TOPICS[t][0] for t in topics).most_common(1)[0][0]
    style = dominant if rng.random() < style_consistency else rng.choice(STYLES)
    return Speaker(tuple(facts), tuple(topics), style)


def _say(rng: random.Random, speaker: Speaker, topic: str | None) -> str:
    """An answer about ``topic`` in the speaker's style, using the matching persona fact if any."""
    openers, bodies, closers, _ = _STYLE_TEXT[speaker.style]
    if topic in speaker.topics:
        fact = speaker.persona[speaker.topics.index(topic)]
        prefix = ""
    else:
        fact = rng.choice(speaker.persona)
        prefix = "not really , but" if speaker.style != "terse" else "no ."
    clause = fact.rstrip(".")
    parts = [rng.choice(openers), prefix, rng.choice(bodies).format(clause), rng.choice(closers)]
    return " ".join(p for p in parts if p)


def _ask(rng: random.Random, asker: Speaker, other: Speaker) -> tuple[str, str]:
    """A question on a topic of the other speaker's persona (mostly) or any topic: (text, topic)."""
    topic = rng.choice(other.topics) if rng.random() < 0.7 else rng.choice(list(_TOPICS))
    return rng.choice(_TOPICS[topic][2]), topic


def synth_dialogue(rng: random.Random, index: int, min_turns: int = 6, max_turns: int = 10,
                   style_consistency: float = 0.8, clear_majority: bool = False) -> list[Example]:
    """One dialogue between two speakers; every turn after the first is an example for its speaker."""
    speakers = (sample_speaker(rng, style_consistency, clear_majority),
                sample_speaker(rng, style_consistency, clear_majority))
    question, topic = _ask(rng, speakers[0], speakers[1])
    turns = [f"{rng.choice(_STYLE_TEXT[speakers[0].style][3])} {question}"]
    for i in range(1, rng.randint(min_turns, max_turns)):
        me, other = speakers[i % 2], speakers[(i + 1) % 2]
        answer = _say(rng, me, topic)
        question, topic = _ask(rng, me, other)
        turns.append(f"{answer} {question}")
    return [
        Example(
            persona=speakers[i % 2].persona, context=tuple(turns[:i]), response=turns[i],
            dialogue_id=f"synth:{index}", turn=i, source="synthetic",
            partner_persona=speakers[(i + 1) % 2].persona, style=speakers[i % 2].style,
        )
        for i in range(1, len(turns))
    ]


def synth_examples(n_dialogues: int, seed: int = 0, style_consistency: float = 0.8,
                   clear_majority: bool = False) -> list[Example]:
    """``n_dialogues`` dialogues' examples, deterministic under ``seed`` (styles: see ``sample_speaker``)."""
    if n_dialogues < 1:
        raise ValueError(f"n_dialogues must be >= 1, got {n_dialogues}")
    if not 0.0 <= style_consistency <= 1.0:
        raise ValueError(f"style_consistency must be in [0, 1], got {style_consistency}")
    rng = random.Random(seed)
    return [ex for i in range(n_dialogues)
            for ex in synth_dialogue(rng, i, style_consistency=style_consistency, clear_majority=clear_majority)]
