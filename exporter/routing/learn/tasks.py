"""Tasks with answers a program can check, to learn which requests the local model handles.

Each family makes prompts at levels 1 (trivial) to 4 (hard for a small model), in several
paraphrases; then every task is framed the way real traffic is: maybe a system prompt, maybe
an unrelated paragraph before the question, maybe earlier turns of a chat (some with a code
block in an assistant turn), drawn independently of the level, so that a prompt's length
does not give its difficulty away. `llmtap classifier tasks --out tasks.jsonl` writes them;
`llmtap classifier train` runs them on the local model and keeps which ones it got right.

A task is one JSON object: id, family, level, body (an OpenAI chat completions request),
check (what exporter.routing.learn.checks needs to judge the answer).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

Made = tuple[str, dict[str, Any], int]  # (the question, its check, max_tokens)
Family = Callable[[random.Random, int], Made]

NUMBER_ONLY = ["Answer with just the number.", "Reply with the number only.",
               "Give only the final number.", ""]


def _ask(rng: random.Random, question: str, suffixes: list[str] = NUMBER_ONLY) -> str:
    suffix = rng.choice(suffixes)
    return f"{question} {suffix}".strip()


def arithmetic(rng: random.Random, level: int) -> Made:
    if level == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        expr, value = f"{a} + {b}", a + b
    elif level == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        expr, value = f"{a} {op} {b}", a + b if op == "+" else a - b
    elif level == 3:
        a, b = rng.randint(12, 99), rng.randint(3, 9)
        expr, value = f"{a} * {b}", a * b
    else:
        a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(100, 999)
        expr, value = f"{a} * {b} - {c}", a * b - c
    question = rng.choice([f"What is {expr}?", f"Compute {expr}.", f"Calculate {expr}.",
                           f"{expr} = ?", f"Please work out {expr}."])
    return _ask(rng, question), {"kind": "number", "expected": value}, 24


NAMES = ["Anna", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jamal"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards"]


def word_problem(rng: random.Random, level: int) -> Made:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 5)
    if level == 1:
        text = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have?"
        value = a + b
    elif level == 2:
        a += 10
        text = (f"{name} had {a} {thing} and gave {b} to {other}. How many {thing} does "
                f"{name} have left?")
        value = a - b
    elif level == 3:
        text = (f"{name} buys {c} boxes of {thing} with {a} in each box, then gives away {b}. "
                f"How many {thing} are left?")
        value = c * a - b
    else:
        price = rng.randint(3, 12)
        text = (f"{name} buys {c} packs of {thing} at {price} dollars each and pays with a "
                f"{100}-dollar bill. {other} then pays {name} back half of what was spent. "
                f"How many dollars does {name} have from the bill and the payback together?")
        spent = c * price
        if spent % 2:  # half of an odd sum is not a whole number of dollars: another one
            return word_problem(rng, level)
        value = 100 - spent + spent // 2
    return _ask(rng, text), {"kind": "number", "expected": value}, 48


CAPITALS_EASY = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin",
                 "Spain": "Madrid", "England": "London", "Russia": "Moscow", "China": "Beijing"}
CAPITALS_HARD = {"Australia": "Canberra", "Canada": "Ottawa", "Kazakhstan": "Astana",
                 "Myanmar": "Naypyidaw", "Nigeria": "Abuja", "Bhutan": "Thimphu",
                 "Bolivia": "Sucre", "Mongolia": "Ulaanbaatar", "Laos": "Vientiane",
                 "Slovenia": "Ljubljana", "Eritrea": "Asmara", "Latvia": "Riga"}
SYMBOLS_EASY = {"oxygen": "O", "hydrogen": "H", "carbon": "C", "nitrogen": "N"}
SYMBOLS_HARD = {"tungsten": "W", "antimony": "Sb", "potassium": "K", "silver": "Ag",
                "mercury": "Hg", "tin": "Sn", "lead": "Pb", "sodium": "Na"}
AUTHORS = {"Hamlet": "Shakespeare", "Pride and Prejudice": "Austen",
           "War and Peace": "Tolstoy", "One Hundred Years of Solitude": "Marquez",
           "The Brothers Karamazov": "Dostoevsky", "Ulysses": "Joyce",
           "Don Quixote": "Cervantes", "The Trial": "Kafka"}


def lookup(rng: random.Random, level: int) -> Made:
    if level == 1:
        country, city = rng.choice(sorted(CAPITALS_EASY.items()))
        question = rng.choice([f"What is the capital of {country}?",
                               f"Name the capital city of {country}.",
                               f"Which city is the capital of {country}?"])
        expected = city
    elif level == 2:
        element, symbol = rng.choice(sorted(SYMBOLS_EASY.items()))
        question = f"What is the chemical symbol of {element}? Reply with the symbol only."
        return question, {"kind": "token", "expected": symbol}, 12
    elif level == 3:
        country, city = rng.choice(sorted(CAPITALS_HARD.items()))
        question = rng.choice([f"What is the capital of {country}?",
                               f"Name the capital city of {country}.",
                               f"{country}'s capital is which city?"])
        expected = city
    else:
        if rng.random() < 0.5:
            element, symbol = rng.choice(sorted(SYMBOLS_HARD.items()))
            question = f"What is the chemical symbol of {element}? Reply with the symbol only."
            return question, {"kind": "token", "expected": symbol}, 12
        book, author = rng.choice(sorted(AUTHORS.items()))
        question = rng.choice([f"Who wrote {book}? Give the surname.",
                               f"Which author wrote the novel {book}?"])
        expected = author
    return question, {"kind": "word", "expected": expected}, 24


WORDS = ["garden", "window", "planet", "rocket", "silver", "forest", "candle", "bridge",
         "mirror", "pocket", "ladder", "market", "tunnel", "violin", "harbor", "pepper"]


def strings(rng: random.Random, level: int) -> Made:
    word = rng.choice(WORDS)
    if level == 1:
        question = rng.choice([f"Write the word '{word}' in capital letters.",
                               f"Convert '{word}' to uppercase."])
        return question, {"kind": "token", "expected": word.upper()}, 12
    if level == 2:
        question = rng.choice([f"What is the first letter of the word '{word}'? Reply with "
                               "the letter only.",
                               f"Give the last letter of '{word}'. Just the letter."])
        letter = word[0] if "first" in question else word[-1]
        return question, {"kind": "word", "expected": letter}, 8
    if level == 3:
        question = rng.choice([f"Spell the word '{word}' backwards.",
                               f"Reverse the letters of '{word}'. Reply with the result only."])
        return question, {"kind": "word", "expected": word[::-1]}, 16
    letter = rng.choice(sorted(set(word)))
    question = rng.choice([f"How many times does the letter '{letter}' appear in "
                           f"'{word}{rng.choice(WORDS)}'?",
                           f"Count the letter '{letter}' in the string "
                           f"'{word}{rng.choice(WORDS)}'."])
    text = question.split("'")[3]
    return _ask(rng, question), {"kind": "number", "expected": text.count(letter)}, 24


CITIES = ["Lisbon", "Oslo", "Dublin", "Prague", "Vienna", "Athens", "Warsaw", "Helsinki"]
JOBS = ["teacher", "nurse", "pilot", "baker", "engineer", "lawyer", "painter", "farmer"]


def extraction(rng: random.Random, level: int) -> Made:
    name = rng.choice(NAMES)
    city, other = rng.sample(CITIES, 2)
    year = rng.randint(1950, 2020)
    if level == 1:
        sentence = f"{name} was born in {year}."
        question = f"From the sentence \"{sentence}\", what year was {name} born?"
        return _ask(rng, question), {"kind": "number", "expected": year}, 16
    if level == 2:
        sentence = f"In {year}, {name} moved to {city} to work as a {rng.choice(JOBS)}."
        question = f"Text: {sentence}\nWhich city did {name} move to? Reply with the city."
        return question, {"kind": "word", "expected": city}, 16
    if level == 3:
        job = rng.choice(JOBS)
        sentence = (f"{name} grew up in {other}, trained as a {job} in {city}, and retired in "
                    f"{year}.")
        question = f"Text: {sentence}\nWhere did {name} train? Reply with the city only."
        return question, {"kind": "word", "expected": city}, 16
    a, b, c = rng.sample(range(11, 99), 3)
    sentence = (f"The first shelf holds {a} jars, the second holds {b} jars, and the third "
                f"holds {c} jars.")
    question = f"{sentence} How many jars does the second shelf hold?"
    return _ask(rng, question), {"kind": "number", "expected": b}, 16


def structured(rng: random.Random, level: int) -> Made:
    name = rng.choice(NAMES)
    age = rng.randint(18, 80)
    city = rng.choice(CITIES)
    job = rng.choice(JOBS)
    if level == 1:
        question = (f"Return a JSON object with one key \"name\" whose value is \"{name}\". "
                    "Output only JSON.")
        expected: dict[str, Any] = {"name": name}
    elif level == 2:
        question = (f"{name} is {age} years old. Output a JSON object with keys \"name\" "
                    "(a string) and \"age\" (a number). Only JSON.")
        expected = {"name": name, "age": age}
    elif level == 3:
        question = (f"{name}, aged {age}, lives in {city}. Give a JSON object with the keys "
                    "\"name\", \"age\" and \"city\". JSON only, no explanation.")
        expected = {"name": name, "age": age, "city": city}
    else:
        question = (f"Record: {name}; works as a {job}; {age} years old; based in {city}. "
                    "Convert it into JSON with keys \"name\", \"job\", \"age\" (integer), "
                    "\"city\" and \"senior\" (true if age is over 60, else false).")
        expected = {"name": name, "job": job, "age": age, "city": city, "senior": age > 60}
    return question, {"kind": "json", "expected": expected}, 64


def code(rng: random.Random, level: int) -> Made:
    n = rng.randint(2, 9)
    options: list[tuple[str, str]]
    if level == 1:
        options = [("Write a Python function add(a, b) that returns a + b.",
                    "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
                   (f"Write a Python function times_{n}(x) that returns x multiplied by {n}.",
                    f"assert times_{n}(3) == {3 * n}\nassert times_{n}(0) == 0")]
    elif level == 2:
        options = [("Write a Python function is_even(n) that returns True if n is even.",
                    "assert is_even(4)\nassert not is_even(7)\nassert is_even(0)"),
                   ("Write a Python function maximum(xs) that returns the largest number in "
                    "the list xs.", "assert maximum([1, 5, 3]) == 5\nassert maximum([-2]) == -2")]
    elif level == 3:
        options = [("Write a Python function reverse_words(s) that returns the words of s in "
                    "reverse order, joined by single spaces.",
                    "assert reverse_words('a b c') == 'c b a'\n"
                    "assert reverse_words('hello world') == 'world hello'"),
                   ("Write a Python function count_vowels(s) that returns how many vowels "
                    "(a, e, i, o, u) the string s contains.",
                    "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0")]
    else:
        options = [("Write a Python function is_prime(n) returning True when n is a prime.",
                    "assert is_prime(2) and is_prime(13) and is_prime(97)\n"
                    "assert not is_prime(1) and not is_prime(91) and not is_prime(0)"),
                   ("Write a Python function rle(s) that run-length encodes s, e.g. "
                    "rle('aaabcc') == 'a3b1c2'.",
                    "assert rle('aaabcc') == 'a3b1c2'\nassert rle('') == ''\n"
                    "assert rle('z') == 'z1'"),
                   ("Write a Python function balanced(s) that returns True when the brackets "
                    "()[]{} in s are balanced.",
                    "assert balanced('([]{})')\nassert not balanced('(]')\n"
                    "assert not balanced('((')\nassert balanced('')")]
    question, tests = rng.choice(options)
    return question, {"kind": "code", "tests": tests}, 160


GREETINGS = ["hi", "hello!", "Hey, how are you?", "Good morning!", "thanks a lot",
             "Thank you, that helped.", "Tell me a joke.", "Say something nice.",
             "What's up?", "Can you wish me luck for my exam?", "I'm bored. Any ideas?",
             "Who are you?"]


def chitchat(rng: random.Random, level: int) -> Made:
    return rng.choice(GREETINGS), {"kind": "nonempty"}, 32


def comparison(rng: random.Random, level: int) -> Made:
    if level == 1:
        a, b = rng.sample(range(1, 20), 2)
        question = rng.choice([f"Which is larger, {a} or {b}?",
                               f"Which number is bigger: {a} or {b}?"])
        return question, {"kind": "choice", "expected": str(max(a, b)),
                          "options": [str(a), str(b)], "pick": "first"}, 16
    if level == 2:
        start, step = rng.randint(1, 10), rng.randint(2, 5)
        seq = [start + step * i for i in range(4)]
        question = f"What number comes next: {', '.join(map(str, seq))}, ?"
        return _ask(rng, question), {"kind": "number", "expected": seq[-1] + step}, 16
    if level == 3:
        k = rng.randint(2, 5)
        seq = [(i + k) ** 2 for i in range(4)]
        question = f"Continue the sequence {', '.join(map(str, seq))}. What is the next term?"
        return _ask(rng, question), {"kind": "number", "expected": (4 + k) ** 2}, 16
    n = rng.choice([51, 57, 87, 91, 93, 97, 89, 83, 77, 79, 119, 113])
    prime = all(n % d for d in range(2, int(n ** 0.5) + 1))
    question = f"Is {n} a prime number? Answer yes or no."
    return question, {"kind": "yes_no", "expected": "yes" if prime else "no"}, 12


def units(rng: random.Random, level: int) -> Made:
    if level == 1:
        h = rng.randint(2, 9)
        question, value = f"How many minutes are in {h} hours?", 60 * h
    elif level == 2:
        m = rng.randint(2, 9)
        question, value = f"How many centimeters are in {m} meters?", 100 * m
    elif level == 3:
        d = rng.randint(2, 6)
        question, value = f"How many seconds are in {d} days?", 86400 * d
    else:
        f = rng.choice([50, 59, 68, 77, 86, 95, 104, 113, 122])
        question, value = f"Convert {f} degrees Fahrenheit to Celsius.", (f - 32) * 5 // 9
    return _ask(rng, question), {"kind": "number", "expected": value}, 32


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def calendar(rng: random.Random, level: int) -> Made:
    i = rng.randrange(7)
    if level == 1:
        question, value = f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]
    elif level == 2:
        question, value = f"What day comes before {DAYS[i]}?", DAYS[(i - 1) % 7]
    elif level == 3:
        k = rng.randint(2, 5)
        question, value = f"If today is {DAYS[i]}, what day will it be in {k} days?", \
            DAYS[(i + k) % 7]
    else:
        k = rng.randint(9, 30)
        question, value = f"Today is {DAYS[i]}. What day of the week is it {k} days from " \
            "now?", DAYS[(i + k) % 7]
    return question + " Reply with the day.", {"kind": "choice", "expected": value,
                                                "options": DAYS, "pick": "last"}, 12


FAMILIES: dict[str, Family] = {
    "arithmetic": arithmetic, "word_problem": word_problem, "lookup": lookup,
    "strings": strings, "extraction": extraction, "structured": structured, "code": code,
    "chitchat": chitchat, "comparison": comparison, "units": units, "calendar": calendar,
}


# --------------------------------------------------------------------------- more families
# Added for issue 17's second round. They are the benchmark's second batch: a model fitted
# on the eleven families above is scored on these, which were written (and labelled) before
# any of the classifier's features or settings were tried on them. (The third batch, written
# blind, is in tasks_third.)


def percent(rng: random.Random, level: int) -> Made:
    if level == 1:
        base = rng.choice([20, 40, 60, 80, 100, 200])
        pct = rng.choice([50, 10])
    elif level == 2:
        base, pct = rng.randint(2, 9) * 100, rng.choice([10, 20, 25])
    elif level == 3:
        base, pct = rng.randint(3, 19) * 20, rng.choice([15, 35, 45])
    else:
        base, pct = rng.randint(11, 49) * 100, rng.choice([13, 17, 23, 37])
    value = base * pct / 100
    question = rng.choice([f"What is {pct}% of {base}?", f"Find {pct} percent of {base}.",
                           f"How much is {pct}% of {base}?"])
    return _ask(rng, question), {"kind": "number", "expected": value}, 24


NUMERIC_FACTS = {
    1: [("How many days are in a week?", 7), ("How many legs does a dog have?", 4),
        ("How many hours are in a day?", 24), ("How many wheels does a bicycle have?", 2)],
    2: [("How many legs does a spider have?", 8), ("How many continents are there?", 7),
        ("How many months have 31 days?", 7), ("How many sides does a hexagon have?", 6)],
    3: [("How many bones are in the adult human body?", 206),
        ("In what year did humans first land on the Moon?", 1969),
        ("How many players are on a soccer team on the field?", 11),
        ("How many keys does a standard piano have?", 88)],
    4: [("At what temperature in Fahrenheit does water boil at sea level?", 212),
        ("In what year did the Berlin Wall fall?", 1989),
        ("How many US states are there?", 50),
        ("How many squares are on a chessboard's board, 8 by 8?", 64)],
}


def trivia_number(rng: random.Random, level: int) -> Made:
    question, value = rng.choice(NUMERIC_FACTS[level])
    return _ask(rng, question), {"kind": "number", "expected": value}, 24


TRANSLATIONS = {
    1: [("hello", "French", "bonjour"), ("yes", "Spanish", "si"), ("thank you", "French",
        "merci"), ("no", "German", "nein")],
    2: [("dog", "French", "chien"), ("cat", "Spanish", "gato"), ("water", "German", "wasser"),
        ("house", "Spanish", "casa")],
    3: [("butterfly", "French", "papillon"), ("apple", "German", "apfel"),
        ("library", "Spanish", "biblioteca"), ("cheese", "French", "fromage")],
    4: [("strawberry", "French", "fraise"), ("hedgehog", "German", "igel"),
        ("wheelbarrow", "Spanish", "carretilla"), ("lighthouse", "French", "phare")],
}


def translation(rng: random.Random, level: int) -> Made:
    word, language, expected = rng.choice(TRANSLATIONS[level])
    question = rng.choice([f"How do you say '{word}' in {language}?",
                           f"Translate '{word}' into {language}. One word.",
                           f"What is the {language} word for '{word}'?"])
    return question, {"kind": "word", "expected": expected}, 16


SENTENCE_WORDS = ["the", "old", "man", "walked", "slowly", "to", "a", "quiet", "river",
                  "and", "sat", "down", "under", "green", "tree", "with", "his", "small", "dog"]


def word_count(rng: random.Random, level: int) -> Made:
    n = {1: rng.randint(2, 3), 2: rng.randint(4, 6), 3: rng.randint(7, 10),
         4: rng.randint(12, 18)}[level]
    sentence = " ".join(rng.choice(SENTENCE_WORDS) for _ in range(n))
    question = rng.choice([f"How many words are in this sentence: \"{sentence}\"?",
                           f"Count the words in \"{sentence}\"."])
    return _ask(rng, question), {"kind": "number", "expected": n}, 24


def ordering(rng: random.Random, level: int) -> Made:
    if level == 1:
        xs = rng.sample(range(1, 10), 3)
        question, value = f"Which is the smallest of {', '.join(map(str, xs))}?", min(xs)
    elif level == 2:
        xs = rng.sample(range(10, 100), 4)
        question, value = f"What is the largest number in this list: {xs}?", max(xs)
    elif level == 3:
        xs = rng.sample(range(10, 100), 5)
        question, value = (f"Sort {', '.join(map(str, xs))} from smallest to largest. "
                           "What is the middle number?", sorted(xs)[2])
    else:
        xs = rng.sample(range(100, 1000), 7)
        question, value = (f"Order these numbers from largest to smallest and tell me the "
                           f"second one: {', '.join(map(str, xs))}.", sorted(xs)[-2])
    return _ask(rng, question), {"kind": "number", "expected": value}, 24


YES_NO = {
    1: [("Is the sun a star?", "yes"), ("Is ice cold?", "yes"), ("Can fish swim?", "yes"),
        ("Is fire wet?", "no")],
    2: [("Is a whale a fish?", "no"), ("Is a tomato a fruit?", "yes"),
        ("Do penguins fly?", "no"), ("Is Mount Everest in Asia?", "yes")],
    3: [("Is 91 divisible by 7?", "yes"), ("Is 2023 a leap year?", "no"),
        ("Is 0.5 greater than 0.45?", "yes"), ("Is 144 a perfect square?", "yes")],
    4: [("Is 391 divisible by 17?", "yes"), ("Is 1900 a leap year?", "no"),
        ("Is 0.3 greater than 0.29 and less than 0.31?", "yes"),
        ("Is 221 a prime number?", "no")],
}


def yes_no(rng: random.Random, level: int) -> Made:
    question, expected = rng.choice(YES_NO[level])
    return question + rng.choice([" Answer yes or no.", " Yes or no?", ""]), \
        {"kind": "yes_no", "expected": expected}, 12


OPPOSITES = {1: [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night")],
             2: [("happy", "sad"), ("fast", "slow"), ("early", "late"), ("full", "empty")],
             3: [("ancient", "modern"), ("victory", "defeat"), ("expand", "contract"),
                 ("generous", "stingy")],
             4: [("ascend", "descend"), ("optimist", "pessimist"), ("scarce", "abundant"),
                 ("transparent", "opaque")]}


def opposite(rng: random.Random, level: int) -> Made:
    word, expected = rng.choice(OPPOSITES[level])
    question = rng.choice([f"What is the opposite of '{word}'?",
                           f"Give an antonym of '{word}'. One word.",
                           f"What word means the opposite of {word}?"])
    return question, {"kind": "word", "expected": expected}, 12


PHRASES = ["as soon as possible", "by the way", "for your information", "in my opinion",
           "frequently asked questions", "do it yourself", "laugh out loud",
           "to be determined", "personal identification number", "end of day"]


def acronym(rng: random.Random, level: int) -> Made:
    if level <= 2:
        phrase = rng.choice(PHRASES)
    else:
        count = 4 if level == 3 else 6
        phrase = " ".join(rng.sample(SENTENCE_WORDS + WORDS, count))
    expected = "".join(w[0] for w in phrase.split()).upper()
    question = rng.choice([f"Make an acronym from the first letters of \"{phrase}\".",
                           f"What are the initials of the phrase \"{phrase}\", in capitals?"])
    return question + " Reply with the acronym only.", {"kind": "token", "expected": expected}, 12


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def months(rng: random.Random, level: int) -> Made:
    i = rng.randrange(12)
    if level == 1:
        question, value = f"Which month comes after {MONTHS[i]}?", MONTHS[(i + 1) % 12]
    elif level == 2:
        question, value = f"Which month comes right before {MONTHS[i]}?", MONTHS[(i - 1) % 12]
    elif level == 3:
        k = rng.randint(3, 8)
        question, value = f"What month is it {k} months after {MONTHS[i]}?", MONTHS[(i + k) % 12]
    else:
        j = (i + 1) % 12
        a, b = rng.randint(1, 28), rng.randint(1, 28)
        days = MONTH_DAYS[i] - a + b
        question = (f"How many days are there from {MONTHS[i]} {a} to {MONTHS[j]} {b} "
                    "(not a leap year)? Answer with the number.")
        return question, {"kind": "number", "expected": days}, 24
    return question + " Reply with the month.", {"kind": "choice", "expected": value,
                                                  "options": MONTHS, "pick": "last"}, 16


REQUESTS = ["Suggest a name for my new goldfish.", "Write a one-line birthday wish for my "
            "sister.", "Give me a fun fact.", "Recommend a movie for tonight.",
            "Say good night to me.", "Write a haiku about rain.",
            "Give me a short motivational quote.", "Describe the sea in one sentence.",
            "What should I cook for dinner?", "Tell me something about cats.",
            "Write a friendly out-of-office reply.", "Cheer me up, please."]


def creative(rng: random.Random, level: int) -> Made:
    return rng.choice(REQUESTS), {"kind": "nonempty"}, 48


def list_sum(rng: random.Random, level: int) -> Made:
    count, low, high = {1: (2, 1, 9), 2: (3, 1, 9), 3: (4, 10, 50), 4: (6, 10, 99)}[level]
    xs = [rng.randint(low, high) for _ in range(count)]
    question = rng.choice([f"Add up these numbers: {', '.join(map(str, xs))}.",
                           f"What is the sum of {', '.join(map(str, xs))}?",
                           f"What do {', '.join(map(str, xs[:-1]))} and {xs[-1]} add up to?"])
    return _ask(rng, question), {"kind": "number", "expected": sum(xs)}, 24


def letters(rng: random.Random, level: int) -> Made:
    word = rng.choice(WORDS)
    if level == 1:
        question = f"Does the word '{word}' start with the letter '{word[0]}'? Yes or no."
        return question, {"kind": "yes_no", "expected": "yes"}, 12
    if level == 2:
        question, value = f"How many letters are in the word '{word}'?", len(word)
        return _ask(rng, question), {"kind": "number", "expected": value}, 16
    if level == 3:
        k = rng.randint(2, 5)
        ordinal = {2: "second", 3: "third", 4: "fourth", 5: "fifth"}[k]
        question = f"What is the {ordinal} letter of the word '{word}'? Just the letter."
        return question, {"kind": "word", "expected": word[k - 1]}, 8
    vowels = sum(ch in "aeiou" for ch in word)
    question = f"How many vowels does the word '{word}' contain?"
    return _ask(rng, question), {"kind": "number", "expected": vowels}, 16


NEW_FAMILIES: dict[str, Family] = {
    "percent": percent, "trivia_number": trivia_number, "translation": translation,
    "word_count": word_count, "ordering": ordering, "yes_no": yes_no, "opposite": opposite,
    "acronym": acronym, "months": months, "creative": creative, "list_sum": list_sum,
    "letters": letters,
}
FAMILIES.update(NEW_FAMILIES)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Keep answers short.",
    "You are Ada, the support assistant of a small online shop that sells garden tools. Be "
    "friendly, answer in plain English, and never promise delivery dates. If a question is "
    "outside your knowledge, say so honestly.",
]
DISTRACTORS = [
    "Some context first: our team meets every Thursday at ten, and the notes from the last "
    "meeting are in the shared folder. Nobody needs to read them for this.",
    "Background: the weather was rainy all week, the office coffee machine is broken again, "
    "and the quarterly report is due next month. Unrelated to my question, but that is the "
    "mood here. Over the weekend I repainted the fence and planted tulips along the path.",
    "I'm writing from the train, so sorry for typos.",
]
HISTORY = [
    [("user", "Can you show me a hello world in Python?"),
     ("assistant", "Sure:\n```python\nprint('hello world')\n```")],
    [("user", "What's a good name for a cat?"), ("assistant", "How about Miso or Pepper?")],
    [("user", "Explain recursion in one sentence."),
     ("assistant", "Recursion is when a function solves a problem by calling itself on "
                   "smaller versions of the same problem.")],
]


def frame(rng: random.Random, question: str) -> list[dict[str, str]]:
    """The messages around a question: a system prompt, earlier turns and an unrelated
    preamble, each drawn on its own (so neither length nor a code block in an earlier turn
    says anything about the question's difficulty)."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.3:
        for role, content in rng.choice(HISTORY):
            messages.append({"role": role, "content": content})
    if rng.random() < 0.3:
        question = f"{rng.choice(DISTRACTORS)}\n\n{question}"
    if rng.random() < 0.1:
        question = question.lower()  # people type like that too
    messages.append({"role": "user", "content": question})
    return messages


def every_family() -> dict[str, Family]:
    """The 23 families above, then the third batch (tasks_third, which imports this module:
    hence imported here, not at the top). Appended, so the first 23 families' tasks stay
    what they were for a seed."""
    from exporter.routing.learn.tasks_third import THIRD_FAMILIES

    return {**FAMILIES, **THIRD_FAMILIES}


def generate(per_family: int = 80, seed: int = 17,
             families: dict[str, Family] | None = None) -> Iterator[dict[str, Any]]:
    """`per_family` tasks of every family, levels evenly spread (chit-chat has one level)."""
    rng = random.Random(seed)
    for name, make in (every_family() if families is None else families).items():
        levels = [1] if name in ("chitchat", "creative") else [1, 2, 3, 4]
        for i in range(per_family):
            level = levels[i % len(levels)]
            question, check, max_tokens = make(rng, level)
            body = {"messages": frame(rng, question), "max_tokens": max_tokens,
                    "temperature": 0, "seed": 0}
            yield {"id": f"{name}-{i}", "family": name, "level": level, "body": body,
                   "check": check}
