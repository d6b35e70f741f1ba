"""A third batch of task families, kept apart as a fresh held-out split.

The benchmark asks how well the light/heavy classifier does on kinds of request it was never
trained on. The twenty-three families in `tasks` have all been run on the local model and
looked at; these ten were written blind, before any model answered them, so that scoring the
classifier on them says something about families nobody has tuned it for. They follow the
same rules as the others: levels 1 (trivial for a small model) to 4 (hard for one), several
paraphrases of similar length at every level (a hard level is harder, not longer), answers
computed in code or taken from facts with one accepted form, and a check of an existing kind.

Kept in its own module: it imports `tasks`, and `tasks.every_family` imports it only when
called (appending these ten to `FAMILIES`), so no import cycle appears.
"""

from __future__ import annotations

import random

from exporter.routing.learn.tasks import NUMBER_ONLY, Family, Made, _ask

ONE_WORD = ["Reply with one word.", "Just the word, please.", "Answer in one word.", ""]

# --------------------------------------------------------------------------- plural

# Only nouns with one accepted plural: "cactus" (cacti/cactuses), "index", "hoof",
# "criterion" (dictionaries also give "criterions") and "fish" (the same word as the
# singular, so an echo of the question would pass) are left out.
PLURALS = {
    1: [("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("tree", "trees"),
        ("chair", "chairs"), ("bird", "birds"), ("cup", "cups"), ("road", "roads")],
    2: [("box", "boxes"), ("fox", "foxes"), ("church", "churches"), ("dish", "dishes"),
        ("baby", "babies"), ("city", "cities"), ("party", "parties"), ("story", "stories"),
        ("glass", "glasses"), ("watch", "watches")],
    3: [("mouse", "mice"), ("child", "children"), ("tooth", "teeth"), ("foot", "feet"),
        ("goose", "geese"), ("woman", "women"), ("leaf", "leaves"), ("knife", "knives"),
        ("wolf", "wolves"), ("shelf", "shelves")],
    4: [("parenthesis", "parentheses"), ("ellipsis", "ellipses"), ("crisis", "crises"),
        ("thesis", "theses"), ("analysis", "analyses"), ("ox", "oxen"),
        ("bacterium", "bacteria"), ("hypothesis", "hypotheses"), ("oasis", "oases"),
        ("louse", "lice"), ("stimulus", "stimuli"), ("diagnosis", "diagnoses")],
}


def _word_form(rng: random.Random, pairs: list[tuple[str, str]], questions: list[str]) -> Made:
    """A word and the one form of it asked for ({w} in each paraphrase)."""
    word, expected = rng.choice(pairs)
    question = rng.choice([q.format(w=word) for q in questions])
    return _ask(rng, question, ONE_WORD), {"kind": "word", "expected": expected}, 12


def plural(rng: random.Random, level: int) -> Made:
    return _word_form(rng, PLURALS[level], [
        "What is the plural of '{w}'?", "Give the plural form of the noun '{w}'.",
        "One {w}, two ...? Give the plural.", 'Write the plural of "{w}".'])


# --------------------------------------------------------------------------- past tense

# Simple past only, and only verbs with one accepted form: "dream" (dreamed/dreamt),
# "shrink" (shrank/shrunk), "dive" (dived/dove) and "put" (same as the present) are left out.
PAST = {
    1: [("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("talk", "talked"),
        ("open", "opened"), ("help", "helped"), ("clean", "cleaned"), ("look", "looked")],
    2: [("stop", "stopped"), ("carry", "carried"), ("try", "tried"), ("plan", "planned"),
        ("study", "studied"), ("drop", "dropped"), ("cry", "cried"), ("hug", "hugged"),
        ("worry", "worried"), ("shop", "shopped")],
    3: [("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"), ("take", "took"),
        ("give", "gave"), ("write", "wrote"), ("come", "came"), ("drink", "drank"),
        ("sing", "sang")],
    4: [("seek", "sought"), ("cling", "clung"), ("bind", "bound"), ("grind", "ground"),
        ("wring", "wrung"), ("sting", "stung"), ("fling", "flung"), ("flee", "fled"),
        ("forsake", "forsook"), ("arise", "arose"), ("stride", "strode"), ("teach", "taught")],
}


def past_tense(rng: random.Random, level: int) -> Made:
    return _word_form(rng, PAST[level], [
        "What is the past tense of '{w}'?", "Give the simple past form of the verb '{w}'.",
        "Today I {w}. Yesterday I ...? Give the verb.", 'Put the verb "{w}" in the simple past.'])


# --------------------------------------------------------------------------- roman numerals

_ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
          (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
# Sizes per level: single digits, then tens, then the subtractive forms (XL, XC, CD), then
# four-digit years like MCMXCIV. 1 is left out: "I" is also the pronoun, and a check would
# find it in "I think it is V".
ROMAN_RANGE = {1: (2, 10), 2: (11, 39), 3: (40, 399), 4: (400, 3999)}


def roman_numeral(n: int) -> str:
    out = []
    for value, letters in _ROMAN:
        count, n = divmod(n, value)
        out.append(letters * count)
    return "".join(out)


def roman(rng: random.Random, level: int) -> Made:
    n = rng.randint(*ROMAN_RANGE[level])
    numeral = roman_numeral(n)
    if rng.random() < 0.5:
        question = rng.choice([f"Write {n} in Roman numerals.",
                               f"What is {n} as a Roman numeral?",
                               f"Convert the number {n} to Roman numerals."])
        # Case-sensitive on purpose: Roman numerals are capitals, and "mix" or "civil" in a
        # sentence must not count as MIX or CIV.
        return _ask(rng, question, ["Reply with the numeral only.", ""]), \
            {"kind": "token", "expected": numeral}, 16
    question = rng.choice([f"What number is the Roman numeral {numeral}?",
                           f"Convert the Roman numeral {numeral} to a number.",
                           f"Which number does {numeral} stand for in Roman numerals?"])
    return _ask(rng, question), {"kind": "number", "expected": n}, 16


# --------------------------------------------------------------------------- number words

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
        "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int, british: bool = False) -> str:
    """English words for 0 <= n < 1,000,000 ("forty-two", "three hundred and seven" when
    `british`, else "three hundred seven")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        joiner = " and " if british else " "
        return f"{ONES[n // 100]} hundred" + (joiner + in_words(rest) if rest else "")
    rest = n % 1000
    head = f"{in_words(n // 1000, british)} thousand"
    if not rest:
        return head
    joiner = " and " if british and rest < 100 else " "
    return head + joiner + in_words(rest, british)


def _to_words(rng: random.Random, n: int) -> Made:
    # Only numbers written as one word: "forty two" and "forty-two" are both fine English,
    # and the word check cannot accept both, so two-word numbers go the other way only.
    question = rng.choice([f"Write the number {n} in words.", f"How do you spell {n} in words?",
                           f"Spell out {n} in English."])
    return _ask(rng, question, ONE_WORD), {"kind": "word", "expected": ONES[n] if n < 20
                                           else TENS[n // 10]}, 16


def _to_digits(rng: random.Random, n: int) -> Made:
    words = in_words(n, british=rng.random() < 0.5)
    question = rng.choice([f"Write \"{words}\" as a number.", f"What is \"{words}\" in digits?",
                           f"Convert \"{words}\" to digits."])
    return _ask(rng, question), {"kind": "number", "expected": n}, 16


def number_words(rng: random.Random, level: int) -> Made:
    if level == 1:
        n = rng.randint(2, 10)  # not "one": the word is in too many sentences by chance
        return _to_words(rng, n) if rng.random() < 0.5 else _to_digits(rng, n)
    if level == 2:
        if rng.random() < 0.5:  # the spellings small models get wrong: "forty", "eighteen"
            return _to_words(rng, rng.choice(list(range(11, 20)) + list(range(20, 100, 10))))
        return _to_digits(rng, rng.randint(21, 99))
    if level == 3:
        return _to_digits(rng, rng.randint(101, 999))
    return _to_digits(rng, rng.randint(1001, 99999))


# --------------------------------------------------------------------------- shapes

COUNTS = {  # (what is counted, the shape, how many)
    1: [("sides", "triangle", 3), ("sides", "square", 4), ("corners", "triangle", 3),
        ("corners", "rectangle", 4)],
    2: [("sides", "pentagon", 5), ("sides", "octagon", 8), ("faces", "cube", 6),
        ("corners", "square", 4)],
    3: [("edges", "cube", 12), ("vertices", "cube", 8), ("sides", "heptagon", 7),
        ("sides", "decagon", 10), ("faces", "tetrahedron", 4), ("sides", "nonagon", 9)],
    4: [("faces", "octahedron", 8), ("vertices", "octahedron", 6), ("faces", "dodecahedron", 12),
        ("vertices", "dodecahedron", 20), ("faces", "icosahedron", 20),
        ("edges", "triangular prism", 9), ("edges", "square pyramid", 8)],
}
POLYGONS = {5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon", 9: "nonagon",
            10: "decagon", 12: "dodecagon"}


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _angles(rng: random.Random) -> tuple[str, int]:
    if rng.random() < 0.5:
        n = rng.choice(sorted(POLYGONS))
        shape = POLYGONS[n]
        return rng.choice([f"What is the sum of the interior angles of {_a(shape)}, in degrees?",
                           f"In degrees, what do the interior angles of {_a(shape)} add up to?",
                           f"The interior angles of {_a(shape)} sum to how many degrees?"]), \
            (n - 2) * 180
    n = rng.choice([k for k in sorted(POLYGONS) if 180 * (k - 2) % k == 0])  # no heptagon
    shape = POLYGONS[n]
    return rng.choice([f"How many degrees is each interior angle of a regular {shape}?",
                       f"Each interior angle of a regular {shape} measures how many degrees?",
                       f"What is one interior angle of a regular {shape}, in degrees?"]), \
        (n - 2) * 180 // n  # 108, 120, 135, 140, 144, 150


def shapes(rng: random.Random, level: int) -> Made:
    if level == 4 and rng.random() < 0.5:
        question, value = _angles(rng)
    else:
        what, shape, value = rng.choice(COUNTS[level])
        question = rng.choice([f"How many {what} does {_a(shape)} have?",
                               f"{_a(shape).capitalize()} has how many {what}?",
                               f"What is the number of {what} of {_a(shape)}?"])
    return _ask(rng, question), {"kind": "number", "expected": value}, 24


# --------------------------------------------------------------------------- rounding

# Never an exact tie (47.5, 3.45): round-half-up and round-half-even disagree on those.
# Everything is computed on integers, so no float rounding error decides an answer.


def _nearest(n: int, step: int) -> int:
    return (n + step // 2) // step * step


def _round_task(rng: random.Random, level: int) -> tuple[str, str, float]:
    if level == 1:
        n = rng.choice([k for k in range(11, 100) if k % 10 not in (0, 5)])
        return str(n), "the nearest ten", _nearest(n, 10)
    if level == 2:
        whole, tenth = rng.randint(1, 60), rng.choice([1, 2, 3, 4, 6, 7, 8, 9])
        return f"{whole}.{tenth}", "the nearest whole number", whole + (tenth > 5)
    if level == 3:
        if rng.random() < 0.5:
            n = rng.choice([k for k in range(1001, 9999) if k % 100 not in (0, 50)])
            return str(n), "the nearest hundred", _nearest(n, 100)
        cents = rng.choice([k for k in range(100, 2000) if k % 10 not in (0, 5)])
        return f"{cents // 100}.{cents % 100:02d}", "one decimal place", _nearest(cents, 10) / 100
    if rng.random() < 0.5:
        n, figures = rng.randint(10000, 999999), rng.choice([2, 3])
        step = 10 ** (len(str(n)) - figures)
        if n % step * 2 == step:
            return _round_task(rng, level)
        return str(n), f"{figures} significant figures", _nearest(n, step)
    m = rng.choice([k for k in range(1000, 9950) if k % 100 != 50])  # 0.00mmmm
    return f"0.00{m}", "2 significant figures", _nearest(m, 100) / 1_000_000


def rounding(rng: random.Random, level: int) -> Made:
    text, target, value = _round_task(rng, level)
    question = rng.choice([f"Round {text} to {target}.", f"What is {text} rounded to {target}?",
                           f"If you round {text} to {target}, what do you get?"])
    return _ask(rng, question), {"kind": "number", "expected": value}, 24


# --------------------------------------------------------------------------- divisibility

DIVISORS = {2: [2, 5, 10], 3: [3, 4, 9], 4: [7, 11, 13]}


def _even_odd(rng: random.Random) -> Made:
    # A choice, not yes/no: "Is 8 even?" answered "8 is odd" reads as a yes to a yes/no check.
    n = rng.randint(1, 20)
    question = rng.choice([f"Is {n} even or odd?", f"Is the number {n} odd or even?",
                           f"{n}: even or odd?"])
    expected = "even" if n % 2 == 0 else "odd"
    return _ask(rng, question, ONE_WORD), {"kind": "choice", "expected": expected,
                                           "options": ["even", "odd"], "pick": "first"}, 12


def divisibility(rng: random.Random, level: int) -> Made:
    if level == 1:
        return _even_odd(rng)
    k = rng.choice(DIVISORS[level])
    low, high = (100, 999) if level < 4 else (200, 2000)
    divisible = rng.random() < 0.5  # half of each answer, whatever the divisor
    while True:
        n = rng.randint(low, high)
        if (n % k == 0) == divisible:
            break
    question = rng.choice([f"Is {n} divisible by {k}?", f"Can {n} be divided evenly by {k}?",
                           f"Is {n} a multiple of {k}?"])
    return _ask(rng, question, ["Answer yes or no.", "Yes or no?", ""]), \
        {"kind": "yes_no", "expected": "yes" if divisible else "no"}, 12


# --------------------------------------------------------------------------- sentiment

# No review says "positive" or "negative", so a model quoting it back gains nothing.
REVIEWS = {
    1: [("I love it, it is perfect!", "positive"),
        ("Amazing product, I am so happy with it.", "positive"),
        ("Best purchase ever, absolutely wonderful.", "positive"),
        ("I hate it, it is awful.", "negative"),
        ("Terrible product, a total waste of money.", "negative"),
        ("Worst purchase ever, really horrible.", "negative")],
    2: [("The battery lasts all day and the screen is sharp.", "positive"),
        ("It arrived early and works exactly as described.", "positive"),
        ("My kids use it every day and it still looks new.", "positive"),
        ("It stopped working after two days and nobody answered my emails.", "negative"),
        ("The zipper broke the first time I used it.", "negative"),
        ("It arrived late, scratched, and missing a part.", "negative")],
    3: [("I was not disappointed at all.", "positive"),
        ("I have no complaints whatsoever.", "positive"),
        ("Nothing about it feels cheap.", "positive"),
        ("It is not as good as the pictures suggest.", "negative"),
        ("I would not buy this again.", "negative"),
        ("I can't recommend it to anyone.", "negative")],
}
# Level 4: a small point one way, then the verdict the other way; the verdict decides.
MINOR = {"positive": ["The box was dented", "Shipping took longer than I hoped",
                      "The manual is confusing", "It is a bit pricey"],
         "negative": ["It looks lovely in the photos", "The price seemed like a bargain",
                      "Delivery was quick", "The first day it worked fine"]}
VERDICT = {"positive": ["it works beautifully and I would buy it again",
                        "after a month I can say it is worth every penny",
                        "it has quickly become my favourite thing in the kitchen"],
           "negative": ["it fell apart within a month and I want a refund",
                        "I regret buying it and it is going back",
                        "it has been nothing but trouble since"]}


def _mixed_review(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["positive", "negative"])
    minor, verdict = rng.choice(MINOR[label]), rng.choice(VERDICT[label])
    glue = rng.choice(["{}, but {}.", "{}. Still, {}."])
    return glue.format(minor, verdict), label


def sentiment(rng: random.Random, level: int) -> Made:
    review, label = _mixed_review(rng) if level == 4 else rng.choice(REVIEWS[level])
    question = rng.choice([f"Is this review positive or negative? \"{review}\"",
                           f"Review: \"{review}\"\nIs it positive or negative?",
                           f"Classify the sentiment of \"{review}\" as positive or negative."])
    return _ask(rng, question, ONE_WORD), {"kind": "choice", "expected": label,
                                           "options": ["positive", "negative"],
                                           "pick": "only"}, 12


# --------------------------------------------------------------------------- odd one out

# (the group, what does not belong): three drawn from the first, one from the second. Level
# 1 is worlds apart, level 4 needs a fact (a bat is no bird, a spider no insect). Each set has
# one reading only: no 2 among odd primes (the only even one), no kiwi (also a fruit).
GROUPS = {
    1: [(["apple", "banana", "grape", "pear", "cherry", "mango"], ["car", "bus", "truck"]),
        (["red", "blue", "green", "yellow", "purple"], ["dog", "chair", "spoon"]),
        (["chair", "table", "sofa", "bed", "desk"], ["banana", "cloud", "river"])],
    2: [(["dog", "cat", "horse", "cow", "rabbit"], ["eagle", "sparrow", "parrot"]),
        (["carrot", "potato", "onion", "cabbage", "lettuce"], ["apple", "banana", "pear"]),
        (["France", "Spain", "Italy", "Germany", "Japan"], ["Paris", "Tokyo", "London"]),
        (["Monday", "Tuesday", "Friday", "Sunday"], ["April", "June", "October"])],
    3: [(["oak", "pine", "maple", "birch", "willow"], ["rose", "tulip", "daisy"]),
        (["Mars", "Venus", "Jupiter", "Saturn", "Neptune"], ["Moon", "Sun"]),
        (["violin", "cello", "guitar", "harp"], ["flute", "trumpet", "clarinet"]),
        (["circle", "square", "triangle", "rectangle"], ["cube", "sphere", "pyramid"])],
    4: [(["eagle", "sparrow", "owl", "parrot", "pigeon"], ["bat"]),
        (["ant", "bee", "beetle", "moth", "wasp"], ["spider", "scorpion"]),
        (["whale", "dolphin", "porpoise"], ["shark", "tuna", "salmon"]),
        (["penguin", "ostrich", "emu"], ["eagle", "sparrow", "pigeon"]),
        (["Paris", "Rome", "Madrid", "Berlin", "Lisbon", "Vienna"],
         ["Sydney", "Toronto", "Chicago"]),
        (["3", "5", "7", "11", "13", "17", "19", "23"], ["9", "15", "21", "25", "27"])],
}


def odd_one_out(rng: random.Random, level: int) -> Made:
    group, others = rng.choice(GROUPS[level])
    odd = rng.choice(others)
    items = [*rng.sample(group, 3), odd]
    rng.shuffle(items)
    listed = ", ".join(items)
    question = rng.choice([f"Which one does not belong: {listed}?",
                           f"Find the odd one out: {listed}.",
                           f"Which of these is the odd one out: {listed}?"])
    # "first": the usual answer names the odd one, then explains with the other three.
    return _ask(rng, question, ["Reply with the odd one only.", ""]), \
        {"kind": "choice", "expected": odd, "options": items, "pick": "first"}, 16


# --------------------------------------------------------------------------- elapsed time

# How long from one clock time to another, answered as a number: a time like "13:05" is two
# numbers to the number check, and "3:05" vs "03:05" would split the word check.


def _clock(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def elapsed_time(rng: random.Random, level: int) -> Made:
    if level == 1:  # whole hours, same day
        start, gap = rng.randint(6, 15) * 60, rng.randint(2, 6) * 60
        unit, value = "hours", gap // 60
    elif level == 2:  # minutes within one hour
        hour, first, last = rng.randint(7, 20), *sorted(rng.sample(range(0, 60, 5), 2))
        start, gap, unit = hour * 60 + first, last - first, "minutes"
        value = gap
    elif level == 3:  # across one or two hours
        start = rng.randint(7, 19) * 60 + rng.choice(range(5, 60, 5))
        gap = rng.randint(65, 170)
        unit, value = "minutes", gap
    else:  # across midnight
        start = 23 * 60 + rng.choice(range(0, 60, 5)) - rng.choice([0, 60, 120])
        gap = (24 * 60 - start) + rng.randint(10, 200)
        unit, value = "minutes", gap
    a, b = _clock(start), _clock(start + gap)
    if level == 4:
        b += " the next day"
    question = rng.choice([f"How many {unit} are there from {a} to {b}?",
                           f"How many {unit} pass between {a} and {b}?",
                           f"From {a} to {b} is how many {unit}?"])
    return _ask(rng, question, NUMBER_ONLY), {"kind": "number", "expected": value}, 24


THIRD_FAMILIES: dict[str, Family] = {
    "plural": plural, "past_tense": past_tense, "roman": roman, "number_words": number_words,
    "shapes": shapes, "rounding": rounding, "divisibility": divisibility,
    "sentiment": sentiment, "odd_one_out": odd_one_out, "elapsed_time": elapsed_time,
}
