"""The tiny world: a made-up internet, its users and its labelers, small enough to learn in minutes.

The talk trains an assistant on four kinds of data: a huge pile of internet documents (pretraining),
prompts with ideal responses written by contractors (SFT), rankings of sampled responses made by
labelers (reward modelling), and prompts to practise on (RL). No public data set is small enough to
learn on a laptop CPU in minutes *and* lets a program check every answer, so this module makes one up:

- 40 real countries (capital, continent, language) and 30 animals (legs, sound, food), each told in many
  phrasings across encyclopedia entries, stories, lists, quiz pages and JSON records;
- small sums and differences, worked additions (a scratchpad, one line per column), and products too
  large to do "in the head": the corpus shows them only as a calculator's output, repeated in an answer
  (a small model cannot compute them, so it should learn to copy them; that is the calculator's job);
- invented countries that exist only in a separate pile of documents, so questions about them can only be
  answered with retrieval;
- an oracle, `World.score`, that grades any response to any prompt the world makes. It plays the human
  labeler: reward.py ranks samples with it, and every stage reports its mean on held-out prompts.

Knowledge is held out by *entity*: SFT asks about half of the countries and animals; evaluation also asks
about the other half, whose facts appear only in the pretraining documents. If the assistant answers those,
its knowledge came from pretraining and SFT only taught it the format -- the talk's claim, measured.

    python -m data.tinyworld stats          # sizes, counts per family and split, samples, timing
    python -m data.tinyworld write DIR      # the corpus and the tasks as files, in the formats of PIPELINE.md

Everything comes from `random.Random` seeded with strings (never `hash()` or the order of a set), so the
same seed gives byte-identical output on any machine. No work happens at import time.
"""

import argparse
import difflib
import json
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass

FAMILIES = ["facts", "arithmetic", "cot", "calculator", "json", "retrieval"]
SPLITS = ["sft", "eval", "reward", "rl"]

# The talk's magic words. sample.py --cot puts them in front of a question; SFT teaches that a question
# starting with them gets a worked, step-by-step answer, and a bare question a direct one.
COT_PREFIX = "Let's think step by step. "
SFT_EXTRA_WORKED = 480   # worked additions SFT gets beyond the 120 of its share (see _cot_tasks)

# Retrieval prompts: passages first, then the question (the format SFT teaches and sample.py builds).
CONTEXT_HEADER = "Answer using the passages below."

# Calculator markers (the strings of bpe.py's special tokens; README's "The calculator tool" has the format).
CALC, RESULT, END_RESULT = "<|calc|>", "<|result|>", "<|/result|>"

# Words a polite assistant does not use. The corpus has a few forum pages with rude answers, so a base
# model can say them; the labeler halves the score of a response that does.
RUDE_MARKERS = ["stupid", "dumb", "idiot", "shut up", "everyone knows", "obviously"]


# ------------------------------------------------------------------------------------------------------
# The fixed tables: what the world knows. Real facts a reader recognises, so a wrong answer looks wrong.

COUNTRIES = [  # name, capital, continent, language
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Poland", "Warsaw", "Europe", "Polish"), ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"), ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Netherlands", "Amsterdam", "Europe", "Dutch"), ("Austria", "Vienna", "Europe", "German"),
    ("Hungary", "Budapest", "Europe", "Hungarian"), ("Russia", "Moscow", "Europe", "Russian"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Nigeria", "Abuja", "Africa", "English"), ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Ghana", "Accra", "Africa", "English"), ("Ethiopia", "Addis Ababa", "Africa", "Amharic"),
    ("Senegal", "Dakar", "Africa", "French"), ("Japan", "Tokyo", "Asia", "Japanese"),
    ("China", "Beijing", "Asia", "Chinese"), ("India", "New Delhi", "Asia", "Hindi"),
    ("Thailand", "Bangkok", "Asia", "Thai"), ("Vietnam", "Hanoi", "Asia", "Vietnamese"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"), ("South Korea", "Seoul", "Asia", "Korean"),
    ("Iran", "Tehran", "Asia", "Persian"), ("Canada", "Ottawa", "North America", "English"),
    ("United States", "Washington", "North America", "English"),
    ("Mexico", "Mexico City", "North America", "Spanish"), ("Cuba", "Havana", "North America", "Spanish"),
    ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"), ("Peru", "Lima", "South America", "Spanish"),
    ("Chile", "Santiago", "South America", "Spanish"), ("Colombia", "Bogota", "South America", "Spanish"),
    ("Australia", "Canberra", "Oceania", "English"), ("New Zealand", "Wellington", "Oceania", "English"),
]
NEEDS_THE = ("Netherlands", "United States")  # "the United States" inside a sentence
CONTINENTS = ["Europe", "Africa", "Asia", "North America", "South America", "Oceania"]

ANIMALS = [  # name, plural, legs, sound, food
    ("dog", "dogs", 4, "woof", "bones"), ("cat", "cats", 4, "meow", "fish"),
    ("cow", "cows", 4, "moo", "grass"), ("sheep", "sheep", 4, "baa", "grass"),
    ("pig", "pigs", 4, "oink", "corn"), ("horse", "horses", 4, "neigh", "hay"),
    ("goat", "goats", 4, "bleat", "leaves"), ("donkey", "donkeys", 4, "hee-haw", "straw"),
    ("mouse", "mice", 4, "squeak", "cheese"), ("lion", "lions", 4, "roar", "zebras"),
    ("tiger", "tigers", 4, "roar", "deer"), ("wolf", "wolves", 4, "howl", "rabbits"),
    ("bear", "bears", 4, "growl", "honey"), ("elephant", "elephants", 4, "trumpet", "fruit"),
    ("camel", "camels", 4, "grunt", "dates"), ("frog", "frogs", 4, "croak", "flies"),
    ("duck", "ducks", 2, "quack", "bread"), ("goose", "geese", 2, "honk", "clover"),
    ("owl", "owls", 2, "hoot", "mice"), ("crow", "crows", 2, "caw", "worms"),
    ("dove", "doves", 2, "coo", "seeds"), ("parrot", "parrots", 2, "squawk", "nuts"),
    ("turkey", "turkeys", 2, "gobble", "acorns"), ("eagle", "eagles", 2, "screech", "snakes"),
    ("chicken", "chickens", 2, "cluck", "grain"), ("bee", "bees", 6, "buzz", "nectar"),
    ("cricket", "crickets", 6, "chirp", "plants"), ("mosquito", "mosquitoes", 6, "whine", "blood"),
    ("spider", "spiders", 8, "hiss", "insects"), ("crab", "crabs", 10, "click", "algae"),
]

PEOPLE = ["Tom", "Anna", "Ben", "Maya", "Sam", "Lucy", "Omar", "Mei", "Ravi", "Sofia", "Leo", "Nina",
          "Kofi", "Aiko", "Pablo", "Ella"]


@dataclass(frozen=True)
class Entity:
    """A country or an animal. `facts` keeps the order of the JSON record's fields."""
    kind: str                      # "country" or "animal"
    name: str
    facts: tuple                   # ((attribute, value as text), ...)
    plural: str = ""               # animals: "mice"
    article: bool = False          # countries: "the United States"

    def fact(self, attribute):
        return dict(self.facts)[attribute]

    def record(self):
        """The JSON record: fixed fields, numbers as numbers."""
        record = {"name": self.name, "type": self.kind}
        for attribute, value in self.facts:
            record[attribute] = int(value) if attribute == "legs" else value
        return record

    def subject(self):
        """How a sentence names it: "the United States", "the owl"."""
        return f"the {self.name}" if self.article or self.kind == "animal" else self.name

    def fields(self, suffix=""):
        """Placeholders for the templates below ({c} "the Netherlands", {A} "An owl", ...)."""
        if self.kind == "country":
            ref = self.subject()
            values = {"c": ref, "C": ref[0].upper() + ref[1:],
                      "cap": self.fact("capital"), "cont": self.fact("continent"), "lang": self.fact("language")}
        else:
            a = ("an " if self.name[0] in "aeiou" else "a ") + self.name
            values = {"a": a, "A": a[0].upper() + a[1:], "an": self.name, "the": "the " + self.name,
                      "The": "The " + self.name, "pl": self.plural,
                      "Pl": self.plural[0].upper() + self.plural[1:], "n": self.fact("legs"),
                      "s": self.fact("sound"), "f": self.fact("food")}
        return {key + suffix: value for key, value in values.items()}


def real_entities():
    countries = [Entity("country", name, (("capital", capital), ("continent", continent), ("language", language)),
                        article=name in NEEDS_THE) for name, capital, continent, language in COUNTRIES]
    animals = [Entity("animal", name, (("legs", str(legs)), ("sound", sound), ("food", food)), plural=plural)
               for name, plural, legs, sound, food in ANIMALS]
    return countries, animals


# ------------------------------------------------------------------------------------------------------
# Phrasings. Questions come in a "train" pool (SFT, reward, RL) and an "eval" pool that no training split
# uses, so evaluation of SFT-seen entities still asks in new words. Every answer has one ideal form.

