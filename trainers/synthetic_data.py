"""Embedded synthetic data: a small story world and fact-recall conversations in it.

This is the default data set of every curriculum stage, so the whole curriculum runs without
network access and memory use is *measurable*: conversations plant facts in some turns and ask
for them ``1..max_recall_distance`` turns later, with unrelated filler turns in between.

The world
---------
:class:`SyntheticWorld` holds the entity pools. They are built combinatorially from short word
lists written here (syllables for person names, prefix + suffix for town names, adjective + noun
for spots, material + item for objects), so guessing a planted fact without memory is hopeless
(several hundred candidates per slot), while the vocabulary stays small (about 1,200 distinct
words, see :func:`vocabulary`) so a 2-core CPU can learn it.

The pools are the *same for every seed* (so data generated with different seeds share one
vocabulary and a model trained on seed 0 can be evaluated on seed 1); the seed only drives the
random choices.

Conversations
-------------
A conversation is a list of interactions ``{"query", "answer", "recall_distance", "fact_key",
"answer_keywords", "turn_type"}``:

- ``turn_type == "plant"``: the query states a fact ("I put the brass lantern in the old mill.")
  and the answer is an acknowledgement that never repeats the fact ("Okay, I will remember
  that."), so a later recall really needs the memory of the *query*. ``fact_key`` names the fact,
  ``recall_distance`` is 0.
- ``turn_type == "recall"``: the query asks for a fact planted ``recall_distance`` turns earlier
  ("Where did I put the brass lantern?") and the answer contains it ("You put the brass lantern
  in the old mill."). ``answer_keywords`` are the exact words to score (here ``["old", "mill"]``);
  they appear in the planting query and in the answer, never in the recall query.
- ``turn_type == "filler"``: small talk, arithmetic or world knowledge that needs no memory.
  Some planted facts are never asked for (distractors).

Fact kinds (``fact_key`` prefix): ``put`` (where), ``lives`` (where a friend lives), ``called``
(who: a relative's name), ``gift`` (what someone gave me), ``paint`` (which colour),
``count`` (how many).

Data set kinds (:func:`build_synthetic_dataset`), in the columns of the public RxT data sets:

- ``"pretraining"``: ``text`` (short stories about the same entities + conversations as text);
- ``"interaction-sft"``: ``query``, ``answer`` (one row per interaction);
- ``"multi-turn"``: ``query``, ``answer`` (first interaction), ``interactions`` (the following
  ``[{query, answer}]``), plus ``recall_distance`` and ``answer_keywords`` (one entry per
  follow-up), ``fact_keys`` (one per turn, the first included: the ``fact_key`` a turn plants or
  asks for, ``""`` for small talk; :func:`~rxt_hf.trainers.evaluation.evaluate_memory` splits recall by
  fact kind and by whether another fact of the kind came before) and ``conversation_id``.

Splits are made by conversation before flattening, so train / validation / test share no
conversation. Everything is deterministic in the seed (Python's ``random.Random`` with integer
seeds, independent of ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

__all__ = [
    "SyntheticWorld",
    "generate_conversations",
    "build_synthetic_dataset",
    "conversation_to_text",
    "story_for_conversation",
    "vocabulary",
    "DATASET_KINDS",
    "FACT_KINDS",
]

DATASET_KINDS = ("pretraining", "interaction-sft", "multi-turn")
FACT_KINDS = ("put", "lives", "called", "gift", "paint", "count")

# --------------------------------------------------------------------------------------------
# Word lists (written for this project)
# --------------------------------------------------------------------------------------------

_NAME_HEADS = (
    "Ta", "Ori", "Bel", "Ca", "Da", "El", "Fen", "Ga", "Hal", "Iso", "Ja", "Ka",
    "Li", "Mar", "Ne", "Os", "Pe", "Ro", "Sa", "Te", "Ul", "Va", "Wy", "Ze",
)
_NAME_TAILS = (
    "lia", "n", "ra", "mo", "dric", "sa", "ton", "vi", "na", "rek", "lo", "bel",
    "mir", "da", "ric", "ssa", "ven", "thy",
)
_TOWN_HEADS = (
    "Grey", "Oak", "Stone", "Ash", "Raven", "Wolf", "Elder", "Thorn", "Frost", "Birch",
    "Cold", "Deep", "Fair", "High", "Long", "Salt", "Elm", "Fox", "Hazel", "Kings",
)
_TOWN_TAILS = (
    "water", "ford", "bridge", "field", "haven", "wick", "dale", "moor", "brook", "stead",
    "holm", "mouth", "port", "ton",
)
_SPOT_ADJECTIVES = (
    "old", "small", "quiet", "broken", "narrow", "empty", "tall", "hidden", "dusty",
    "cold", "warm", "low", "upper", "new", "far",
)
_SPOT_NOUNS = (
    "mill", "barn", "cellar", "attic", "shed", "kitchen", "garden", "tower", "chapel",
    "bakery", "library", "cabin", "stable", "workshop", "boathouse", "pantry",
)
_MATERIALS = (
    "brass", "copper", "wooden", "glass", "iron", "leather", "woollen", "clay",
    "paper", "stone", "tin", "velvet",
)
_ITEMS = (
    "lantern", "key", "compass", "spoon", "whistle", "box", "bell", "cup", "ring",
    "kettle", "mirror", "clock", "flute", "map", "comb", "jar", "hat", "scarf",
)
_PAINTABLES = (
    "fence", "door", "bicycle", "boat", "cart", "gate", "bench", "shutters", "chair",
    "table", "wagon", "canoe", "kite", "sledge", "mailbox", "birdhouse", "doghouse",
    "wardrobe", "bookcase", "dresser", "stool", "cupboard", "trunk", "rowboat", "porch",
    "wheelbarrow", "tractor", "letterbox", "shelf", "desk",
)
_COUNTABLES = (
    "marbles", "apples", "coins", "stamps", "books", "candles", "pencils", "buttons",
    "shells", "feathers", "pebbles", "letters", "chickens", "goats", "sheep", "plums",
    "pears", "cards", "ribbons", "nails", "rabbits", "ducks", "jars", "eggs", "socks",
    "paintings", "puzzles", "postcards", "beads", "acorns",
)
_COLOURS = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black",
    "white", "grey", "crimson", "violet", "teal", "indigo", "scarlet", "olive", "cyan",
    "beige", "maroon",
)
_ROLES = (
    "sister", "brother", "cousin", "neighbour", "teacher", "doctor", "boss", "uncle",
    "aunt", "grandmother", "grandfather", "landlord", "dentist", "tailor", "baker",
    "captain", "coach", "nephew", "niece", "partner",
)

# Acknowledgements of planting turns: they never repeat the fact.
_ACKNOWLEDGEMENTS = (
    "Okay, I will remember that.",
    "Got it, I will keep that in mind.",
    "Thanks for telling me.",
    "Noted, I will remember it.",
    "Alright, I have made a note of that.",
    "Understood, I will not forget.",
)

# Memory-free world knowledge (query, answer).
WORLD_QA = (
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What colour is fresh grass?", "Fresh grass is green."),
    ("What colour is snow?", "Snow is white."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("What do bees make?", "Bees make honey."),
    ("What do cows give us?", "Cows give us milk."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("Where does the sun set?", "The sun sets in the west."),
    ("What do we use an umbrella for?", "We use an umbrella to stay dry in the rain."),
    ("What falls from clouds?", "Rain falls from clouds."),
    ("What is ice made of?", "Ice is frozen water."),
    ("Which animal says moo?", "A cow says moo."),
    ("Which animal says woof?", "A dog says woof."),
    ("What do fish live in?", "Fish live in water."),
    ("What do we call a baby cat?", "A baby cat is called a kitten."),
    ("What do we call a baby dog?", "A baby dog is called a puppy."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("What season comes after summer?", "Autumn comes after summer."),
    ("What do plants need to grow?", "Plants need water and light to grow."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What do we read?", "We read books and letters."),
    ("What shape is a wheel?", "A wheel is round."),
    ("When do owls hunt?", "Owls hunt at night."),
    ("What do birds use to fly?", "Birds use their wings to fly."),
)
_SMALL_TALK = (
    ("Hello, how are you today?", "I am fine, thank you. How can I help?"),
    ("Good morning!", "Good morning to you too."),
    ("Can you help me with something?", "Of course, I am happy to help."),
    ("Thank you for your help.", "You are welcome."),
    ("Tell me something nice.", "Every day is a good day to learn something new."),
    ("I am a bit tired today.", "Then take a short rest, it will help."),
    ("The weather is lovely today.", "That is good to hear."),
    ("Do you like stories?", "Yes, I like stories very much."),
    ("What is your favourite time of day?", "I like the quiet of the early morning."),
    ("Let us talk for a while.", "Sure, I am listening."),
    ("I just had a cup of tea.", "A cup of tea is a nice break."),
    ("I went for a walk this morning.", "A walk is a good way to start the day."),
)

# Templates. {x} fields are filled from the fact; every template of a kind uses the same
# fields. Plant templates: first person statements. Ask / reply: the recall pair.
_PLANT_TEMPLATES = {
    "put": (
        "I put the {object} in the {spot}.",
        "I left the {object} in the {spot}.",
        "Today I hid the {object} in the {spot}.",
    ),
    "lives": (
        "My friend {name} lives in {town}.",
        "My friend {name} lives in the town of {town}.",
        "You should know that my friend {name} lives in {town}.",
    ),
    "called": (
        "My {role} is called {name}.",
        "The name of my {role} is {name}.",
        "I should tell you that my {role} is called {name}.",
    ),
    "gift": (
        "My friend {name} gave me a {object}.",
        "Yesterday {name} gave me a {object}.",
        "{name} gave me a {object} as a present.",
    ),
    "paint": (
        "I painted my {thing} {colour}.",
        "Last week I painted my {thing} {colour}.",
        "My {thing} is now painted {colour}.",
    ),
    "count": (
        "I have {number} {countable}.",
        "Right now I have {number} {countable}.",
        "I counted them, I have {number} {countable}.",
    ),
}
_ASK_TEMPLATES = {
    "put": ("Where did I put the {object}?", "Do you remember where the {object} is?"),
    "lives": ("Where does my friend {name} live?", "In which town does {name} live?"),
    "called": ("What is my {role} called?", "What is the name of my {role}?"),
    "gift": ("What did {name} give me?", "Do you remember what {name} gave me?"),
    "paint": ("What colour did I paint my {thing}?", "What colour is my {thing} now?"),
    "count": ("How many {countable} do I have?", "Do you remember how many {countable} I have?"),
}
_REPLY_TEMPLATES = {
    "put": "You put the {object} in the {spot}.",
    "lives": "{name} lives in {town}.",
    "called": "Your {role} is called {name}.",
    "gift": "{name} gave you a {object}.",
    "paint": "You painted your {thing} {colour}.",
    "count": "You have {number} {countable}.",
}

_WORD_RE = re.compile(r"[A-Za-z0-9]+")


def _words(text: str) -> list[str]:
    """Split text into the words used for keyword scoring (letters and digits)."""
    return _WORD_RE.findall(text)


# --------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------


class SyntheticWorld:
    """The entity pools of the synthetic story world.

    Attributes (all sorted-deterministic lists of strings):

    - ``names`` (431 person names, e.g. ``"Talia"``), ``places`` (280 towns, e.g.
      ``"Greywater"``), ``spots`` (240 places to put things, e.g. ``"old mill"``),
      ``objects`` (216, e.g. ``"brass lantern"``), ``paintables`` (30), ``countables`` (30,
      plural), ``colours`` (20), ``roles`` (20), ``numbers`` (``2..99`` as ``int``).

    The pools do not depend on ``seed`` (shared vocabulary across seeds); ``seed`` seeds
    ``self.rng``, used by :meth:`sample_fact` callers that do not pass their own generator.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.rng = random.Random(self.seed)
        reserved = {w.lower() for w in _template_words()}
        names = []
        for head in _NAME_HEADS:
            for tail in _NAME_TAILS:
                name = head + tail
                if name.lower() not in reserved and name not in names:
                    names.append(name)
        self.names: list[str] = names
        self.places: list[str] = [h + t for h in _TOWN_HEADS for t in _TOWN_TAILS]
        self.towns = self.places
        self.spots: list[str] = [f"{a} {n}" for a in _SPOT_ADJECTIVES for n in _SPOT_NOUNS]
        self.objects: list[str] = [f"{m} {i}" for m in _MATERIALS for i in _ITEMS]
        self.paintables: list[str] = list(_PAINTABLES)
        self.countables: list[str] = list(_COUNTABLES)
        self.colours: list[str] = list(_COLOURS)
        self.roles: list[str] = list(_ROLES)
        self.numbers: list[int] = list(range(2, 100))

    # ---------------------------------------------------------------- facts
    def sample_fact(self, rng: random.Random | None = None, exclude_keys: Iterable[str] = (),
                    kind: str | None = None) -> dict:
        """Sample one fact whose ``key`` is not in ``exclude_keys``.

        Returns ``{"kind", "key", "slots": {field: value}, "keywords": [...]}``; ``keywords`` are
        the words a recall answer must contain (the remembered value, never the question's
        subject).
        """
        rng = rng or self.rng
        exclude = set(exclude_keys)
        for _ in range(100):
            k = kind or rng.choice(FACT_KINDS)
            if k == "put":
                obj, spot = rng.choice(self.objects), rng.choice(self.spots)
                key, slots, kw = f"put:{obj}", {"object": obj, "spot": spot}, spot.split()
            elif k == "lives":
                name, town = rng.choice(self.names), rng.choice(self.places)
                key, slots, kw = f"lives:{name}", {"name": name, "town": town}, [town]
            elif k == "called":
                role, name = rng.choice(self.roles), rng.choice(self.names)
                key, slots, kw = f"called:{role}", {"role": role, "name": name}, [name]
            elif k == "gift":
                name, obj = rng.choice(self.names), rng.choice(self.objects)
                key, slots, kw = f"gift:{name}", {"name": name, "object": obj}, obj.split()
            elif k == "paint":
                thing, colour = rng.choice(self.paintables), rng.choice(self.colours)
                key, slots, kw = f"paint:{thing}", {"thing": thing, "colour": colour}, [colour]
            elif k == "count":
                countable, number = rng.choice(self.countables), rng.choice(self.numbers)
                key = f"count:{countable}"
                slots, kw = {"countable": countable, "number": str(number)}, [str(number)]
            else:
                raise ValueError(f"kind={kind!r} is not a fact kind; use one of {FACT_KINDS}.")
            if key not in exclude:
                return {"kind": k, "key": key, "slots": slots, "keywords": kw}
        raise RuntimeError("could not sample a fact with a new key (too many exclusions)")

    def filler(self, rng: random.Random | None = None) -> tuple[str, str]:
        """One memory-free (query, answer): world knowledge, arithmetic or small talk."""
        rng = rng or self.rng
        r = rng.random()
        if r < 0.45:
            return rng.choice(WORLD_QA)
        if r < 0.7:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        return rng.choice(_SMALL_TALK)


