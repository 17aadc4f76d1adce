"""The talk's "applying GPT assistants" techniques in sample.py: the calculator tool (its parser, and the
generation loop that runs it), the constrained-JSON checker and mask, and retrieval."""

import json
import random

import numpy as np
import pytest

import sample
from bpe import TOOL_RESULT_PREFIX, UsageError, render_chat, response_text
from conftest import teach
from model import Generation, load_model
from sample import (JsonPrefix, Retriever, Sampling, TfidfEmbedder, ModelEmbedder, calculate, calculator_result,
                    chat_answers, generate_answers, json_prefix_ok, split_chunks)


# --- the calculator's parser -------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", "7"),                    # precedence
    ("(1 + 2) * 3", "9"),                  # parentheses
    ("2 * (3 + (4 - 1)) / 3", "4"),
    ("10 - 4 - 3", "3"),                   # left to right
    ("100 / 10 / 5", "2"),
    ("-5 + 3", "-2"),                      # unary minus
    ("-(2 + 3) * -2", "10"),
    ("2 - -3", "5"),
    ("347 * 829", "287663"),
    ("347 × 829", "287663"),               # the operators people write
    ("84 ÷ 4", "21"),
    ("7 − 10", "-3"),
    ("7 / 2", "3.5"),
    ("1 / 3", "0.333333"),
    ("0.1 + 0.2", "0.3"),                  # exact: no floating-point 0.30000000000000004
    ("123456789012345678901234567890 * 987654321", str(123456789012345678901234567890 * 987654321)),
    ("  12  ", "12"),
    ("100000000000000000000 / 3", "33333333333333333333.333333"),   # rounded exactly, not through a float
    ("-2 / 3", "-0.666667"),
    ("1 / 3000000", "1/3000000"),           # too small for 6 places: the exact fraction, not "0"
])
def test_calculator_computes(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression, reason", [
    ("1 / 0", "division by zero"),
    ("5 / (3 - 3)", "division by zero"),
    ("__import__('os').system('ls')", "unexpected"),   # never eval: anything outside the grammar is an error
    ("os.system('rm -rf /')", "unexpected"),
    ("2 ** 10", "unexpected"),
    ("1e400", "unexpected"),
    ("", "empty"),
    ("3 +", "expected a number"),
    ("(1 + 2", "missing )"),
    ("1 + 2)", "unexpected"),
    ("1.2.3", "bad number"),
    ("9" * 41, "digits"),
    ("1 + " * 60 + "1", "longer than"),
    ("(" * 31 + "1" + ")" * 31, "nested"),
    ("99999999999999999999 * 99999999999999999999 * 99999999999999999999 * 99999999999999999999", "too large"),
])
def test_calculator_rejects_with_an_error_the_model_sees(expression, reason):
    result = calculator_result(expression)
    assert result.startswith("error: ") and reason in result


# --- the tool inside generation ----------------------------------------------------------------

class ScriptedModel:
    """A stand-in "model" that writes a fixed script: first a calculator call, then — once it can see
    the tool's result in its context — a sentence with that result. It behaves like GPT.generate
    (stops on stop tokens, keeps the stop token, streams through on_token)."""

    def __init__(self, tokenizer, block_size=256):
        self.tokenizer = tokenizer
        self.config = type("Config", (), {"block_size": block_size})()
        self.calls = []

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                 seed=None, logits_hook=None, on_token=None):
        specials = self.tokenizer.special_tokens
        generations = []
        for row, prompt in enumerate(prompts):
            self.calls.append(list(prompt))
            if specials["<|/result|>"] in prompt:
                result = self.tokenizer.decode(prompt[prompt.index(specials["<|result|>"]) + 1:-1]).strip()
                script = self.tokenizer.encode(f" so it is {result}.") + [specials["<|end|>"]]
            else:
                # the space render_chat puts before every message, then the call (as a trained model writes it)
                script = (self.tokenizer.encode(" ") + [specials["<|calc|>"]] + self.tokenizer.encode("12 * (3 + 4)")
                          + [specials["<|result|>"]])
            tokens = []
            for token in script[:max_new_tokens]:
                tokens.append(token)
                if on_token:
                    on_token(row, token)
                if token in stop_tokens:
                    break
            generations.append(Generation(tokens, [0.0] * len(tokens), tokens[-1] in stop_tokens))
        return generations