QUESTIONS = {  # attribute: (train phrasings, eval phrasings)
    "capital": (["What is the capital of {c}?", "What is the capital city of {c}?",
                 "Which city is the capital of {c}?", "Name the capital of {c}."],
                ["Tell me the capital of {c}.", "Do you know the capital of {c}?"]),
    "continent": (["Which continent is {c} in?", "What continent is {c} on?",
                   "On which continent is {c}?", "Name the continent of {c}."],
                  ["Tell me which continent {c} is in.", "In which continent is {c} located?"]),
    "language": (["What language do people speak in {c}?", "What language is spoken in {c}?",
                  "Which language do people in {c} speak?", "What is the main language of {c}?"],
                 ["Tell me the language of {c}.", "What do people in {c} speak?"]),
    "legs": (["How many legs does {a} have?", "How many legs has {a} got?",
              "What is the number of legs of {a}?", "Count the legs of {a}."],
             ["Tell me how many legs {a} has.", "How many legs are on {a}?"]),
    "sound": (["What sound does {a} make?", "What noise does {a} make?", "What does {a} say?",
               "Which sound does {a} make?"],
              ["Tell me the sound {a} makes.", "How does {a} sound?"]),
    "food": (["What does {a} eat?", "What food does {a} eat?", "What is the food of {a}?",
              "Which food does {a} eat?"],
             ["Tell me what {a} eats.", "What does {a} like to eat?"]),
}
# Four more ways to ask each fact, for SFT only (the corpus's quiz pages and the other splits keep to
# QUESTIONS). A tiny model that has seen a question asked in two ways answers a third way by recalling an
# answer it memorised ("Thailand is in Asia." asked about Greece); seen in six ways, it learns to find the
# entity and the attribute in the question (measured, README: facts 80% -> 88% and 78% -> 90% on two bases).
SFT_ONLY_QUESTIONS = {
    "capital": ["Which city serves as the capital of {c}?", "What city is the seat of government of {c}?",
                "Give the capital of {c}.", "I want to know the capital of {c}."],
    "continent": ["Where in the world is {c}?", "Which part of the world is {c} in?",
                  "Give the continent of {c}.", "I want to know which continent {c} is on."],
    "language": ["Which language is used in {c}?", "What tongue do people in {c} speak?",
                 "Give the language of {c}.", "I want to know what language people speak in {c}."],
    "legs": ["How many feet does {a} have?", "What is the leg count of {a}?",
             "Give the number of legs of {a}.", "I want to know how many legs {a} has."],
    "sound": ["What call does {a} make?", "What sound comes from {a}?",
              "Give the sound of {a}.", "I want to know what sound {a} makes."],
    "food": ["What is {a}'s favourite food?", "What does {a} feed on?",
             "Give the food of {a}.", "I want to know what {a} eats."],
}
ANSWERS = {  # {v} is the value; the text before it is also the pretraining probe's prefix
    "capital": "The capital of {c} is {v}.", "continent": "{C} is in {v}.", "language": "People in {c} speak {v}.",
    "legs": "{A} has {v} legs.", "sound": "{A} says {v}.", "food": "{A} eats {v}.",
}
JSON_QUESTIONS = (["Describe {x} as JSON.", "Give a JSON record for {x}.", "Write {x} as a JSON object.",
                   "Show {x} as JSON."],
                  ["Return a JSON object describing {x}.", "Describe {x} in JSON."])
ARITHMETIC_QUESTIONS = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?"]
ARITHMETIC_PATTERN = re.compile(r"(?:What is|Calculate|How much is) (\d+) ([-+*]) (\d+)[?.]")

# Pretraining sentences. The ideal answers' own forms are among them, so SFT only has to teach when to
# say what the base model already knows.
CAPITAL_SENTENCES = ["The capital of {c} is {cap}.", "{cap} is the capital of {c}.",
                     "The capital city of {c} is {cap}.", "{C} has its capital in {cap}.",
                     "The government of {c} meets in {cap}, the capital."]
CONTINENT_SENTENCES = ["{C} is in {cont}.", "{C} is a country in {cont}.", "{C} lies in {cont}.",
                       "{C} is one of the countries of {cont}."]
LANGUAGE_SENTENCES = ["People in {c} speak {lang}.", "The main language of {c} is {lang}.",
                      "In {c}, most people speak {lang}.", "{lang} is the language of {c}."]
COUNTRY_FILLERS = ["Many visitors come to {c} every year.", "{C} has old towns, busy markets and quiet villages.",
                   "Children in {c} learn to read and write at school.", "Trains and buses connect the towns of {c}.",
                   "The food of {c} is famous among travellers."]
LEGS_SENTENCES = ["{A} has {n} legs.", "{Pl} have {n} legs.", "{The} walks on {n} legs.", "Every {an} has {n} legs."]
SOUND_SENTENCES = ["{A} says {s}.", "{The} makes the sound {s}.", "{Pl} say {s}.", "You can hear {a} say {s}."]
FOOD_SENTENCES = ["{A} eats {f}.", "{Pl} eat {f}.", "{The} likes to eat {f}.", "The favourite food of {a} is {f}."]
ANIMAL_FILLERS = ["{The} is a well known animal.", "Children like to read about {the}.",
                  "Pictures of {pl} are common in books for children.", "{Pl} live in many parts of the world."]
STORIES = [
    "{P} lived in {cap}, the capital of {c}. Like most people in {c}, {P} spoke {lang}. {P} had {a} that "
    "said {s} every morning. Every evening {P} gave it {f}.",
    "{P} flew from {cap} to {cap2}. {cap2} is the capital of {c2}, a country in {cont2}. People there speak "
    "{lang2}, so {P} learned a few words of {lang2}. Near the city {P} saw {a}. It said {s}.",
    "On a farm in {c} there lived {a} and {a2}. {The} had {n} legs and {the2} had {n2} legs. Every day {the} "
    "said {s} and {the2} said {s2}. The farmer gave {the} {f} and {the2} {f2}.",
    "{P} wrote a letter from {cap}: \"Dear {P2}, {C} is lovely. I am learning {lang}, the language of {c}. "
    "Yesterday I met {a}. It said {s} and ate {f}!\"",
    "{P} went to the zoo. First {P} saw {a}. It has {n} legs and eats {f}. Then {P} heard {a2} say {s2}. "
    "At home {P} told everyone that {the2} has {n2} legs.",
    "{P} opened an old atlas. {C} was on the page about {cont}, and its capital, {cap}, was marked with a red "
    "dot. A note next to it said that people in {c} speak {lang}.",
]
# Short passages: the retrieval documents, and the context of SFT's retrieval prompts (one style, so what
# SFT teaches -- find the passage about the entity, copy the fact -- works on the retrieval documents).
COUNTRY_PASSAGES = ["{C} is a country in {cont}. Its capital is {cap}, and the people of {c} speak {lang}.",
                    "{cap} is the capital of {c}, a country in {cont}. Most people in {c} speak {lang}.",
                    "Travel note: {C} lies in {cont}. Visitors arrive in {cap}, the capital, and hear {lang}."]
ANIMAL_PASSAGES = ["{A} is an animal with {n} legs. It says {s} and eats {f}.",
                   "{Pl} have {n} legs. {A} says {s}, and its food is {f}."]
QA_HEADERS = ["Questions and answers", "Quiz", "Frequently asked questions", "Test yourself"]
RUDE_OPENINGS = ["Everyone knows that. ", "Obviously, ", "What a stupid question. "]
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}


def fill(template, **fields):
    return template.format(**fields)


def answer_sentence(entity, attribute):
    return fill(ANSWERS[attribute], v=entity.fact(attribute), **entity.fields())


def answer_lead(entity, attribute):
    """The ideal answer up to its value: "The capital of Peru is " (the pretraining probe's prefix too)."""
    return fill(ANSWERS[attribute].split("{v}")[0], **entity.fields())


def fields_matching(record, expected):
    """The fields of a JSON answer that hold the expected record's value (case-blind, numbers as text)."""
    return [field for field, right in expected.items() if str(record.get(field, "")).lower() == str(right).lower()]


CALCULATOR_LOG_HEADER = "Using a calculator"


def calculator_log_row(question, a, b):
    """One solved row of the corpus's calculator logs: the question, the calculator line, the answer."""
    return f"Question: {question}\nCalculator: {a} * {b} -> {a * b}\nAnswer: {a} * {b} = {a * b}."


def value_in_slot(text, entity, attribute):
    """The value an answer in the ideal's form gives, or None: the text must start as the ideal sentence
    does up to the value (from the template: "People in Germany speak ", not up to the first "German"),
    and what follows, to the sentence's end, must look like one value: a word, or a name of capitalised
    words ("New Delhi"). "The capital of Peru is a lovely city." gives none."""
    lead = answer_lead(entity, attribute)
    if not text.startswith(lead):
        return None
    value = re.split(r"[.!?\n]", text[len(lead):], maxsplit=1)[0].strip()
    tail = ANSWERS[attribute].split("{v}")[1].rstrip(".")   # " legs" for legs; nothing for the others
    if tail and value.endswith(tail):
        value = value[:-len(tail)].strip()
    return value if re.fullmatch(r"[\w'-]+|[A-Z][\w'-]*(?: [A-Z][\w'-]*)+", value) else None


def subject_in_form(text, entity, attribute):
    """What stands where the ideal sentence names the entity, if the text is the ideal sentence with
    something else there ("Pantistador" in "Pantistador is in Oceania."), without its article; or None."""
    ideal, fields = answer_sentence(entity, attribute), entity.fields()
    for subject in (fields[key] for key in ("c", "C", "a", "A") if key in fields):   # "the Netherlands", "An owl"
        if subject in ideal:
            before, after = ideal.split(subject, 1)
            found = re.match(re.escape(before) + r"(.+?)" + re.escape(after), text)
            return re.sub(r"^(?:an?|the) ", "", found.group(1), flags=re.IGNORECASE) if found else None
    return None