def _template_words() -> set[str]:
    """Every word of the fixed templates (used to keep person names distinct from them)."""
    texts: list[str] = list(_ACKNOWLEDGEMENTS)
    for qa in (*WORLD_QA, *_SMALL_TALK):
        texts.extend(qa)
    for group in (_PLANT_TEMPLATES, _ASK_TEMPLATES):
        for ts in group.values():
            texts.extend(ts)
    texts.extend(_REPLY_TEMPLATES.values())
    texts.extend(_STORY_OPENINGS + _STORY_CLOSINGS + tuple(_STORY_FACTS.values()))
    words = set()
    for t in texts:
        words.update(_words(re.sub(r"\{[a-z]+\}", " ", t)))
    for pool in (_SPOT_ADJECTIVES, _SPOT_NOUNS, _MATERIALS, _ITEMS, _PAINTABLES, _COUNTABLES,
                 _COLOURS, _ROLES):
        words.update(pool)
    return words


# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------


def _plan_turns(rng: random.Random, n: int, max_d: int) -> list[tuple[int, int]]:
    """Choose (plant_turn, distance) pairs on ``n`` turns, no turn used twice.

    The distance is drawn uniformly from ``1..min(max_d, n-1)`` and then a free plant position
    is drawn, so distances cover the whole range; at least one pair is always placed (for
    ``n == 2`` the conversation is exactly one plant + one recall at distance 1).
    """
    if n < 2:
        return []
    free = [True] * n
    pairs: list[tuple[int, int]] = []
    target = rng.randint(1, max(1, n // 2))
    hi = min(max_d, n - 1)
    for _ in range(8 * n):
        if len(pairs) >= target:
            break
        d = rng.randint(1, hi)
        cands = [i for i in range(n - d) if free[i] and free[i + d]]
        if not cands:
            continue
        i = rng.choice(cands)
        free[i] = free[i + d] = False
        pairs.append((i, d))
    if not pairs:  # pragma: no cover - always placeable with n >= 2, kept as a guard
        pairs.append((0, 1))
    return pairs


def _fill(template: str, slots: dict) -> str:
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def _make_conversation(world: SyntheticWorld, rng: random.Random, n: int, max_d: int,
                       distractor_prob: float = 0.15, same_kind_prob: float = 0.0) -> list[dict]:
    pairs = _plan_turns(rng, n, max_d)
    turns: list[dict | None] = [None] * n
    used_keys: set[str] = set()

    def new_fact() -> dict:
        # with same_kind_prob, a kind already planted here: two gifts, two towns... (the recall then needs the key)
        kind = None
        if same_kind_prob > 0 and used_keys and rng.random() < same_kind_prob:
            kind = rng.choice(sorted({key.split(":")[0] for key in used_keys}))
        fact = world.sample_fact(rng, used_keys, kind=kind)
        used_keys.add(fact["key"])
        return fact

    for i, d in pairs:
        fact = new_fact()
        turns[i] = _plant_turn(fact, rng)
        turns[i + d] = {
            "query": _fill(rng.choice(_ASK_TEMPLATES[fact["kind"]]), fact["slots"]),
            "answer": _fill(_REPLY_TEMPLATES[fact["kind"]], fact["slots"]),
            "recall_distance": d,
            "fact_key": fact["key"],
            "answer_keywords": list(fact["keywords"]),
            "turn_type": "recall",
        }
    for t in range(n):
        if turns[t] is not None:
            continue
        if rng.random() < distractor_prob:  # a fact that is never asked for
            turns[t] = _plant_turn(new_fact(), rng)
        else:
            q, a = world.filler(rng)
            turns[t] = {"query": q, "answer": a, "recall_distance": 0, "fact_key": None,
                        "answer_keywords": [], "turn_type": "filler"}
    return turns  # type: ignore[return-value]


def _plant_turn(fact: dict, rng: random.Random) -> dict:
    return {
        "query": _fill(rng.choice(_PLANT_TEMPLATES[fact["kind"]]), fact["slots"]),
        "answer": rng.choice(_ACKNOWLEDGEMENTS),
        "recall_distance": 0,
        "fact_key": fact["key"],
        "answer_keywords": [],
        "turn_type": "plant",
        "_fact": fact,
    }


def _turn_range(num_turns) -> tuple[int, int]:
    if isinstance(num_turns, int):
        lo = hi = num_turns
    else:
        try:
            lo, hi = (int(x) for x in num_turns)
        except (TypeError, ValueError):
            raise ValueError(
                f"num_turns={num_turns!r} must be an int or a (min, max) pair, e.g. 6 or (2, 8)."
            ) from None
    if lo < 1 or hi < lo:
        raise ValueError(f"num_turns={num_turns!r} needs 1 <= min <= max, e.g. 6 or (2, 8).")
    return lo, hi


def generate_conversations(num_conversations: int, num_turns: int | tuple[int, int] = 6,
                           max_recall_distance: int = 4, seed: int = 0,
                           world: SyntheticWorld | None = None, same_kind_prob: float = 0.0) -> list[dict]:
    """Generate ``num_conversations`` fact-recall conversations.

    Args:
        num_conversations: how many conversations.
        num_turns: turns per conversation, an int or an inclusive ``(min, max)`` range drawn
            per conversation.
        max_recall_distance: facts are asked for ``1..max_recall_distance`` turns after they
            were planted (capped by the conversation length).
        seed: everything is deterministic in ``seed``; conversation ``i`` depends only on
            ``(seed, i)`` so a larger ``num_conversations`` extends, not reshuffles, the list.
        world: the pools (default ``SyntheticWorld(seed)``; the pools are seed-independent).
        same_kind_prob: the probability that a fact after a conversation's first is of a kind already planted
            in it (two gifts from two friends, two towns...), so that its recall needs the key, not only the
            kind. 0 (the default) draws every kind uniformly.

    Returns a list of ``{"conversation_id": str, "interactions": [{"query", "answer",
    "recall_distance", "fact_key", "answer_keywords", "turn_type"}]}``; ``recall_distance`` is
    0 for non-recall turns, ``fact_key`` is set on planting and recall turns.
    """
    return [conv for conv, _ in _generate(num_conversations, num_turns, max_recall_distance,
                                          seed, world, same_kind_prob)]


def _generate(num_conversations, num_turns, max_recall_distance, seed, world=None, same_kind_prob=0.0):
    """Yield ``(conversation, story)`` pairs (the story uses the conversation's facts)."""
    if num_conversations < 0:
        raise ValueError(f"num_conversations={num_conversations} must be >= 0.")
    if max_recall_distance < 1:
        raise ValueError(f"max_recall_distance={max_recall_distance} must be >= 1.")
    if not isinstance(same_kind_prob, (int, float)) or not 0.0 <= same_kind_prob <= 1.0:
        raise ValueError(
            f"same_kind_prob={same_kind_prob!r} must be a probability between 0 and 1, e.g. 0.5 "
            f"(0: every fact's kind drawn uniformly)."
        )
    lo, hi = _turn_range(num_turns)
    world = world or SyntheticWorld(seed)
    for i in range(num_conversations):
        rng = random.Random(int(seed) * 1_000_003 + i)
        n = rng.randint(lo, hi)
        turns = _make_conversation(world, rng, n, max_recall_distance, same_kind_prob=same_kind_prob)
        facts = [t.pop("_fact") for t in turns if "_fact" in t]
        story = story_for_conversation(facts, world, rng)
        yield {"conversation_id": f"synth-{seed}-{i:06d}", "interactions": turns}, story


# --------------------------------------------------------------------------------------------
# Text for stage 1
# --------------------------------------------------------------------------------------------

_STORY_OPENINGS = (
    "This is a story about {hero}.",
    "{hero} lives in {town}.",
    "Once there was a person called {hero} in {town}.",
    "In the town of {town} there lived {hero}.",
)
_STORY_CLOSINGS = (
    "That was a good day for {hero}.",
    "In the evening {hero} went home to {town}.",
    "After that {hero} had a cup of tea.",
    "The end.",
)
# Third-person versions of the facts (the hero is the "I" of the conversation).
_STORY_FACTS = {
    "put": "{hero} put the {object} in the {spot}.",
    "lives": "The friend {name} lives in {town}.",
    "called": "The {role} of {hero} is called {name}.",
    "gift": "{name} gave {hero} a {object}.",
    "paint": "{hero} painted the {thing} {colour}.",
    "count": "{hero} has {number} {countable}.",
}


def story_for_conversation(facts: Sequence[dict], world: SyntheticWorld,
                           rng: random.Random) -> str:
    """A short third-person story in the same world mentioning the facts' entities."""
    hero = rng.choice(world.names)
    town = rng.choice(world.places)
    parts = [_fill(rng.choice(_STORY_OPENINGS), {"hero": hero, "town": town})]
    for fact in facts:
        parts.append(_fill(_STORY_FACTS[fact["kind"]], {"hero": hero, **fact["slots"]}))
    if rng.random() < 0.5:  # a line of world knowledge
        parts.append(rng.choice(WORLD_QA)[1])
    parts.append(_fill(rng.choice(_STORY_CLOSINGS), {"hero": hero, "town": town}))
    return " ".join(parts)


def conversation_to_text(conversation: dict) -> str:
    """Render a conversation as plain text: one line per query and per answer."""
    lines = []
    for turn in conversation["interactions"]:
        lines.append(turn["query"])
        lines.append(turn["answer"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Rows of `n` for train / validation / test from three `fractions` (normalised); train takes the remainder."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            f"split_fractions={tuple(fractions)!r} must be three non-negative numbers "
            "(train, validation, test), e.g. (0.9, 0.05, 0.05)."
        )
    total = float(sum(fractions))
    fr = [f / total for f in fractions]
    counts = [int(round(n * f)) for f in fr]
    # every split with a positive fraction gets at least one conversation when possible
    for j in (1, 2):
        if fr[j] > 0 and counts[j] == 0 and n >= 3:
            counts[j] = 1
    counts[0] = n - counts[1] - counts[2]
    if counts[0] < 0:
        raise ValueError(f"num_conversations={n} is too small for split_fractions={fractions}.")
    return counts


def _rows(kind: str, convs: list[dict], stories: dict[str, str]) -> list[dict]:
    rows: list[dict] = []
    for conv in convs:
        turns = conv["interactions"]
        if kind == "pretraining":
            rows.append({"text": stories[conv["conversation_id"]]})
            rows.append({"text": conversation_to_text(conv)})
        elif kind == "interaction-sft":
            rows.extend({"query": t["query"], "answer": t["answer"]} for t in turns)
        else:
            rows.append({
                "query": turns[0]["query"],
                "answer": turns[0]["answer"],
                "interactions": [{"query": t["query"], "answer": t["answer"]} for t in turns[1:]],
                "recall_distance": [int(t["recall_distance"]) for t in turns[1:]],
                "answer_keywords": [list(t["answer_keywords"]) for t in turns[1:]],
                "fact_keys": [t["fact_key"] or "" for t in turns],
                "conversation_id": conv["conversation_id"],
            })
    return rows


def _features(kind: str):
    from datasets import Features, List, Value

    if kind == "pretraining":
        return Features({"text": Value("string")})
    if kind == "interaction-sft":
        return Features({"query": Value("string"), "answer": Value("string")})
    return Features({
        "query": Value("string"),
        "answer": Value("string"),
        "interactions": List({"query": Value("string"), "answer": Value("string")}),
        "recall_distance": List(Value("int32")),
        "answer_keywords": List(List(Value("string"))),
        "fact_keys": List(Value("string")),
        "conversation_id": Value("string"),
    })


def build_synthetic_dataset(kind: str, num_conversations: int = 2000,
                            num_turns: int | tuple[int, int] = 6, max_recall_distance: int = 4,
                            seed: int = 0,
                            split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                            same_kind_prob: float = 0.0):
    """Build the embedded data set of one ``kind`` as a ``datasets.DatasetDict``.

    ``kind``: ``"pretraining"`` (column ``text``), ``"interaction-sft"`` (``query``,
    ``answer``) or ``"multi-turn"`` (``query``, ``answer``, ``interactions``,
    ``recall_distance``, ``answer_keywords``, ``fact_keys``, ``conversation_id``). The conversations are
    split into ``train`` / ``validation`` / ``test`` (shuffled with ``seed``, by
    ``split_fractions``) *before* flattening, so no conversation crosses splits.
    ``same_kind_prob``: see :func:`generate_conversations`; the split is by conversation index, so with the
    same ``seed`` and ``num_conversations`` no train conversation has a test conversation's index.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(
            f"kind={kind!r} is not a synthetic data set kind; use one of {DATASET_KINDS}."
        )
    from datasets import Dataset, DatasetDict

    pairs = list(_generate(num_conversations, num_turns, max_recall_distance, seed, same_kind_prob=same_kind_prob))
    convs = [conv for conv, _ in pairs]
    stories = {conv["conversation_id"]: story for conv, story in pairs}
    order = list(range(len(convs)))
    random.Random(int(seed) * 7_919 + 17).shuffle(order)
    counts = split_counts(len(convs), split_fractions)
    bounds = [0, counts[0], counts[0] + counts[1], len(convs)]
    out = {}
    for j, name in enumerate(("train", "validation", "test")):
        part = [convs[k] for k in sorted(order[bounds[j]:bounds[j + 1]])]
        out[name] = Dataset.from_list(_rows(kind, part, stories), features=_features(kind))
    return DatasetDict(out)


def vocabulary(texts: Iterable[str]) -> set[str]:
    """Distinct words (letters/digits runs) in ``texts``: a quick vocabulary-size check."""
    vocab: set[str] = set()
    for t in texts:
        vocab.update(_words(t))
    return vocab