def test_a_tool_call_gets_the_result_inserted_and_generation_continues(tiny_tokenizer):
    model = ScriptedModel(tiny_tokenizer)
    specials = tiny_tokenizer.special_tokens
    prompt, _ = render_chat(tiny_tokenizer, [{"role": "user", "content": "what is 12 * 7?"}], add_generation_prompt=True)
    streamed = []
    answer = generate_answers(model, tiny_tokenizer, [prompt], Sampling(max_new_tokens=64, tool=True),
                              [specials["<|end|>"]], on_token=lambda index, token: streamed.append(token))[0]
    message = "<|calc|>12 * (3 + 4)<|result|> 84<|/result|> so it is 84."
    assert response_text(tiny_tokenizer, answer) == message
    # rendered back into a conversation (the next turn's history), it is exactly the tokens generated
    history, _ = render_chat(tiny_tokenizer, [{"role": "user", "content": "what is 12 * 7?"},
                                              {"role": "assistant", "content": message}])
    assert history == prompt + answer + [specials["<|end|>"]]
    assert len(model.calls) == 2                       # paused at <|result|>, then resumed
    assert model.calls[1] == prompt + answer[:answer.index(specials["<|/result|>"]) + 1]
    assert streamed == answer + [specials["<|end|>"]]  # the inserted result is streamed too


def test_the_sft_answers_write_the_result_as_the_tool_does(tiny_tokenizer):
    """SFT shows the model the calculator's output as the tool inserts it, after TOOL_RESULT_PREFIX: an
    assistant trained on one layout and used with another would copy from text it never saw (bpe.py)."""
    from data.tinyworld import calculator_answer
    model = ScriptedModel(tiny_tokenizer)
    prompt, _ = render_chat(tiny_tokenizer, [{"role": "user", "content": "what is 12 * 7?"}], add_generation_prompt=True)
    answer = generate_answers(model, tiny_tokenizer, [prompt], Sampling(max_new_tokens=64, tool=True),
                              [tiny_tokenizer.special_tokens["<|end|>"]])[0]
    inserted = response_text(tiny_tokenizer, answer).split("<|result|>")[1].split("<|/result|>")[0]
    assert inserted == TOOL_RESULT_PREFIX + "84"
    assert f"<|result|>{inserted}<|/result|>" in calculator_answer(12, 7)


def test_a_result_that_would_pass_the_end_of_the_context_is_cut_there(tiny_tokenizer):
    specials = tiny_tokenizer.special_tokens
    prompt, _ = render_chat(tiny_tokenizer, [{"role": "user", "content": "what is 12 * 7?"}], add_generation_prompt=True)
    call = tiny_tokenizer.encode(" ") + [specials["<|calc|>"]] + tiny_tokenizer.encode("12 * (3 + 4)") + [specials["<|result|>"]]
    model = ScriptedModel(tiny_tokenizer, block_size=len(prompt) + len(call) + 1)   # room for one more token
    answer = generate_answers(model, tiny_tokenizer, [prompt], Sampling(max_new_tokens=64, tool=True),
                              [specials["<|end|>"]])[0]
    assert answer == call + tiny_tokenizer.encode(" 84")[:1]   # the result's first token, then the context ends
    assert len(prompt) + len(answer) == model.config.block_size and len(model.calls) == 1


def test_without_tool_execution_the_model_is_left_to_write_the_result(tiny_tokenizer):
    model = ScriptedModel(tiny_tokenizer)
    specials = tiny_tokenizer.special_tokens
    prompt = [specials["<|assistant|>"]]
    answer = generate_answers(model, tiny_tokenizer, [prompt], Sampling(max_new_tokens=64, tool=False),
                              [specials["<|end|>"]])[0]
    assert len(model.calls) == 1 and specials["<|/result|>"] not in answer


# --- the JSON prefix checker -------------------------------------------------------------------

VALID_PREFIXES = ['', ' ', '{', '{"', '{"a', '{"a"', '{"a":', '{"a": 1', '{"a": 1,', '{"a": 1, "b": [',
                  '{"a": [1, 2.5, -3e+2, true, false, null, "x"]}', '[', '[]', '[[[', '"', '"ab\\n', '"\\u00e',
                  '"é', '-', '-0', '0.', '1.5e', '1.5e-', 'tru', 'nul', '123', '{"a": {"b": {}}}  ', '"done"']