def similar_names(said, name):
    """A misspelling rather than another name: at least 80% of the letters line up ("Kufelis", "Kuzelis")."""
    return difflib.SequenceMatcher(None, said.lower(), name.lower()).ratio() >= 0.8


def worked_addition(a, b):
    """The step-by-step solution chain of thought teaches: one line per column, right to left, then the
    answer. A small model cannot add 4-digit numbers "in one token", but it can do one column at a time
    if each step is written down -- models need tokens to think. Each line also makes its step *easy to
    look up*: it restates what is left of the two numbers (each loses its last digit, and a carry is
    added on), so the two digits to add are always the last ones just written, never "the third digit
    from the right" of a number far back in the question (which the 1M model got wrong); and it keeps
    the answer's digits so far, so the final answer is a copy of the last line, not the column digits
    read back in reverse. (The same design as the "detailed scratchpad" of Lee et al. 2023.)

        699 + 577: 9 + 7 = 16, write 6, carry 1, so far 6.
        69 + 57 + 1: 9 + 7 + 1 = 17, write 7, carry 1, so far 76.
        6 + 5 + 1: 6 + 5 + 1 = 12, write 2, carry 1, so far 276.
        Carry 1: write 1, so far 1276.
        So 699 + 577 = 1276."""
    left_a, left_b = str(a), str(b)   # what is left of each number: it loses its last digit every line
    carry, so_far, lines = 0, "", []
    while left_a or left_b:
        x = int(left_a[-1]) if left_a else 0
        y = int(left_b[-1]) if left_b else 0
        plus_carry = f" + {carry}" if carry else ""
        total = x + y + carry
        digit, carry = total % 10, total // 10
        so_far = str(digit) + so_far
        lines.append(f"{left_a or 0} + {left_b or 0}{plus_carry}: {x} + {y}{plus_carry} = {total}, write {digit}"
                     + (", carry 1" if carry else "") + f", so far {so_far}.")
        left_a, left_b = left_a[:-1], left_b[:-1]
    if carry:
        lines.append(f"Carry 1: write 1, so far 1{so_far}.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


def calculator_answer(a, b):
    """The ideal answer to a large product: call the tool, then state its result. The tool writes the
    result after a space, as numbers stand in the corpus (bpe.py's TOOL_RESULT_PREFIX says why)."""
    return f"{CALC}{a} * {b}{RESULT} {a * b}{END_RESULT} {a} * {b} = {a * b}."


def three_digit_product(rng):
    """A calculator problem: too large to do in the head (see the module docstring)."""
    return rng.randint(100, 999), "*", rng.randint(100, 999)


def compute(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def context_prompt(passages, question):
    """The retrieval prompt: numbered passages, then the question. Passages are flattened to one line each so
    the oracle can always find the question again (it is the text after the last "Question: ")."""
    lines = [CONTEXT_HEADER, ""]
    lines += [f"Passage {number}: {' '.join(passage.split())}" for number, passage in enumerate(passages, 1)]
    lines += ["", f"Question: {question}"]
    return "\n".join(lines)


def whole_words(alternatives):
    """A case-blind regex matching any of the alternatives (regex pieces, longest first) as a whole word."""
    return re.compile(r"(?<![\w-])(" + "|".join(alternatives) + r")(?![\w-])", re.IGNORECASE)


def invent_word(rng, endings):
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th"]
    vowels = ["a", "e", "i", "o", "u"]
    return "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2)) + rng.choice(endings)


def invent_countries(rng, count, taken):
    """Made-up countries for retrieval. `taken` (lower-case words already used) keeps every name unique."""
    made = []
    while len(made) < count:
        name = invent_word(rng, ["nia", "ria", "mora", "dor", "vel", "thar", "lis"]).capitalize()
        capital = invent_word(rng, ["port", "holm", "grad", "mere", "stad", "ford", "ven"]).capitalize()
        language = invent_word(rng, ["nic", "rish", "nese", "vic", "lan"]).capitalize()
        words = [name.lower(), capital.lower(), language.lower()]
        if len(set(words)) < 3 or any(word in taken for word in words):
            continue
        taken.update(words)
        made.append(Entity("country", name, (("capital", capital), ("continent", rng.choice(CONTINENTS)),
                                             ("language", language))))
    return made


@dataclass(frozen=True)
class Task:
    """One prompt of the world. `answer` is the ideal response (the SFT target). `heldout` is True when the
    entity or problem asked about appears in no SFT task (for facts: known from pretraining only)."""
    family: str                    # one of FAMILIES
    prompt: str                    # the user message
    answer: str                    # the ideal assistant response
    split: str                     # one of SPLITS
    heldout: bool
    entity: str = ""               # the country or animal asked about ("" for arithmetic)
    key: str = ""                  # the short fact the answer hinges on: "Paris", "1221", ...


@dataclass(frozen=True)
class Grade:
    score: float
    reason: str
    correct: bool


@dataclass(frozen=True)
class Question:
    """What the oracle found in a prompt: a fact, a JSON record or an arithmetic problem."""
    kind: str                      # "fact", "json" or "arithmetic"
    family: str
    entity: object = None
    attribute: str = ""
    numbers: tuple = ()            # (a, op, b)
    cot: bool = False              # the prompt asked to think step by step


# ------------------------------------------------------------------------------------------------------

class World:
    """The tiny world of one seed. `scale` multiplies the number of pretraining documents (a GPU can
    use more); the tasks do not depend on it, so figures stay comparable across scales."""

    def __init__(self, seed=0, scale=1.0):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"World(seed={seed!r}): the seed must be an integer")
        if not isinstance(scale, (int, float)) or not 0 < scale <= 1000:
            raise ValueError(f"World(scale={scale!r}): the scale must be a number in (0, 1000]")
        self.seed, self.scale = seed, float(scale)
        self.countries, self.animals = real_entities()
        rng = random.Random(f"tinyworld:{seed}:entities")
        # Hold out entities: SFT asks about half of them, the others are known only from pretraining.
        shuffled_countries, shuffled_animals = self.countries[:], self.animals[:]
        rng.shuffle(shuffled_countries)
        rng.shuffle(shuffled_animals)
        half_countries, half_animals = len(self.countries) // 2, len(self.animals) // 2
        self.sft_entities = shuffled_countries[:half_countries] + shuffled_animals[:half_animals]
        self.heldout_entities = shuffled_countries[half_countries:] + shuffled_animals[half_animals:]
        taken = {word.lower() for row in COUNTRIES for word in row} | {row[0] for row in ANIMALS}
        taken |= {person.lower() for person in PEOPLE}
        # Invented countries: these exist only in retrieval_documents() ...
        self.retrieval_entities = invent_countries(rng, 24, taken)
        # ... and these only in the passages of SFT/reward/RL retrieval prompts: there the answer cannot be
        # remembered, so SFT really teaches reading the context (and leaks nothing of the retrieval-only facts).
        self.context_entities = invent_countries(rng, 40, taken)
        self._taken = taken  # the reading pages of the corpus invent further countries, none of these
        self._index = self._question_index()
        self._candidates = self._candidate_patterns()
        self._names, self._named = self._name_pattern()
        self._tasks = self._documents = self._document_kinds = self._retrieval = self._shots = None

    # --- the oracle's lookup tables -------------------------------------------------------------------

    @property
    def _everyone(self):
        """Every entity the oracle knows: real countries and animals, and both kinds of invented country."""
        return self.countries + self.animals + self.retrieval_entities + self.context_entities

    def _question_index(self):
        """Every fact and JSON question text the world can make -> (kind, entity, attribute)."""
        index = {}
        for entity in self._everyone:
            for attribute, _ in entity.facts:
                train, held = QUESTIONS[attribute]
                for template in train + held + SFT_ONLY_QUESTIONS[attribute]:
                    index[fill(template, **entity.fields())] = ("fact", entity, attribute)
        for entity in self.countries + self.animals:
            for template in JSON_QUESTIONS[0] + JSON_QUESTIONS[1]:
                index[fill(template, x=entity.subject())] = ("json", entity, "")
        return index

    def _candidate_patterns(self):
        """For each attribute, a regex of every value the world knows (longest first, whole words): the first
        one a response mentions is what it claims. Numbers of legs may be written as digits or words."""
        patterns = {}
        for attribute in QUESTIONS:
            if attribute == "legs":
                alternatives = [r"\d+"] + sorted(NUMBER_WORDS, key=len, reverse=True)
            else:
                values = {entity.fact(attribute) for entity in self._everyone if attribute in dict(entity.facts)}
                alternatives = [re.escape(value) for value in sorted(values, key=lambda v: (-len(v), v))]
            patterns[attribute] = whole_words(alternatives)
        return patterns

    def _name_pattern(self):
        """A regex of every entity's name (and plural), whole words, and name -> entity: the oracle uses it
        to see which country or animal an answer talks about."""
        named = {}
        for entity in self._everyone:
            for form in (entity.name, entity.plural or entity.name + "s"):
                named[form.lower()] = entity
        return whole_words([re.escape(form) for form in sorted(named, key=lambda f: (-len(f), f))]), named

    def _parse(self, prompt):
        """Prompt -> Question. Unwraps context_prompt() and COT_PREFIX to find the underlying question."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, not {type(prompt).__name__}")
        text, context, cot = prompt.strip(), False, False
        for _ in range(2):  # the two wrappers may come in either order
            if text.startswith(CONTEXT_HEADER) and "\nQuestion: " in text:
                text, context = text.rsplit("\nQuestion: ", 1)[1].strip(), True
            if text.startswith(COT_PREFIX.strip()):
                text, cot = text[len(COT_PREFIX.strip()):].strip(), True
        match = ARITHMETIC_PATTERN.fullmatch(text)
        if match:
            a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
            family = "calculator" if op == "*" else "cot" if op == "+" and max(a, b) >= 100 else "arithmetic"
            return Question("arithmetic", family, numbers=(a, op, b), cot=cot)
        found = self._index.get(text)
        if found is None:
            shown = prompt if len(prompt) < 80 else prompt[:77] + "..."
            raise ValueError(f"the tiny world does not know the prompt {shown!r}: the oracle grades only prompts "
                             "that World.tasks() makes (bare, wrapped by context_prompt() or after COT_PREFIX)")
        kind, entity, attribute = found
        retrieval = context or entity in self.retrieval_entities or entity in self.context_entities
        family = "json" if kind == "json" else "retrieval" if retrieval else "facts"
        return Question(kind, family, entity=entity, attribute=attribute, cot=cot)

    def family_of(self, prompt):
        """The task family of any prompt the world makes (sample.py uses it to pick --json etc.)."""
        return self._parse(prompt).family

    # --- tasks -----------------------------------------------------------------------------------------

    def tasks(self, split):
        """The prompts of one split, grouped by family: "sft" (with ideal answers to train on), "eval"
        (held out from every training split), "reward" (to sample and rank), "rl" (to practise on)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        if self._tasks is None:
            self._tasks = self._make_tasks()
        return list(self._tasks[split])

    def _make_tasks(self):
        rng = random.Random(f"tinyworld:{self.seed}:tasks")
        tasks = {split: [] for split in SPLITS}
        self._fact_tasks(rng, tasks)
        self._arithmetic_tasks(rng, tasks)
        self._cot_tasks(rng, tasks)
        self._calculator_tasks(rng, tasks)
        self._json_tasks(rng, tasks)
        self._retrieval_tasks(rng, tasks)
        return tasks

    def _fact_task(self, entity, attribute, template, split, heldout, family="facts"):
        return Task(family, fill(template, **entity.fields()), answer_sentence(entity, attribute), split, heldout,
                    entity.name, entity.fact(attribute))

    def _fact_tasks(self, rng, tasks):
        # Each (SFT entity, attribute) gets four train phrasings: two for SFT, one for reward, one for RL; and
        # SFT also gets the four SFT_ONLY_QUESTIONS.
        reward_pool, rl_pool = [], []
        for entity in self.sft_entities:
            for attribute, _ in entity.facts:
                phrasings = QUESTIONS[attribute][0][:]
                rng.shuffle(phrasings)
                tasks["sft"] += [self._fact_task(entity, attribute, p, "sft", False) for p in phrasings[:2]]
                reward_pool.append((entity, attribute, phrasings[2]))
                rl_pool.append((entity, attribute, phrasings[3]))
                # no draw from rng here, so every other task and the corpus stay as they were
                tasks["sft"] += [self._fact_task(entity, attribute, p, "sft", False)
                                 for p in SFT_ONLY_QUESTIONS[attribute]]
        # Evaluation asks in the eval phrasings only, about held-out and SFT entities alike: the two accuracies
        # then differ only in whether SFT ever saw the entity.
        def eval_pool(entities):
            return [(e, attribute, p) for e in entities for attribute, _ in e.facts for p in QUESTIONS[attribute][1]]
        for heldout, entities in ((True, self.heldout_entities), (False, self.sft_entities)):
            chosen = rng.sample(eval_pool(entities), 30)
            tasks["eval"] += [self._fact_task(e, a, p, "eval", heldout) for e, a, p in chosen]
        tasks["reward"] += [self._fact_task(e, a, p, "reward", False) for e, a, p in rng.sample(reward_pool, 60)]
        tasks["rl"] += [self._fact_task(e, a, p, "rl", False) for e, a, p in rng.sample(rl_pool, 60)]

    def _arithmetic_task(self, rng, family, a, op, b, split, cot=False):
        question = fill(rng.choice(ARITHMETIC_QUESTIONS), a=a, op=op, b=b)
        result = compute(a, op, b)
        if op == "*":
            answer = calculator_answer(a, b)
        elif cot:
            answer = worked_addition(a, b)
        else:
            answer = f"{a} {op} {b} = {result}."
        return Task(family, COT_PREFIX + question if cot else question, answer, split, split == "eval", "", str(result))

    def _draw_problems(self, rng, count, used, make):
        """`count` new problems from make(rng) -> (a, op, b), none used before in either order."""
        problems = []
        while len(problems) < count:
            a, op, b = make(rng)
            if (a, op, b) in used:
                continue
            used.add((a, op, b))
            if op in "+*":
                used.add((b, op, a))  # a sum seen as 45 + 23 would give away 23 + 45
            problems.append((a, op, b))
        return problems

    def _arithmetic_tasks(self, rng, tasks):
        # Small sums and differences. Keep SFT's share small: with thousands of sums even a randomly
        # initialised model learns addition in SFT, and the figure would no longer show what pretraining taught.
        def small(rng):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            return (a, "+", b) if rng.random() < 0.6 else (max(a, b), "-", min(a, b))
        used = set()
        for split, count in (("eval", 50), ("sft", 200), ("reward", 60), ("rl", 60)):
            tasks[split] += [self._arithmetic_task(rng, "arithmetic", a, op, b, split)
                             for a, op, b in self._draw_problems(rng, count, used, small)]
        self._eval_small = {(a, op, b) for t in tasks["eval"] if t.family == "arithmetic"
                            for a, op, b in [self._parse(t.prompt).numbers]}

    def _cot_tasks(self, rng, tasks):
        # Multi-digit additions: SFT shows the worked form after COT_PREFIX and the direct form otherwise;
        # evaluation asks bare questions (sample.py --cot adds the prefix) with 3- and 4-digit numbers.
        def sized(digits):
            return lambda rng: (rng.randint(10 ** (digits - 1), 10 ** digits - 1), "+",
                                rng.randint(10 ** (digits - 1), 10 ** digits - 1))

        def tasks_for(rng, split, count, cot=False):   # half with 3 digits, half with 4
            problems = (self._draw_problems(rng, count // 2, used, sized(3))
                        + self._draw_problems(rng, count - count // 2, used, sized(4)))
            return [self._arithmetic_task(rng, "cot", a, op, b, split, cot) for a, op, b in problems]
        used = set()
        eval_tasks = tasks_for(rng, "eval", 50)
        tasks["eval"] += eval_tasks
        for split, worked, direct in (("sft", 120, 60), ("reward", 30, 30), ("rl", 30, 30)):
            tasks[split] += tasks_for(rng, split, worked, cot=True) + tasks_for(rng, split, direct)
        # More worked examples for SFT: a scratchpad line is only as good as its one-digit sum, and the base
        # model gets those right only 69-78% of the time. With 120 worked SFT examples the SFT model added
        # 62% of the held-out numbers right; with 480 more, 92% (same base model). They come from their own
        # random stream, so every other task (and the corpus) stays as it was.
        extra_rng = random.Random(f"{self.seed}:more worked additions")
        tasks["sft"] += tasks_for(extra_rng, "sft", SFT_EXTRA_WORKED, cot=True)
        self._eval_cot = {self._parse(task.prompt).numbers for task in eval_tasks}

    def _calculator_tasks(self, rng, tasks):
        used = set()
        for split, count in (("eval", 50), ("sft", 100), ("reward", 60), ("rl", 60)):
            tasks[split] += [self._arithmetic_task(rng, "calculator", a, op, b, split)
                             for a, op, b in self._draw_problems(rng, count, used, three_digit_product)]
        self._products_used = used   # calculator_practice draws none of these
        self._eval_products = {self._parse(t.prompt).numbers for t in tasks["eval"] if t.family == "calculator"}

    def _json_task(self, entity, template, split, heldout):
        return Task("json", fill(template, x=entity.subject()), json.dumps(entity.record()), split, heldout,
                    entity.name, entity.name)

    def _json_tasks(self, rng, tasks):
        for entity in self.sft_entities:
            phrasings = JSON_QUESTIONS[0][:]
            rng.shuffle(phrasings)
            tasks["sft"] += [self._json_task(entity, p, "sft", False) for p in phrasings[:2]]
            tasks["reward"].append(self._json_task(entity, phrasings[2], "reward", False))
            tasks["rl"].append(self._json_task(entity, phrasings[3], "rl", False))
        tasks["eval"] += [self._json_task(e, rng.choice(JSON_QUESTIONS[1]), "eval", True)
                          for e in self.heldout_entities]
        tasks["eval"] += [self._json_task(e, rng.choice(JSON_QUESTIONS[1]), "eval", False)
                          for e in rng.sample(self.sft_entities, 15)]

    def _passage(self, rng, entity):
        templates = COUNTRY_PASSAGES if entity.kind == "country" else ANIMAL_PASSAGES
        return fill(rng.choice(templates), **entity.fields())

    def _retrieval_tasks(self, rng, tasks):
        # Training splits: a context of 1-3 passages, one of them about the entity asked about. Two thirds
        # ask about context-only invented countries (the answer must be read), a third about SFT entities.
        readable = self.context_entities + self.sft_entities
        made = set()
        for split, invented, known in (("sft", 100, 50), ("reward", 34, 16), ("rl", 34, 16)):
            for pool, count in ((self.context_entities, invented), (self.sft_entities, known)):
                for _ in range(count):
                    while True:
                        entity = rng.choice(pool)
                        attribute = rng.choice([a for a, _ in entity.facts])
                        others = rng.sample([e for e in readable if e is not entity], rng.choice([0, 1, 2, 2, 2]))
                        passages = [self._passage(rng, e) for e in [entity] + others]
                        rng.shuffle(passages)
                        question = fill(rng.choice(QUESTIONS[attribute][0]), **entity.fields())
                        prompt = context_prompt(passages, question)
                        if prompt not in made:
                            break
                    made.add(prompt)
                    tasks[split].append(Task("retrieval", prompt, answer_sentence(entity, attribute), split,
                                             False, entity.name, entity.fact(attribute)))
        # Evaluation: bare questions about retrieval-only countries (sample.py adds the retrieved passages).
        # Capital and language only: a continent could be guessed one time in six.
        for entity in self.retrieval_entities:
            for attribute in ("capital", "language"):
                tasks["eval"].append(self._fact_task(entity, attribute, rng.choice(QUESTIONS[attribute][0]),
                                                     "eval", True, family="retrieval"))

    def reading_practice(self, count):
        """`count` more SFT tasks in the retrieval layout, each about a country invented for it alone
        (never one of the 40 context countries, the retrieval-only ones or the corpus's). The SFT split's
        own retrieval tasks recur over 40 countries, few enough to memorise; a country met once can only
        be answered by reading its passage. Deterministic for a given world."""
        rng = random.Random(f"tinyworld:{self.seed}:reading-practice")
        self.documents()   # the corpus's reading pages claim their names first
        taken = set(self._taken) | {e.name.lower() for e in self.retrieval_entities + self.context_entities}
        fresh = invent_countries(rng, count, taken)
        tasks = []
        for entity in fresh:
            attribute = rng.choice([a for a, _ in entity.facts])
            # Mostly one passage: what the small model can learn in SFT's budget is to copy a name out of the
            # passage it is given. Two passages about different countries it does not learn to tell apart
            # (with 0-2 other passages here: 28% right on two, 95% on one), and the retriever hands it the
            # asked country's own passages anyway (README: "Retrieval").
            others = rng.sample([e for e in fresh + self.sft_entities if e is not entity], rng.choice([0, 0, 1]))
            passages = [self._passage(rng, e) for e in [entity] + others]
            rng.shuffle(passages)
            question = fill(rng.choice(QUESTIONS[attribute][0]), **entity.fields())
            tasks.append(Task("retrieval", context_prompt(passages, question), answer_sentence(entity, attribute),
                              "sft", False, entity.name, entity.fact(attribute)))
        return tasks

    def calculator_practice(self, count):
        """`count` more SFT tasks that call the calculator, on 3-digit products no split asks (the evaluation's
        included), from a random stream of their own. Calling the tool is easy to learn (the right call comes
        almost every time); copying its six-digit result into the answer is not, and with the split's 100
        examples some SFT runs learn it and some do not. Deterministic for a given world."""
        self.tasks("eval")   # every split draws its products first
        rng = random.Random(f"tinyworld:{self.seed}:calculator-practice")
        problems = self._draw_problems(rng, count, set(self._products_used), three_digit_product)
        return [self._arithmetic_task(rng, "calculator", a, op, b, "sft") for a, op, b in problems]

    # --- documents ------------------------------------------------------------------------------------

    def documents(self):
        """The pretraining corpus: about 3.0 MB in 15,920 documents at scale 1 (no <|endoftext|> inside)."""
        if self._documents is None:
            self._documents, self._document_kinds = self._make_documents()
        return list(self._documents)

    def document_kinds(self):
        """The kind of each document of documents(), in the same order (for statistics)."""
        self.documents()
        return list(self._document_kinds)

    def _make_documents(self):
        self.tasks("eval")  # the evaluation problems must be known to keep them out of the corpus
        rng = random.Random(f"tinyworld:{self.seed}:documents")
        # No evaluation problem (small sum, multi-digit addition, product) is stated in the corpus, in either
        # order: pretraining teaches arithmetic, evaluation checks it on problems never seen.
        evaluated = self._eval_small | self._eval_cot | self._eval_products
        self._banned = evaluated | {(b, op, a) for a, op, b in evaluated if op in "+*"}
        self._corpus_sums = [(a, "+", b) for a in range(100) for b in range(100) if (a, "+", b) not in self._banned]
        self._corpus_sums += [(a, "-", b) for a in range(100) for b in range(a + 1) if (a, "-", b) not in self._banned]
        plan = [  # kind, documents at scale 1, maker
            ("fact sheet", 70, self._doc_fact_sheet), ("country entry", 2000, self._doc_country),
            ("animal entry", 1500, self._doc_animal), ("story", 2000, self._doc_story),
            ("list", 800, self._doc_list), ("quiz page", 750, self._doc_quiz), ("json records", 500, self._doc_json),
            ("sums", 4600, self._doc_sums), ("worked addition", 1700, self._doc_worked),
            ("reading page", 1000, self._doc_reading), ("calculator log", 1000, self._doc_calculator_log),
        ]
        documents = []
        for kind, count, make in plan:
            documents += [(kind, make(rng, number)) for number in range(max(1, round(count * self.scale)))]
        rng.shuffle(documents)
        return [text for _, text in documents], [kind for kind, _ in documents]

    def _doc_fact_sheet(self, rng, number):
        # Every fact in the exact form of the ideal answer and of fact_probes(), at least once per entity.
        entity = (self.countries + self.animals)[number % (len(self.countries) + len(self.animals))]
        return f"Facts about {entity.subject()}. " + " ".join(answer_sentence(entity, a) for a, _ in entity.facts)

    def _doc_country(self, rng, number):
        entity = self.countries[number % len(self.countries)]
        fields = entity.fields()
        sentences = [rng.choice(CAPITAL_SENTENCES), rng.choice(CONTINENT_SENTENCES), rng.choice(LANGUAGE_SENTENCES)]
        sentences = rng.sample(sentences, rng.choice([2, 3, 3]))
        for _ in range(rng.randint(0, 2)):
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(COUNTRY_FILLERS))
        text = " ".join(fill(s, **fields) for s in sentences)
        return f"{entity.name}\n{text}" if rng.random() < 0.5 else text

    def _doc_animal(self, rng, number):
        entity = self.animals[number % len(self.animals)]
        sentences = [rng.choice(LEGS_SENTENCES), rng.choice(SOUND_SENTENCES), rng.choice(FOOD_SENTENCES)]
        sentences = rng.sample(sentences, rng.choice([2, 3, 3]))
        for _ in range(rng.randint(0, 2)):
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(ANIMAL_FILLERS))
        text = " ".join(fill(s, **entity.fields()) for s in sentences)
        return f"The {entity.name}\n{text}" if rng.random() < 0.5 else text

    def _doc_story(self, rng, number):
        country, country2 = rng.sample(self.countries, 2)
        animal, animal2 = rng.sample(self.animals, 2)
        person, person2 = rng.sample(PEOPLE, 2)
        return fill(STORIES[number % len(STORIES)], P=person, P2=person2, **country.fields(),
                    **country2.fields("2"), **animal.fields(), **animal2.fields("2"))

    def _doc_list(self, rng, number):
        choice = number % 6
        if choice == 0:
            rows = rng.sample(self.countries, rng.randint(6, 10))
            return "Countries and their capitals:\n" + "\n".join(f"{e.name}: {e.fact('capital')}" for e in rows)
        if choice == 1:
            continent = CONTINENTS[(number // 6) % len(CONTINENTS)]
            names = [e.name for e in self.countries if e.fact("continent") == continent]
            rng.shuffle(names)
            return f"Countries in {continent}: " + ", ".join(names) + "."
        if choice == 2:
            rows = rng.sample(self.countries, rng.randint(6, 10))
            return "Languages spoken around the world:\n" + "\n".join(f"{e.name}: {e.fact('language')}" for e in rows)
        if choice == 3:
            legs = ["2", "4", "6", "4", "2", "8", "10"][(number // 6) % 7]
            names = [e.plural for e in self.animals if e.fact("legs") == legs]
            rng.shuffle(names)
            return f"Animals with {legs} legs: " + ", ".join(names) + "."
        rows = rng.sample(self.animals, rng.randint(6, 10))
        if choice == 4:
            return "Animal sounds:\n" + "\n".join(f"{e.name}: {e.fact('sound')}" for e in rows)
        return "What animals eat:\n" + "\n".join(fill("{Pl} eat {f}.", **e.fields()) for e in rows)

    def _quiz_pair(self, rng):
        """One question and answer of a quiz page, mostly facts in any phrasing, with the ideal answer form
        (so a base model prompted with such a page answers like the assistant SFT will make)."""
        roll = rng.random()
        if roll < 0.7:
            entity = rng.choice(self.countries + self.animals)
            attribute = rng.choice([a for a, _ in entity.facts])
            train, held = QUESTIONS[attribute]
            question = fill(rng.choice(train + held), **entity.fields())
            answer = answer_sentence(entity, attribute)
            if rng.random() < 0.15:
                answer = entity.fact(attribute) + "."
            elif rng.random() < 0.05:
                answer += " " + fill(rng.choice(COUNTRY_FILLERS if entity.kind == "country" else ANIMAL_FILLERS),
                                     **entity.fields())
            return question, answer
        if roll < 0.85:
            a, op, b = rng.choice(self._corpus_sums)
            return fill(rng.choice(ARITHMETIC_QUESTIONS), a=a, op=op, b=b), f"{a} {op} {b} = {compute(a, op, b)}."
        if roll < 0.93:
            a, op, b = self._corpus_product(rng)
            return (fill(rng.choice(ARITHMETIC_QUESTIONS), a=a, op=op, b=b),
                    f"Calculator: {a} * {b} -> {a * b}. So {a} * {b} = {a * b}.")
        entity = rng.choice(self.countries + self.animals)
        train, held = JSON_QUESTIONS
        return fill(rng.choice(train + held), x=entity.subject()), json.dumps(entity.record())

    def _doc_quiz(self, rng, number):
        pairs = [self._quiz_pair(rng) for _ in range(rng.randint(4, 7))]
        header = rng.choice(QA_HEADERS)
        if number % 10 == 9:  # a forum page: one answer is rude, as real forums are
            header = "Forum: questions from readers"
            position = rng.randrange(len(pairs))
            pairs[position] = (pairs[position][0], rng.choice(RUDE_OPENINGS) + pairs[position][1])
        return header + "\n\n" + "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs)

    def _doc_json(self, rng, number):
        # Each record after the name a sentence would use ("Poland: {...}", "The owl: {...}"). With bare record
        # lines the base model knew every record but not which one "Mexico" asks for: it answered "Describe
        # Mexico in JSON." with another record (2-4% right on a few-shot page), and SFT, which shows the
        # records of half the entities, could not teach it for the other half (10-22%). README: "JSON records".
        def named(entity):
            subject = entity.subject()
            return f"{subject[0].upper()}{subject[1:]}: {json.dumps(entity.record())}"
        rows = rng.sample(self.countries + self.animals, rng.randint(1, 3))
        header = rng.choice(["Records:", "Database export:", "Data:", "JSON lines:"])
        return header + "\n" + "\n".join(named(entity) for entity in rows)

    def _doc_sums(self, rng, number):
        rows = [rng.choice(self._corpus_sums) for _ in range(rng.randint(5, 10))]
        header = rng.choice(["Sums:", "Practice:", "Arithmetic practice", "Homework answers:", "Mental arithmetic:"])
        return header + "\n" + "\n".join(f"{a} {op} {b} = {compute(a, op, b)}" for a, op, b in rows)

    def _doc_worked(self, rng, number):
        digits = rng.choice([2, 3, 3, 4, 4])
        while True:
            a, b = (rng.randint(10 ** (digits - 1), 10 ** digits - 1) for _ in range(2))
            if (a, "+", b) not in self._banned:
                break
        opening = rng.choice([f"Adding {a} and {b} column by column:",
                              f"Question: What is {a} + {b}?\nLet's think step by step.",
                              f"Worked example: {a} + {b}"])
        return opening + "\n" + worked_addition(a, b)

    def _corpus_product(self, rng):
        while True:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            if (a, "*", b) not in self._banned:
                return a, "*", b

    def _doc_reading(self, rng, number):
        # Reading-comprehension pages about countries invented for this page alone: the answer is in the
        # passages and nowhere else, so the only way to predict it is to find it there and copy it. They
        # teach the layout of retrieval prompts. (They are not enough: at the default budget the small model
        # does not learn to copy an invented name -- README's known limits.) Half the pages use the exact
        # retrieval prompt layout, half a plain passage followed by a few questions.
        invented = invent_countries(rng, rng.choice([1, 1, 2, 3]), self._taken)
        known = rng.sample(self.countries + self.animals, rng.choice([0, 1, 1, 2]))
        passages = [self._passage(rng, entity) for entity in invented + known]
        rng.shuffle(passages)
        asked = [(entity, attribute) for entity in invented for attribute in ("capital", "language", "continent")]
        asked = rng.sample(asked, min(len(asked), rng.randint(1, 3)))

        def question(entity, attribute):
            train, held = QUESTIONS[attribute]
            return fill(rng.choice(train + held), **entity.fields())
        if number % 2 == 0:
            entity, attribute = asked[0]
            return context_prompt(passages, question(entity, attribute)) + "\nAnswer: " + answer_sentence(entity, attribute)
        pairs = "\n\n".join(f"Question: {question(e, a)}\nAnswer: {answer_sentence(e, a)}" for e, a in asked)
        return "Read the text, then answer.\n\n" + "\n".join(passages) + "\n\n" + pairs

    def _doc_calculator_log(self, rng, number):
        # Worked examples of using a calculator: copy the numbers from the question into the calculator,
        # then copy its result into the answer (the shape of the tool calls SFT teaches with special tokens).
        # These are the corpus's only products (quiz pages aside, which also show the calculator): were
        # there bare "a * b = P" lines, the model would learn to guess P, and a guess competes with the copy.
        rows = []
        for _ in range(rng.randint(2, 4)):
            a, op, b = self._corpus_product(rng)
            rows.append(calculator_log_row(fill(rng.choice(ARITHMETIC_QUESTIONS), a=a, op=op, b=b), a, b))
        return "\n\n".join([CALCULATOR_LOG_HEADER] + rows)

    # --- retrieval, probes, few-shot ------------------------------------------------------------------

    def retrieval_documents(self):
        """Two short documents about each retrieval-only country: facts absent from documents()."""
        if self._retrieval is None:
            rng = random.Random(f"tinyworld:{self.seed}:retrieval")
            self._retrieval = []
            for entity in self.retrieval_entities:
                first, second = rng.sample(COUNTRY_PASSAGES, 2)
                self._retrieval += [fill(first, **entity.fields()), fill(second, **entity.fields())]
        return list(self._retrieval)

    def facts(self):
        """Every (entity, attribute, value) the pretraining corpus teaches."""
        return [(e.name, attribute, value) for e in self.countries + self.animals for attribute, value in e.facts]

    def fact_probes(self, heldout=None):
        """(document-style prefix, expected answer): "The capital of Peru is" -> "Lima". A base model knows
        the fact if its greedy continuation starts with the answer (after a space) and the word ends there.
        heldout=True/False keeps only the entities SFT does not / does ask about."""
        keep = {True: self.heldout_entities, False: self.sft_entities, None: self.countries + self.animals}[heldout]
        probes = []
        for entity in self.countries + self.animals:
            if entity in keep:
                for attribute, value in entity.facts:
                    prefix = answer_lead(entity, attribute).rstrip()
                    probes.append((prefix, value))
        return probes

    def arithmetic_probes(self):
        """("23 + 45 =", "68") for the evaluation sums, none of which is stated in the corpus."""
        return [(f"{a} {op} {b} =", str(compute(a, op, b))) for a, op, b in sorted(self._eval_small_problems())]

    def _eval_small_problems(self):
        self.tasks("eval")
        return self._eval_small

    def fewshot_prompt(self, question):
        """A quiz page ending in the question: the talk's trick to make a base model answer. Its answer is
        the first line of its completion. The solved examples are SFT tasks of the same family (retrieval
        questions get fact examples; products get the plain form, a base model has no calculator). Any text
        may be asked; one the world does not know gets fact examples."""
        try:
            asked = self._parse(question)
        except ValueError:  # a user's own question (sample.py's chat with a base model): fact examples
            asked = Question("unknown", "facts")
        family = "facts" if asked.family == "retrieval" else asked.family
        if self._shots is None:
            self._shots = self._fewshot_examples()
        # Examples of the same kind first (other capitals, other animals' records), never about the entity
        # asked about. Three examples, two of the long JSON ones (a page must leave room in the context).
        tag = asked.attribute or (asked.entity.kind if asked.entity is not None else "")
        pool = [shot for shot in self._shots[family] if asked.entity is None or shot[2] != asked.entity.name]
        pool.sort(key=lambda shot: shot[3] != tag)  # stable: keeps the round-robin order otherwise
        chosen = pool[:2 if family == "json" else 3]
        page = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a, _, _ in chosen)
        return f"{QA_HEADERS[0]}\n\n{page}\n\nQuestion: {question}\nAnswer:"

    def _fewshot_examples(self):
        """Per family, a few SFT questions with direct answers (products in the plain form: a base model has
        no calculator): (prompt, answer, entity, tag), the tag being the attribute asked or the entity kind.
        Three per tag, each about another entity, taken in turn tag by tag, so that a page is varied."""
        examples = {}
        for family in FAMILIES:
            by_tag, used = {}, set()
            for task in self.tasks("sft"):
                if task.family != family or task.prompt.startswith(COT_PREFIX):
                    continue
                asked = self._parse(task.prompt)
                tag = asked.attribute or (asked.entity.kind if asked.entity is not None else "")
                rows = by_tag.setdefault(tag, [])
                if len(rows) == 3 or task.entity in used:  # each example about another entity
                    continue
                if task.entity:
                    used.add(task.entity)
                answer = task.answer
                if family == "calculator":
                    a, _, b = asked.numbers
                    answer = f"{a} * {b} = {a * b}."
                rows.append((task.prompt, answer, task.entity, tag))
            examples[family] = [row for turn in range(3) for rows in by_tag.values() for row in rows[turn:turn + 1]]
        return examples

    # --- the oracle -----------------------------------------------------------------------------------

    def score(self, prompt, response):
        """The labeler: (score in [0, 1], reason). 1.0 only for the ideal answer; less when wrong, cut off,
        rambling, malformed, without the final answer, or impolite. Partial credit (a wrong answer in the
        right form beats gibberish) gives a reward model something to learn from."""
        grade = self.grade(prompt, response)
        return grade.score, grade.reason

    def is_correct(self, prompt, response):
        """Is the key fact or number right? Lenient on form: a few-shot answer "Paris" is correct."""
        return self.grade(prompt, response).correct

    def grade(self, prompt, response):
        question = self._parse(prompt)
        if not isinstance(response, str):
            raise ValueError(f"response must be a string, not {type(response).__name__}")
        text = response
        for end in ("<|end|>", "<|endoftext|>"):  # if a caller left the end token in, grade what came before
            text = text.split(end)[0]
        text = text.strip()
        if not text:
            return Grade(0.0, "empty response", False)
        if question.kind == "fact":
            grade = self._grade_fact(question, text)
        elif question.kind == "json":
            grade = self._grade_json(question, text)
        elif question.numbers[1] == "*":
            grade = self._grade_product(question, text)
        else:
            grade = self._grade_arithmetic(question, text)
        rude = [marker for marker in RUDE_MARKERS if marker in text.lower()]
        if rude:
            grade = Grade(round(grade.score * 0.5, 3), f"{grade.reason}; impolite ({rude[0]!r})", grade.correct)
        return grade

    def _grade_fact(self, question, text):
        entity, attribute = question.entity, question.attribute
        ideal, key = answer_sentence(entity, attribute), entity.fact(attribute)
        if text == ideal:
            return Grade(1.0, "ideal answer", True)
        match = self._candidates[attribute].search(text)
        said = match.group(1) if match else None
        if said is not None and attribute == "legs" and said.lower() in NUMBER_WORDS:
            said = str(NUMBER_WORDS[said.lower()])
        if said is None or said.lower() != key.lower():
            if said is None and ideal.startswith(text):
                return Grade(0.1, "cut off before the answer", False)
            # A wrong value in the answer's form (the ideal sentence up to the value, then a value) gets the
            # same 0.2 whether or not the world knows the word ("The capital of Peru is Rome." or "... is
            # Limora."); a known value said elsewhere in other words 0.1; anything else nothing.
            in_slot = value_in_slot(text, entity, attribute)
            if in_slot is not None:
                return Grade(0.2, f"wrong: says {in_slot}, expected {key}", False)
            if said is not None:
                return Grade(0.1, f"wrong: says {said}, expected {key}", False)
            return Grade(0.0, f"does not give the {attribute} (expected {key})", False)
        # The right value said of another country or animal ("Thailand is in Asia." asked about South Korea)
        # is a wrong answer, as a labeler would see it. The value itself is left out of the search: the owl
        # eats mice, and "mice" is an animal too.
        rest = text[:match.start()] + " " + text[match.end():]
        about = {self._named[name.lower()] for name in self._names.findall(rest)}
        if about and entity not in about:
            other = min(e.name for e in about)
            return Grade(0.2, f"wrong: says it of {other}, asked about {entity.name}", False)
        if text.strip(" .!").lower() == match.group(1).lower():
            return Grade(0.8, "correct but terse (not a sentence)", True)
        # Nor is the right value said of a name the world does not know ("Pantistador is in Oceania." asked
        # about New Zealand) a right answer; of the asked name misspelt ("Kufelis is in Asia." asked about
        # Kuzelis), half of one, like a JSON record whose name is misspelt.
        if not about:   # the text names no entity the world knows, not even the asked one
            subject = subject_in_form(text, entity, attribute)
            if subject is not None and similar_names(subject, entity.name):
                return Grade(0.5, f"the right value, but the name misspelt: {subject}, asked about {entity.name}", False)
            return Grade(0.2, f"wrong: the right value, said of {subject or 'something else'}, asked about "
                              f"{entity.name}", False)
        if rambles(text, ideal):
            return Grade(0.6, "correct but rambling", True)
        if ideal.startswith(text):
            return Grade(0.9, "correct but the sentence is unfinished", True)
        return Grade(0.9, "correct, worded differently from the ideal", True)

    def _grade_json(self, question, text):
        expected = question.entity.record()
        ideal = json.dumps(expected)
        if text == ideal:
            return Grade(1.0, "ideal answer", True)
        value, wrapped = parse_json_object(text)
        if value is None:
            if ideal.startswith(text):
                return Grade(0.1, "JSON cut off before the end", False)
            return Grade(0.05 if "{" in text else 0.0, "malformed JSON" if "{" in text else "not JSON", False)
        # A record of another country or animal is a wrong answer, whatever it happens to share with the
        # asked one. Which entity a record is of: the one whose own record it matches in most fields (the
        # asked one on a tie), so that "Frnace" with France's capital is a typo, and Argentina's record with
        # its name misspelt, or left out, is still Argentina's.
        right = fields_matching(value, expected)
        if "name" not in right:
            closest = max(self._everyone, key=lambda entity: (len(fields_matching(value, entity.record())),
                                                              entity is question.entity))
            if closest is not question.entity:
                return Grade(0.2, f"JSON of another entity: {closest.name}, asked about {expected['name']}", False)
        wrong = [field for field in expected if field not in right]
        if wrong:
            share = 1 - len(wrong) / len(expected)
            return Grade(round(0.2 + 0.4 * share, 3), f"JSON with wrong or missing fields: {', '.join(wrong)}", False)
        extra = sorted(set(value) - set(expected))
        if extra:
            return Grade(0.8, f"right values but extra fields: {', '.join(extra)}", True)
        if wrapped:
            return Grade(0.7, "right values but text around the JSON", True)
        if value != expected:
            return Grade(0.85, "right values but wrong types (legs must be a number)", True)
        return Grade(0.9, "right values, formatted differently from the ideal", True)

    def _grade_arithmetic(self, question, text):
        a, op, b = question.numbers
        result = compute(a, op, b)
        direct = f"{a} {op} {b} = {result}."
        worked = worked_addition(a, b) if op == "+" else None
        ideal = worked if (question.cot and worked) else direct
        # A bare question may be answered either way; after COT_PREFIX only the worked form is ideal.
        if text == ideal or (text == worked and not question.cot):
            return Grade(1.0, "ideal answer", True)
        stated = stated_result(text, a, op, b)
        shows_steps = ", so far " in text   # the mark of a scratchpad line, which a direct answer never has
        if stated is None:
            if ideal.startswith(text):
                done = text.count("\n") / max(1, ideal.count("\n"))
                return Grade(round(0.1 + 0.2 * done, 3), "cut off before the final answer", False)
            if shows_steps:
                # a scratchpad states its result on its last line ("So 482 + 739 = 1221."); the lines above
                # hold one-digit sums ("4 + 7 + 1 = 12") that answer nothing
                last_line = text.splitlines()[-1]
                miscopied = equation_of_another_problem(last_line) if last_line.startswith("So ") else None
            else:
                miscopied = equation_of_another_problem(text)
            if miscopied:
                return grade_miscopied(miscopied, result, wrong_score=0.0)
            return Grade(0.0, "no final answer", False)
        if stated != result:
            in_form = re.search(rf"(?<!\d){a} [-+*] {b} = ", text) is not None
            return Grade(0.2 if in_form or shows_steps else 0.1, f"wrong: says {stated}, expected {result}", False)
        if question.cot and worked and not shows_steps:
            return Grade(0.8, "correct but shows no steps (the prompt asked to think step by step)", True)
        if shows_steps:
            return Grade(0.9, "correct, steps differ from the ideal", True)
        if text.rstrip(".") == str(result):
            return Grade(0.8, "correct but terse (a bare number)", True)
        if rambles(text, ideal):
            return Grade(0.6, "correct but rambling", True)
        return Grade(0.9, "correct, worded differently from the ideal", True)

    def _grade_product(self, question, text):
        a, _, b = question.numbers
        result = a * b
        if text == calculator_answer(a, b):
            return Grade(1.0, "ideal answer", True)
        call = re.search(re.escape(CALC) + r"(.*?)" + re.escape(RESULT) + r"(.*?)(" + re.escape(END_RESULT) + r"|$)",
                         text, re.DOTALL)
        right_call = call is not None and re.sub(r"\s", "", call.group(1)).replace("×", "*") == f"{a}*{b}"
        outside = re.sub(re.escape(CALC) + r".*?(" + re.escape(END_RESULT) + r"|$)", " ", text, flags=re.DOTALL)
        stated = stated_result(outside, a, "*", b)
        if stated is None:
            # "579 * 963 = 555387." after the call for 679 * 963 answers a miscopied problem: below a
            # wrong result of the right problem, as with sums.
            miscopied = equation_of_another_problem(outside)
            if miscopied:
                return grade_miscopied(miscopied, result, wrong_score=0.2 if right_call else 0.1 if call else 0.0)
            if call and right_call and call.group(3) and call.group(2).strip() == str(result):
                return Grade(0.6, "the calculator gave the answer but the response never states it", True)
            if call and not call.group(3):
                return Grade(0.3 if right_call else 0.1, "stopped inside the calculator call: no result", False)
            return Grade(0.0, "no final answer", False)
        if stated != result:
            score = 0.3 if right_call else 0.2 if call else 0.1
            return Grade(score, f"wrong: says {stated}, expected {result}", False)
        if call is None:
            return Grade(0.8, "correct but did not use the calculator", True)
        if not right_call:
            return Grade(0.7, "correct but the calculator was asked something else", True)
        if rambles(outside, f" {a} * {b} = {result}."):
            return Grade(0.6, "correct but rambling", True)
        return Grade(0.9, "correct, worded differently from the ideal", True)

    def evaluate(self, respond, tasks):
        """Ask respond(list of prompts) -> list of responses once for all tasks; grade every answer.
        -> ({"accuracy/<family>", "score/<family>", ".../all", ".../facts_heldout", ".../facts_seen"}, responses)."""
        tasks = list(tasks)
        if not tasks:
            raise ValueError("evaluate() needs at least one task")
        responses = list(respond([task.prompt for task in tasks]))
        if len(responses) != len(tasks):
            raise ValueError(f"respond() returned {len(responses)} responses for {len(tasks)} prompts")
        grades = [self.grade(task.prompt, response) for task, response in zip(tasks, responses)]
        groups = {family: [g for t, g in zip(tasks, grades) if t.family == family] for family in FAMILIES}
        groups["all"] = grades
        groups["facts_heldout"] = [g for t, g in zip(tasks, grades) if t.family == "facts" and t.heldout]
        groups["facts_seen"] = [g for t, g in zip(tasks, grades) if t.family == "facts" and not t.heldout]
        metrics = {}
        for name, group in groups.items():
            if group:
                metrics[f"accuracy/{name}"] = sum(g.correct for g in group) / len(group)
                metrics[f"score/{name}"] = sum(g.score for g in group) / len(group)
        return metrics, responses


# ------------------------------------------------------------------------------------------------------
# Reading answers.

def rambles(text, ideal):
    """More sentences than the ideal, or much longer: the labelers' "concise" rule."""
    sentences = len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s])
    ideal_sentences = len([s for s in re.split(r"(?<=[.!?])\s+", ideal.strip()) if s])
    return sentences > ideal_sentences or len(text) > 1.5 * len(ideal) + 20


def stated_result(text, a, op, b):
    """The number a response gives as the result of `a op b`, or None. Read from the last "a op b = N"
    (a worked answer ends with it; its first line restates the problem, but with ":", not "="), else from
    "answer is N", else, if the response has no equation at all, from its last number ("1221")."""
    ops = {"+": r"(?:\+|plus)", "-": r"(?:-|minus)", "*": r"(?:\*|×|x|times)"}[op]
    orders = [(a, b), (b, a)] if op in "+*" else [(a, b)]  # "45 + 23 = 68" answers 23 + 45 too
    found = [match for x, y in orders
             for match in re.finditer(rf"(?<!\d){x}\s*{ops}\s*{y}(?!\d)\s*(?:=|is)\s*(-?\d+)", text)]
    if found:
        return int(max(found, key=lambda match: match.start()).group(1))
    found = re.findall(r"answer(?: is)?:?\s*(-?\d+)", text, re.IGNORECASE)
    if found:
        return int(found[-1])
    if "=" not in text:
        found = re.findall(r"\d+", text)
        if found:
            return int(found[-1])
    return None


def equation_of_another_problem(text):
    """The last "x op y = N" of a response in which stated_result found no result of the question's own
    problem: the answer to a miscopied question ("8 + 42 = 114." asked 8 + 32), as (equation, N); or None."""
    found = re.findall(r"(?<!\d)(\d+\s*(?:[-+*×]|plus|minus|times)\s*\d+\s*=\s*(-?\d+))", text)
    return (found[-1][0], int(found[-1][1])) if found else None


def grade_miscopied(miscopied, result, wrong_score):
    """An answer to a miscopied problem is wrong (wrong_score), unless its number is the asked result
    ("679 * 936 = 653877." for 679 * 963): the right number under a typo, right but no better than a
    result left unstated."""
    equation, number = miscopied
    if number == result:
        return Grade(0.6, f"the right result, written as another problem's ({equation})", True)
    return Grade(wrong_score, f"wrong: answers another problem ({equation}), expected {result}", False)


def parse_json_object(text):
    """-> (dict, wrapped) where wrapped says there was other text around it; (None, False) if none parses."""
    try:
        value = json.loads(text)
        return (value, False) if isinstance(value, dict) else (None, False)
    except ValueError:
        pass
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            value = json.loads(text[start:end + 1])
            if isinstance(value, dict):
                return value, True
        except ValueError:
            pass
    return None, False


# ------------------------------------------------------------------------------------------------------
# Command line: statistics and files.

def write_atomic(path, text):
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; these are ordinary data files
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def jsonl(records):
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_files(world, folder):
    """corpus.jsonl (a "text" per document: what `pretrain.py --data` takes), corpus.txt (the same
    documents joined by <|endoftext|>, to read), sft.jsonl (TRL "messages": `sft.py --data`),
    eval/reward/rl.jsonl ("prompt" plus the ideal answer, family and held-out flag: to read),
    retrieval.txt (blank-line separated: `sample.py --docs`) and retrieval.jsonl ("text").
    -> list of (file name, bytes)."""
    os.makedirs(folder, exist_ok=True)
    files = {"corpus.jsonl": jsonl({"text": text} for text in world.documents()),
             "corpus.txt": "<|endoftext|>".join(world.documents())}
    files["sft.jsonl"] = jsonl({"messages": [{"role": "user", "content": t.prompt},
                                             {"role": "assistant", "content": t.answer}]} for t in world.tasks("sft"))
    for split in ("eval", "reward", "rl"):
        files[f"{split}.jsonl"] = jsonl({"prompt": t.prompt, "answer": t.answer, "family": t.family,
                                         "heldout": t.heldout} for t in world.tasks(split))
    files["retrieval.txt"] = "\n\n".join(world.retrieval_documents()) + "\n"
    files["retrieval.jsonl"] = jsonl({"text": text} for text in world.retrieval_documents())
    clashes = [name for name in files if os.path.isdir(os.path.join(folder, name))]
    if clashes:   # a folder in a file's place is found before any file is written
        raise ValueError(f"{os.path.join(folder, clashes[0])} is a folder; remove it or write to another folder")
    written = []
    for name, text in files.items():
        write_atomic(os.path.join(folder, name), text)
        written.append((name, len(text.encode("utf-8"))))
    return written


def load_tokenizer(path):
    """A bpe.py tokenizer file or a checkpoint holding one, to count the corpus in tokens (bpe.py is
    imported only for this)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bpe import UsageError, load_any_tokenizer
    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path}: no such file (bpe.py or pretrain.py makes one)")
    try:
        return load_any_tokenizer(path)
    except UsageError as error:
        raise ValueError(str(error)) from None


def print_stats(world, seconds, tokenizer=None):
    documents, kinds = world.documents(), world.document_kinds()
    total = sum(len(d.encode("utf-8")) for d in documents)
    print(f"tiny world seed={world.seed} scale={world.scale:g}: generated in {seconds:.2f} s")
    print(f"corpus: {len(documents):,} documents, {total:,} bytes")
    if tokenizer is not None:
        tokens = sum(len(tokenizer.encode(d)) for d in documents)
        print(f"        {tokens:,} tokens with a vocabulary of {tokenizer.vocab_size}")
    for kind in dict.fromkeys(kinds):
        chosen = [d for d, k in zip(documents, kinds) if k == kind]
        print(f"  {kind:16s} {len(chosen):6,} documents {sum(len(d.encode('utf-8')) for d in chosen):10,} bytes")
    print(f"facts: {len(world.facts())} about {len(world.countries)} countries and {len(world.animals)} animals "
          f"({len(world.sft_entities)} entities asked about in SFT, {len(world.heldout_entities)} held out)")
    print(f"retrieval: {len(world.retrieval_documents())} documents about {len(world.retrieval_entities)} "
          f"invented countries; {len(world.context_entities)} more invented for SFT's context passages")
    print("\nprompts per family and split:")
    print(f"  {'family':12s}" + "".join(f"{split:>8s}" for split in SPLITS))
    for family in FAMILIES + ["all"]:
        counts = [sum(1 for t in world.tasks(split) if family in ("all", t.family)) for split in SPLITS]
        print(f"  {family:12s}" + "".join(f"{count:8d}" for count in counts))
    print("\nsample documents:")
    for kind in dict.fromkeys(kinds):
        document = documents[kinds.index(kind)]
        print(f"--- {kind}\n{document}")
    print("\nsample tasks (SFT, and one held-out evaluation prompt):")
    for family in FAMILIES:
        task = next(t for t in world.tasks("sft") if t.family == family)
        held = next(t for t in world.tasks("eval") if t.family == family)
        print(f"--- {family}\nuser: {task.prompt}\nassistant: {task.answer}\neval: {held.prompt} -> {held.answer!r}")
    print("\nfew-shot prompt for a held-out question:")
    print(world.fewshot_prompt(next(t.prompt for t in world.tasks("eval") if t.heldout and t.family == "facts")))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.tinyworld", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="print sizes, counts per family and split, and samples")
    write = commands.add_parser("write", help="write the corpus and the tasks to a folder (corpus.jsonl, sft.jsonl, ...)")
    write.add_argument("folder", help="where to write (created if missing)")
    for command in (stats, write):
        command.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
        command.add_argument("--scale", type=float, default=1.0, help="multiplies the number of documents")
    stats.add_argument("--tokenizer", default=None, help="a bpe.py tokenizer file, or a checkpoint such as "
                                                         "out/pretrain.pt: also count corpus tokens")
    args = parser.parse_args(argv)
    try:
        started = time.time()
        if args.scale <= 0:
            raise ValueError(f"--scale must be positive, got {args.scale}")
        world = World(seed=args.seed, scale=args.scale)
        world.documents(), world.retrieval_documents()
        for split in SPLITS:
            world.tasks(split)
        seconds = time.time() - started
        if args.command == "write":
            for name, size in write_files(world, args.folder):
                print(f"wrote {os.path.join(args.folder, name)} ({size:,} bytes)")
        tokenizer = load_tokenizer(args.tokenizer) if args.command == "stats" and args.tokenizer else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:   # say which file, and what to do
        if args.command == "write":
            print(f"error: cannot write to {args.folder}: {error.strerror}; choose another folder", file=sys.stderr)
        else:
            print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    if args.command == "stats":
        print_stats(world, seconds, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
