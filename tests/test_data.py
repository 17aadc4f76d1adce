"""The tiny world: deterministic, held-out sets really held out, and an oracle that agrees with the ideal
answers and marks down wrong, cut-off, rambling, malformed and impolite ones."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from data.tinyworld import (CONTEXT_HEADER, COT_PREFIX, FAMILIES, SPLITS, World, calculator_answer,
                            context_prompt, main, worked_addition)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fingerprint(world):
    """A hash of everything the world hands out."""
    digest = hashlib.sha256()
    for document in world.documents() + world.retrieval_documents():
        digest.update(document.encode() + b"\0")
    for split in SPLITS:
        for task in world.tasks(split):
            digest.update(repr(task).encode() + b"\0")
    return digest.hexdigest()


def test_same_seed_same_bytes_different_seed_different(world):
    assert fingerprint(world) == fingerprint(World(seed=0))
    assert fingerprint(world) != fingerprint(World(seed=1))
    # Another process with another hash seed: nothing may depend on hash() or the order of a set.
    code = ("import sys; sys.path.insert(0, '.'); from tests.test_data import fingerprint; "
            "from data.tinyworld import World; print(fingerprint(World(seed=0)))")
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED="12345"))
    assert other.stdout.strip() == fingerprint(world)


def test_sizes(world):
    documents = world.documents()
    size = sum(len(d.encode()) for d in documents)
    assert 2_000_000 < size < 3_500_000 and len(documents) > 10_000
    assert not any("<|" in d for d in documents + world.retrieval_documents())
    assert len(World(scale=0.1).documents()) < len(documents) // 5
    assert len(world.facts()) == 210
    for family in FAMILIES:
        assert 40 <= sum(t.family == family for t in world.tasks("eval")) <= 60, family
        assert sum(t.family == family for t in world.tasks("sft")) > 0
    # Keep SFT's arithmetic small: with thousands of sums even a random model learns to add in SFT.
    assert sum(t.family == "arithmetic" for t in world.tasks("sft")) <= 200


def test_splits_are_disjoint_by_text(world):
    prompts = {split: [t.prompt for t in world.tasks(split)] for split in SPLITS}
    for split in SPLITS:
        assert len(set(prompts[split])) == len(prompts[split]), f"duplicate prompts in {split}"
    for first in SPLITS:
        for second in SPLITS:
            if first < second:
                assert not set(prompts[first]) & set(prompts[second]), (first, second)


def test_heldout_entities_are_never_trained_on(world):
    trained = {t.entity for split in ("sft", "reward", "rl") for t in world.tasks(split) if t.entity}
    evaluation = world.tasks("eval")
    heldout_facts = [t for t in evaluation if t.family == "facts" and t.heldout]
    seen_facts = [t for t in evaluation if t.family == "facts" and not t.heldout]
    assert len(heldout_facts) >= 20 and len(seen_facts) >= 20
    assert not {t.entity for t in heldout_facts} & trained
    assert {t.entity for t in seen_facts} <= trained
    assert not {t.entity for t in evaluation if t.family == "json" and t.heldout} & trained
    # Entities named in any training prompt (also inside the passages of a retrieval prompt).
    training_text = "\n".join(t.prompt + "\n" + t.answer
                              for split in ("sft", "reward", "rl") for t in world.tasks(split))
    for entity in world.heldout_entities:
        assert not re.search(rf"\b{re.escape(entity.name)}\b", training_text), entity.name


def stated_problems(text):
    """Every "a op b =" stated in a text, as (a, op, b) strings."""
    return set(re.findall(r"(?<!\d)(\d+) ([-+*]) (\d+) =", text))


def test_evaluation_problems_are_not_in_the_corpus_or_training(world):
    corpus = stated_problems("\n".join(world.documents()))
    training = {tuple(re.search(r"(\d+) ([-+*]) (\d+)", t.prompt).groups()) for split in ("sft", "reward", "rl")
                for t in world.tasks(split) if t.family in ("arithmetic", "cot", "calculator")}
    assert len(corpus) > 10_000 and len(training) > 500
    for task in world.tasks("eval"):
        if task.family in ("arithmetic", "cot", "calculator"):
            a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", task.prompt).groups()
            for problem in [(a, op, b), (b, op, a)] if op in "+*" else [(a, op, b)]:
                assert problem not in corpus and problem not in training, task.prompt


def test_retrieval_facts_are_absent_from_the_corpus_and_training(world):
    def words(text):
        return set(re.findall(r"[A-Za-z]+", text))
    corpus = words("\n".join(world.documents()))
    training = words("\n".join(t.prompt + "\n" + t.answer for split in ("sft", "reward", "rl")
                               for t in world.tasks(split)))
    retrieval = words("\n".join(world.retrieval_documents()))
    for entity in world.retrieval_entities:
        for word in [entity.name] + [value for attribute, value in entity.facts if attribute != "continent"]:
            assert word in retrieval and word not in corpus and word not in training, word
    for entity in world.context_entities:  # invented for SFT's passages: in no document either
        assert entity.name not in corpus and entity.name not in retrieval, entity.name
    for task in world.tasks("eval"):
        if task.family == "retrieval":
            assert task.heldout and task.key in retrieval and task.key not in corpus


def test_calculator_practice_asks_products_no_split_asks(world):
    # 20,000 of the 405,450 products of two 3-digit numbers: drawn blindly, about 13 would be the splits' 270
    practice = world.calculator_practice(20_000)
    assert world.calculator_practice(300) == world.calculator_practice(300)      # deterministic
    asked = {tuple(sorted(re.search(r"(\d+) \* (\d+)", task.prompt).groups()))
             for split in SPLITS for task in world.tasks(split) if task.family == "calculator"}
    products = [re.search(r"(\d+) \* (\d+)", task.prompt).groups() for task in practice]
    unordered = {tuple(sorted(product)) for product in products}
    assert len(unordered) == 20_000 and not unordered & asked                    # new, in either order
    for task, (a, b) in zip(practice, products):
        assert task.family == "calculator" and task.split == "sft"
        assert task.answer == calculator_answer(int(a), int(b)) and task.key == str(int(a) * int(b))


def test_reading_practice_is_about_countries_met_nowhere_else(world):
    practice = world.reading_practice(100)
    assert len(practice) == 100 and practice == world.reading_practice(100)   # deterministic
    assert len({task.entity for task in practice}) == 100                    # each country once
    elsewhere = "\n".join(world.documents() + world.retrieval_documents()
                          + [task.prompt for split in SPLITS for task in world.tasks(split)])
    for task in practice:
        assert task.family == "retrieval" and task.split == "sft"
        assert re.search(rf"\b{task.entity}\b", elsewhere) is None, task.entity
        passages, question = task.prompt.split("\nQuestion: ")
        assert task.entity in question and task.key in passages   # the answer can be read, not remembered
        assert task.answer.endswith(f"{task.key}.")


def test_every_ideal_answer_scores_one(world):
    for split in SPLITS:
        for task in world.tasks(split):
            assert world.score(task.prompt, task.answer) == (1.0, "ideal answer"), task
            assert world.is_correct(task.prompt, task.answer)
            assert world.family_of(task.prompt) == task.family


def test_arithmetic_answers_are_right(world):
    for split in SPLITS:
        for task in world.tasks(split):
            if task.family not in ("arithmetic", "cot", "calculator"):
                continue
            a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", task.prompt).groups()
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert task.key == str(expected)
            assert task.answer.endswith(f"{a} {op} {b} = {expected}.")
            if task.prompt.startswith(COT_PREFIX):
                check_worked_steps(task.answer)


def check_worked_steps(answer):
    """Every line of a worked addition follows from the line before it: the numbers left lose their
    last digit and take the carry, the two last digits (and the carry) add up, and "so far" gains the
    written digit in front; the digits run out on the last step line, and the answer copies "so far"."""
    lines = answer.split("\n")
    first = re.match(r"(\d+) \+ (\d+):", lines[0])
    assert first, f"not a worked addition: {lines[0]!r}"
    left_a, left_b, carry, so_far = first.group(1), first.group(2), 0, ""
    for line in lines[:-1]:
        assert left_a or left_b or line.startswith("Carry 1:"), f"a step after the digits ran out: {line!r}"
        if line.startswith("Carry 1:"):
            assert carry == 1 and line == f"Carry 1: write 1, so far 1{so_far}."
            carry, so_far = 0, "1" + so_far
            continue
        step = re.match(r"([\d + ]+): ([\d + ]+) = (\d+), write (\d)(.*)", line)
        numbers, terms, total, digit, rest = step.groups()
        plus_carry = f" + {carry}" if carry else ""
        assert numbers == f"{left_a or 0} + {left_b or 0}{plus_carry}"
        assert terms == f"{(left_a or '0')[-1]} + {(left_b or '0')[-1]}{plus_carry}"
        assert sum(int(t) for t in terms.split(" + ")) == int(total) and int(digit) == int(total) % 10
        carry, so_far = int(total) // 10, digit + so_far
        assert rest == (", carry 1" if carry else "") + f", so far {so_far}."
        left_a, left_b = left_a[:-1], left_b[:-1]
    assert not left_a and not left_b and carry == 0
    a, b = int(first.group(1)), int(first.group(2))
    assert lines[-1] == f"So {a} + {b} = {so_far}." and int(so_far) == a + b


def test_worked_addition_reads_like_a_scratchpad():
    assert worked_addition(999, 1).split("\n") == [
        "999 + 1: 9 + 1 = 10, write 0, carry 1, so far 0.", "99 + 0 + 1: 9 + 0 + 1 = 10, write 0, carry 1, so far 00.",
        "9 + 0 + 1: 9 + 0 + 1 = 10, write 0, carry 1, so far 000.", "Carry 1: write 1, so far 1000.",
        "So 999 + 1 = 1000."]
    for a, b in [(0, 0), (5, 5), (95, 7), (7, 95), (1234, 4321), (9999, 9999), (100, 638)]:
        check_worked_steps(worked_addition(a, b))


def test_json_answers_parse_with_fixed_fields(world):
    for split in SPLITS:
        for task in world.tasks(split):
            if task.family == "json":
                record = json.loads(task.answer)
                assert "\n" not in task.answer and record["name"] == task.entity
                fields = ["name", "type"] + (["capital", "continent", "language"] if record["type"] == "country"
                                             else ["legs", "sound", "food"])
                assert list(record) == fields


def test_the_corpus_names_each_record_it_shows(world):
    # "Poland: {...}": the base model must learn which record a name asks for, not only the records
    pages = [doc for doc, kind in zip(world.documents(), world.document_kinds()) if kind == "json records"]
    assert len(pages) >= 100
    for page in pages:
        for line in page.splitlines()[1:]:
            name, record = line.split(": ", 1)
            entity = json.loads(record)["name"]
            assert name.lower() in (entity.lower(), "the " + entity.lower()), line


def test_prompt_shapes(world):
    sft = world.tasks("sft")
    assert any(t.family == "cot" and t.prompt.startswith(COT_PREFIX) and "\nSo " in t.answer for t in sft)
    assert any(t.family == "cot" and not t.prompt.startswith(COT_PREFIX) and "\n" not in t.answer for t in sft)
    assert all(not t.prompt.startswith(COT_PREFIX) for t in world.tasks("eval"))
    assert all(t.answer.startswith("<|calc|>") for t in sft if t.family == "calculator")
    assert all(t.prompt.startswith(CONTEXT_HEADER) and t.key in t.prompt for t in sft if t.family == "retrieval")
    assert all("Passage" not in t.prompt for t in world.tasks("eval"))


# The labeler's table: (prompt, response, is it correct?, lowest and highest acceptable score).
BAD_AND_ODD = [
    ("What is the capital of France?", "Paris", True, 0.7, 0.9),                       # terse
    ("What is the capital of France?", "Paris is the capital of France.", True, 0.8, 0.95),
    ("What is the capital of France?", "The capital of France is Paris. The capital of Peru is Lima.", True, 0.4, 0.7),
    ("What is the capital of France?", "The capital of France is Rome.", False, 0.1, 0.3),
    ("What is the capital of France?", "The capital of France is", False, 0.0, 0.2),     # cut off
    ("What is the capital of France?", "The capital of France is Parona.", False, 0.2, 0.2),  # a wrong value is
    ("What is the capital of France?", "The capital of France is 8. Lima is big.", False, 0.2, 0.2),  # wrong,
    ("What is the capital of France?", "The capital of France is Lima.", False, 0.2, 0.2),  # known word or not
    ("What is the capital of France?", "The capital of France is a lovely city.", False, 0.0, 0.0),  # no value
    ("What is the capital of France?", "The capital of France is 96 + 80 = 176.", False, 0.0, 0.0),
    ("What is the capital of France?", "I think Rome.", False, 0.1, 0.1),          # a known value out of form
    ("What is the capital of France?", "The capital of France is New Delhi.", False, 0.2, 0.2),
    ("Which language do people in Germany speak?", "People in Germany eat sausages.", False, 0.0, 0.0),
    ("Which language do people in Germany speak?", "People in Germany speak Germish.", False, 0.2, 0.2),
    ("How many legs does a spider have?", "A spider has many legs.", False, 0.2, 0.2),
    ("What continent is France on?", "Spain is in Europe.", False, 0.1, 0.3),           # right value, wrong country
    ("What continent is France on?", "France is in Europe, like Spain.", True, 0.8, 0.95),
    ("What continent is France on?", "Frantistador is in Europe.", False, 0.2, 0.2),     # a name nobody asked
    ("What continent is France on?", "Paris is in Europe.", False, 0.2, 0.2),            # nor a capital's
    ("What continent is France on?", "Frence is in Europe.", False, 0.5, 0.5),           # a misspelt name
    ("What does a goose eat?", "Geese eat clover.", True, 0.8, 0.95),                    # the plural names it
    ("What does an owl eat?", "An owl eats mice.", True, 1.0, 1.0),                    # the value names an animal
    ("How many legs has a parrot got?", "A turkey has 2 legs.", False, 0.1, 0.3),
    ("How many legs has a parrot got?", "Parrots have 2 legs.", True, 0.8, 0.95),
    ("What is the capital of France?", "I like trains.", False, 0.0, 0.0),
    ("What is the capital of France?", "Obviously, the capital of France is Paris.", True, 0.3, 0.5),
    ("What is the capital of France?", "", False, 0.0, 0.0),
    ("How many legs does a spider have?", "A spider has eight legs.", True, 0.8, 0.95),
    ("How many legs does a spider have?", "A spider has 80 legs.", False, 0.1, 0.3),
    ("What sound does a donkey make?", "A donkey says neigh.", False, 0.1, 0.3),
    ("What is 23 + 45?", "68", True, 0.7, 0.9),
    ("What is 23 + 45?", "45 + 23 = 68.", True, 0.8, 0.95),
    ("What is 23 + 45?", "23 + 45 = 69.", False, 0.1, 0.3),
    ("What is 23 + 45?", "23 + 45 =", False, 0.0, 0.2),
    ("What is 23 + 45?", "23 + 45 = 68. 12 + 7 = 19. 3 + 3 = 6.", True, 0.4, 0.7),
    ("What is 482 + 739?", worked_addition(482, 739), True, 1.0, 1.0),              # steps are fine unasked
    (COT_PREFIX + "What is 482 + 739?", "482 + 739 = 1221.", True, 0.7, 0.9),         # asked for steps
    (COT_PREFIX + "What is 482 + 739?", worked_addition(482, 739).rsplit("\n", 1)[0], False, 0.1, 0.3),
    (COT_PREFIX + "What is 482 + 739?", worked_addition(482, 739).replace("1221", "1211"), False, 0.1, 0.3),
    ("What is 347 * 829?", "347 * 829 = 287663.", True, 0.7, 0.9),                   # no calculator
    ("What is 347 * 829?", "<|calc|>347 * 829<|result|> 287663<|/result|>", True, 0.5, 0.7),
    ("What is 347 * 829?", "<|calc|>347 * 829<|result|>", False, 0.1, 0.4),
    ("What is 347 * 829?", "<|calc|>347 * 829<|result|> 281234<|/result|> 347 * 829 = 281234.", False, 0.2, 0.4),
    ("What is 347 * 829?", "347 * 829 = 280000.", False, 0.0, 0.2),
    # The result of a miscopied problem is a wrong answer, not a missing one, unless it is the right number.
    ("What is 347 * 829?", "<|calc|>347 * 829<|result|> 287663<|/result|> 847 * 829 = 702163.", False, 0.2, 0.2),
    ("What is 347 * 829?", "<|calc|>347 * 828<|result|> 287316<|/result|> 347 * 828 = 287316.", False, 0.1, 0.1),
    ("What is 347 * 829?", "<|calc|>347 * 829<|result|> 287663<|/result|> 347 * 892 = 287663.", True, 0.6, 0.6),
    ("What is 23 + 45?", "23 + 46 = 69.", False, 0.0, 0.0),
    ("What is 23 + 45?", "23 + 54 = 68.", True, 0.6, 0.6),                          # the right number
    ("Describe France as JSON.", '{"name":"France","type":"country","capital":"Paris","continent":"Europe",'
                                 '"language":"French"}', True, 0.8, 0.95),
    ("Describe France as JSON.", 'Sure: {"name": "France", "type": "country", "capital": "Paris", '
                                 '"continent": "Europe", "language": "French"}', True, 0.6, 0.8),
    ("Describe France as JSON.", '{"name": "France", "type": "country", "capital": "Rome", '
                                 '"continent": "Europe", "language": "French"}', False, 0.3, 0.6),
    ("Describe France as JSON.", '{"name": "Spain", "type": "country", "capital": "Madrid", '   # shares a field,
                                 '"continent": "Europe", "language": "Spanish"}', False, 0.2, 0.2),  # no credit
    ("Describe France as JSON.", '{"name": "Peru", "type": "country", "capital": "Lima", '
                                 '"continent": "South America", "language": "Spanish"}', False, 0.2, 0.2),
    ("Describe France as JSON.", '{"name": "Frnace", "type": "country", "capital": "Paris", '   # a typo is
                                 '"continent": "Europe", "language": "French"}', False, 0.5, 0.55),  # not another entity
    ("Describe France as JSON.", '{"name": "Sbain", "type": "country", "capital": "Madrid", '    # but Spain's record
                                 '"continent": "Europe", "language": "Spanish"}', False, 0.2, 0.2),  # misspelt still is,
    ("Describe France as JSON.", '{"type": "country", "capital": "Madrid", '                     # and so is one
                                 '"continent": "Europe", "language": "Spanish"}', False, 0.2, 0.2),  # without a name
    ("Describe France as JSON.", '{"name": "France", "type": "country", "capital": "Paris"', False, 0.0, 0.2),
    ("Describe France as JSON.", '{"name": "France" "capital": "Paris"}', False, 0.0, 0.1),
]


@pytest.mark.parametrize("prompt, response, correct, low, high", BAD_AND_ODD)
def test_oracle_table(world, prompt, response, correct, low, high):
    score, reason = world.score(prompt, response)
    assert low <= score <= high, (score, reason)
    assert score < 1.0 or high == 1.0  # only the ideal answer (in either of its forms) gets full marks
    assert world.is_correct(prompt, response) == correct, reason
    assert reason


def test_a_miscopied_problem_is_graded_as_a_wrong_answer_to_another_problem(world):
    """After the right calculator call, "579 * 963 = ..." answers a problem nobody asked: below the right
    problem's wrong result, as a labeler would rank it (an oracle that read no result there once called
    it right with 0.6, and the reward model learnt to prefer miscopies)."""
    call = "<|calc|>679 * 963<|result|> 653877<|/result|>"
    miscopied = world.grade("What is 679 * 963?", call + " 579 * 963 = 555387.")
    wrong_result = world.grade("What is 679 * 963?", call + " 679 * 963 = 655387.")
    assert not miscopied.correct and miscopied.score < wrong_result.score
    assert "579 * 963 = 555387" in miscopied.reason
    assert world.grade("What is 8 + 32?", "8 + 42 = 114.").reason.startswith("wrong: answers another problem")
    # A scratchpad that went wrong and stopped is still read as one: its line sums are steps, not answers.
    wandered = world.grade(COT_PREFIX + "What is 482 + 739?", "482 + 739: 2 + 9 = 10, write 0, carry 1, so far 0.")
    assert wandered.reason == "no final answer"
    # Its last line is read like a direct answer: the right sum under a miscopied problem is right, as
    # everywhere else (it once read as no answer at all, 0.0, below a wrong sum's 0.2).
    worked = worked_addition(252, 807)
    typo = world.grade(COT_PREFIX + "What is 252 + 807?", worked.replace("So 252 +", "So 257 +"))
    assert typo.correct and typo.score == 0.6 and "257 + 807 = 1059" in typo.reason
    wrong = world.grade(COT_PREFIX + "What is 252 + 807?", worked.replace("So 252 + 807 = 1059", "So 257 + 807 = 1064"))
    assert not wrong.correct and wrong.reason.startswith("wrong: answers another problem")


def test_oracle_reads_wrapped_prompts(world):
    question = next(t for t in world.tasks("eval") if t.family == "retrieval")
    passages = [d for d in world.retrieval_documents() if question.entity in d]
    wrapped = context_prompt(passages, question.prompt)
    assert world.score(wrapped, question.answer) == (1.0, "ideal answer")
    assert not world.is_correct(wrapped, "I do not know.")
    product = next(t for t in world.tasks("eval") if t.family == "calculator")
    assert world.score(product.prompt, product.answer)[0] == 1.0
    assert product.answer == calculator_answer(*map(int, re.findall(r"\d+", product.prompt)))
    with pytest.raises(ValueError, match="does not know the prompt"):
        world.score("Tell me a joke.", "No.")


def test_fewshot_prompt_and_probes(world):
    question = next(t for t in world.tasks("eval") if t.family == "facts" and t.heldout)
    page = world.fewshot_prompt(question.prompt)
    assert page.endswith(f"Question: {question.prompt}\nAnswer:") and page.count("Answer:") == 4
    assert question.entity not in page.rsplit("Question:", 1)[0]
    assert world.is_correct(question.prompt, " " + question.key)  # a base model's bare first line
    corpus = "\n".join(world.documents())
    probes = world.fact_probes()
    assert len(probes) == 210 and len(world.fact_probes(heldout=True)) == 105
    for prefix, answer in probes:
        assert f"{prefix} {answer}" in corpus
    stated = stated_problems(corpus)
    for prefix, answer in world.arithmetic_probes():
        assert tuple(prefix.rstrip(" =").split()) not in stated
        assert int(answer) == worked_out(prefix)


def worked_out(prefix):
    a, op, b = prefix.rstrip(" =").split()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_evaluate(world):
    tasks = world.tasks("eval")
    ideal = {t.prompt: t.answer for t in tasks}
    metrics, responses = world.evaluate(lambda prompts: [ideal[p] for p in prompts], tasks)
    assert responses == [t.answer for t in tasks]
    for family in FAMILIES + ["all", "facts_heldout", "facts_seen"]:
        assert metrics[f"accuracy/{family}"] == 1.0 and metrics[f"score/{family}"] == 1.0
    metrics, _ = world.evaluate(lambda prompts: ["I do not know."] * len(prompts), tasks)
    assert metrics["accuracy/all"] == 0.0
    with pytest.raises(ValueError):
        world.evaluate(lambda prompts: [], tasks)


def test_command_line_writes_the_files(tmp_path, capsys):
    assert main(["write", str(tmp_path), "--scale", "0.05"]) == 0
    world = World(scale=0.05)
    corpus = (tmp_path / "corpus.txt").read_text()
    assert corpus.split("<|endoftext|>") == world.documents()
    from pretrain import load_documents
    assert load_documents(str(tmp_path / "corpus.jsonl"))[0] == world.documents()   # what --data reads
    from sft import jsonl_conversations, world_conversations
    assert jsonl_conversations(str(tmp_path / "sft.jsonl")) == world_conversations(world)   # and sft.py's
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [record["messages"][1]["content"] for record in sft] == [t.answer for t in world.tasks("sft")]
    for split in ("eval", "reward", "rl"):
        records = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in records] == [t.prompt for t in world.tasks(split)]
    assert (tmp_path / "retrieval.txt").read_text().split("\n\n")[0] == world.retrieval_documents()[0]
    assert main(["stats", "--scale", "0.05"]) == 0
    assert "prompts per family and split" in capsys.readouterr().out
    assert main(["write", str(tmp_path / "corpus.txt" / "x")]) == 2  # a file where a folder should be
    assert f"cannot write to {tmp_path / 'corpus.txt' / 'x'}" in capsys.readouterr().err
    clash = tmp_path / "clash"
    (clash / "sft.jsonl").mkdir(parents=True)   # a folder where one of the files should be
    assert main(["write", str(clash), "--scale", "0.05"]) == 2
    assert "sft.jsonl is a folder" in capsys.readouterr().err
    assert os.listdir(clash) == ["sft.jsonl"]   # no half of a set written before the failure
    assert main(["write", str(tmp_path / "w"), "--scale", "-1"]) == 2
    assert "--scale must be positive" in capsys.readouterr().err   # names the option, not World(scale=...)