INVALID_PREFIXES = ['}', ']', '{]', '{"a" 1', '{"a":}', '{,', '{"a": 1,}', '[1,]', '[1 2]', '01', '-a', '1..',
                    '1.e', 'trux', 'nulll', '"\x01"', '"\\x"', '"\\u12g', '{"a": 1}}', '{"a": 1} 2', "'a'",
                    '{a: 1}', '[1,,2]', 'True', '{"a": 1]', '[1}']


@pytest.mark.parametrize("text", VALID_PREFIXES)
def test_json_prefix_checker_accepts_valid_prefixes(text):
    assert json_prefix_ok(text)


@pytest.mark.parametrize("text", INVALID_PREFIXES)
def test_json_prefix_checker_rejects_invalid_prefixes(text):
    assert not json_prefix_ok(text)


@pytest.mark.parametrize("text", VALID_PREFIXES)
def test_the_closing_finishes_every_valid_prefix(text):
    checker = JsonPrefix()
    state = checker.feed(checker.start(), text.encode())
    closed = text + checker.closing(state).decode()
    json.loads(closed)  # raises if it does not parse
    assert checker.is_complete(checker.feed(checker.start(), closed.encode()))


def test_required_fields():
    assert json_prefix_ok('{"name": "x", "age"', required=["name", "age"])
    assert not json_prefix_ok('[1]', required=["name"])             # a schema asks for an object
    assert not json_prefix_ok('{"name": "x"}', required=["name", "age"])   # cannot close without "age"
    assert json_prefix_ok('{"name": "x", "age": 3}', required=["name", "age"])
    checker = JsonPrefix(["name", "age"])
    for text in ['', '{', '{"na', '{"other": [1', '{"age": 2']:
        closed = text + checker.closing(checker.feed(checker.start(), text.encode())).decode()
        assert set(json.loads(closed)) >= {"name", "age"}


def random_prefixes(checker, seed, walks=300):
    """(text, state) pairs reached by feeding random bytes the checker accepts: every mode, nesting,
    escapes, keys."""
    alphabet = b'{}[]",:0123456789-+.eEtrufalsn \\u abxyz'
    rng = random.Random(seed)
    for _ in range(walks):
        text, state = b"", checker.start()
        for _ in range(rng.randint(0, 30)):
            byte = rng.choice([b for b in alphabet if checker.step(state, b) is not None])
            text, state = text + bytes([byte]), checker.step(state, byte)
            yield text, state


@pytest.mark.parametrize("required", [(), ("a", "ab"), ("name", "age")])
def test_closing_is_consistent_and_its_length_is_counted_right(required):
    """The closing finishes any prefix into JSON with the required fields; writing its first byte leaves
    exactly the rest of it (what lets the mask promise that an answer with n tokens left can still be
    closed); closing_length, the fast count the mask uses, equals its length."""
    checker = JsonPrefix(required)
    for text, state in random_prefixes(checker, seed=len(required)):
        closing = checker.closing(state)
        value = json.loads(text + closing)
        assert set(required) <= set(value if required else [])
        assert checker.closing_length(state) == len(closing)
        if closing:
            assert checker.closing(checker.step(state, closing[0])) == closing[1:]


# --- constrained sampling from a real (random, tiny) model -------------------------------------

@pytest.mark.parametrize("temperature, top_k, required", [(1.0, None, []), (0.0, None, []), (1.5, 20, ["name", "age"])])
def test_constrained_sampling_always_parses(tmp_path, make_checkpoint, temperature, top_k, required):
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    end = tokenizer.special_tokens["<|end|>"]
    prompts = [tokenizer.encode(f"describe thing {k} as JSON") for k in range(4)]
    for seed in range(3):
        sampling = Sampling(max_new_tokens=24, temperature=temperature, top_k=top_k, seed=seed, json_fields=required)
        answers = generate_answers(model, tokenizer, prompts, sampling, [end])
        for answer in answers:
            value = json.loads(tokenizer.decode(answer))
            assert set(required) <= set(value if required else [])


def test_the_mask_leaves_already_valid_choices_alone(tmp_path, make_checkpoint):
    """Greedy with the mask = greedy without, for as long as the unconstrained choice is allowed: a model
    that learnt a valid record writes it unchanged under the mask; one that learnt an invalid record (an
    unquoted key) writes the same up to that key, and from there something that parses."""
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    questions = ["Describe the frog as JSON.", "Describe the cat as JSON."]
    teach(model, tokenizer, list(zip(questions, ['{"name": "frog", "legs": 4}', '{"name": "cat", legs: 4}'])),
          steps=100)
    free, masked = (chat_answers(model, tokenizer, questions, Sampling(max_new_tokens=30, temperature=0.0,
                                                                     json_fields=fields)) for fields in (None, []))
    assert free == ['{"name": "frog", "legs": 4}', '{"name": "cat", legs: 4}']   # what it learnt
    assert masked[0] == free[0]
    assert masked[1].startswith('{"name": "cat",') and not masked[1].startswith('{"name": "cat", legs')
    json.loads(masked[1])


# --- retrieval ---------------------------------------------------------------------------------

CORPUS = [
    "Quillon is a harbour town in the north. The mayor of Quillon is Ada Brenner. Quillon exports salt.",
    "Marrowby is a mountain village. The mayor of Marrowby is Tomas Ilk. Marrowby is known for goats.",
    "Vesk is a river city with seven bridges. The mayor of Vesk is Lena Ost. Vesk makes glass.",
    "The river Tandle runs past Vesk and Marrowby into the sea near Quillon.",
    "Salt, goats and glass are traded at the autumn fair, where every town sends a stall.",
]


def test_retrieval_finds_the_passage_with_the_answer():
    retriever = Retriever.build(CORPUS, TfidfEmbedder())
    for question, answer in [("Who is the mayor of Vesk?", "Lena Ost"), ("Who is the mayor of Marrowby?", "Tomas Ilk"),
                             ("What does Quillon export?", "salt")]:
        score, passage = retriever.search(question, k=1)[0]
        assert answer in passage and score > 0
    assert len(retriever.search("mayor", k=3)) == 3


def test_the_default_k_retrieves_both_passages_of_the_country_asked_about(world):
    # Why --retrieve_k is 2: the tiny world has two passages about each retrieval-only country, and TF-IDF
    # ranks them first; a third passage would be about another country, which misleads the small model.
    retriever = Retriever.build(world.retrieval_documents(), TfidfEmbedder())
    questions = [task for task in world.tasks("eval") if task.family == "retrieval"]
    assert sample.Config().retrieve_k == 2 and len(questions) >= 40
    for task in questions:
        passages = [chunk for _, chunk in retriever.search(task.prompt, k=3)]
        assert [task.entity in passage for passage in passages] == [True, True, False], task.prompt


def test_held_out_tasks_as_asked_carry_their_technique_and_are_graded_against_it(world):
    # reward.py holds these out and rlhf.py evaluates on them: posed as the reward and RL splits pose theirs
    from data.tinyworld import COT_PREFIX
    tasks = world.tasks("eval")
    asked = sample.tasks_as_asked(world, tasks)
    assert [(t.family, t.answer, t.key, t.entity) for t in asked] == [(t.family, t.answer, t.key, t.entity) for t in tasks]
    for bare, posed in zip(tasks, asked):
        if bare.family == "cot":
            assert posed.prompt == COT_PREFIX + bare.prompt
            assert world.grade(posed.prompt, bare.answer).score == 0.8     # right, but no steps shown
        elif bare.family == "retrieval":
            assert posed.prompt.startswith("Answer using the passages below.") and posed.prompt.endswith(bare.prompt)
            assert posed.prompt.count(bare.entity) >= 3                    # both of its passages, and the question
            assert world.grade(posed.prompt, bare.answer).correct
        else:
            assert posed.prompt == bare.prompt
        assert world.family_of(posed.prompt) == bare.family


def test_chunks_respect_the_word_limit_and_keep_short_documents_whole():
    chunks = split_chunks(CORPUS + [" ".join(f"Sentence number {k}." for k in range(40))], max_words=20)
    assert chunks[:5] == CORPUS
    assert all(len(chunk.split()) <= 20 for chunk in chunks)
    assert " ".join(chunks[5:]).split() == " ".join(f"Sentence number {k}." for k in range(40)).split()


def test_index_save_and_load_round_trip(tmp_path, make_checkpoint):
    path = tmp_path / "index.npz"
    retriever = Retriever.build(CORPUS, TfidfEmbedder())
    retriever.save(path)
    loaded = Retriever.load(path)
    assert loaded.chunks == retriever.chunks
    np.testing.assert_array_equal(loaded.vectors, retriever.vectors)
    assert loaded.search("mayor of Vesk", 2) == retriever.search("mayor of Vesk", 2)

    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    by_model = Retriever.build(CORPUS, ModelEmbedder(model, tokenizer))
    by_model.save(path)
    loaded = Retriever.load(path, model, tokenizer)
    np.testing.assert_array_equal(loaded.vectors, by_model.vectors)
    assert loaded.search("mayor of Vesk", 2) == by_model.search("mayor of Vesk", 2)
    other, _, _ = load_model(make_checkpoint(tmp_path / "other.pt", "sft", seed=1))
    with pytest.raises(sample.UsageError, match="different model"):
        Retriever.load(path, other, tokenizer)


def test_model_embeddings_do_not_depend_on_the_batch(tmp_path, make_checkpoint):
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    embedder = ModelEmbedder(model, tokenizer)
    together = embedder.embed(CORPUS)
    alone = np.concatenate([embedder.embed([text]) for text in CORPUS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


# --- the techniques from the command line ------------------------------------------------------

def test_retrieval_puts_the_passage_in_the_prompt_and_keeps_its_index(tmp_path, make_checkpoint, recorded_prompts):
    docs, index = tmp_path / "docs.txt", tmp_path / "index.npz"
    docs.write_text("\n\n".join(CORPUS))
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    _, tokenizer, _ = load_model(path)
    config = sample.Config(ckpt=path, prompt="Who is the mayor of Vesk?", docs=str(docs), index=str(index),
                           retrieve_k=1, max_new_tokens=4)
    sample.main(config)
    assert index.exists()
    assert "Passage 1: Vesk is a river city" in tokenizer.decode(recorded_prompts[-1])
    sample.main(config)   # the saved index, loaded
    assert "Passage 1: Vesk is a river city" in tokenizer.decode(recorded_prompts[-1])
    docs.write_text("Nothing useful here.")   # an index of other passages is refused, not used
    with pytest.raises(UsageError, match="holds other passages"):
        sample.main(config)
    with pytest.raises(UsageError, match="another --embedding"):
        sample.main(sample.Config(**{**config.__dict__, "embedding": "model"}))


def test_cot_asks_for_the_steps(tmp_path, make_checkpoint, recorded_prompts):
    from data.tinyworld import COT_PREFIX
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    _, tokenizer, _ = load_model(path)
    sample.main(sample.Config(ckpt=path, prompt="What is 123 + 456?", cot=True, max_new_tokens=4))
    assert f"<|user|> {COT_PREFIX}What is 123 + 456?<|end|>" in tokenizer.decode(recorded_prompts[-1])


def test_json_from_the_command_line_always_parses(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    answers = sample.main(sample.Config(ckpt=path, prompt="Describe a cat as JSON.", json=True, schema="name,legs",
                                        num_samples=4, temperature=1.0, max_new_tokens=40))["answers"]
    assert len(answers) == 4
    assert all({"name", "legs"} <= set(json.loads(answer)) for answer in answers)
    with pytest.raises(sample.UsageError, match="needs at least"):
        sample.main(sample.Config(ckpt=path, prompt="Describe a cat.", json=True, schema="name,legs", max_new_tokens=5))


def test_documents_from_a_file_or_a_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("First document,\nstill the first.\n\n\nSecond document.\n")
    assert sample.read_documents(str(tmp_path / "notes.txt")) == ["First document,\nstill the first.", "Second document."]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("bee")
    (folder / "a.txt").write_text("ay")
    (folder / "skip.md").write_text("not a .txt")
    assert sample.read_documents(str(folder)) == ["ay", "bee"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(sample.UsageError, match="empty"):
        sample.read_documents(str(tmp_path / "empty.txt"))
