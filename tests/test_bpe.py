"""Tests for bpe.py: exact round trips, the fast trainer against the plain one, GPT-2 files, chat masks."""

import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bpe  # noqa: E402
from bpe import SPECIAL_TOKENS, Tokenizer, UsageError, render_chat, response_text  # noqa: E402

CORPUS = """First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak. We're told 347 + 829 = 1176, and they'll say it's so.
The capital of France is Paris; the capital of Peru is Lima. A cat has 4 legs and says "meow".
def foo_bar(x): return x__init__  # underscores_matter
Naïve café, 東京タワー, emoji 😀👍🏽, e\u0301 (combining), tabs\tand\r\nCRLF lines.
""" * 20

HAND_PICKED = [
    "", " ", "\n", "\n\n\n", "  \t  \r\n ", "a", "hello world", "Hello, World!!! How's it going?",
    "foo_bar __init__ _", "x" * 300, "347 * 829 = 287663", "3.14159e-10", "٣٤٥ ２０２３ ²½",
    "😀", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵", "東京は日本の首都です。", "e\u0301\u0302\u0303", "Ωμέγα ∑∫√",
    "<|endoftext|>", "<|end|>x<|user|>", "<|", "|>", "'s 'LL 've", "\x00\x01\x7f\u00ad\u200b\ufeff",
    "\U0010ffff\U000e0001", "a\ud83db",   # a lone surrogate (e.g. from json.loads of a cut-off line)
]


def random_unicode_strings(seed, count=200):
    """Strings mixing ASCII, whitespace, digits, marks, CJK, emoji, specials and any code point at all."""
    rng = random.Random(seed)
    pools = [
        lambda: rng.choice("abcXYZ _-.,!?'\"()"), lambda: rng.choice(" \t\n\r\x0b\x0c\u00a0\u2028\u3000"),
        lambda: rng.choice("0123456789٣२"), lambda: chr(rng.randint(0x300, 0x36F)),
        lambda: chr(rng.randint(0x4E00, 0x4FFF)), lambda: chr(rng.randint(0x1F300, 0x1F6FF)),
        lambda: rng.choice(SPECIAL_TOKENS), lambda: chr(rng.randint(0, 0x10FFFF)),
    ]
    return ["".join(rng.choice(pools)() for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, 400)


# --- the classic example and the training algorithms -------------------------------------------------

def test_classic_example_aaabdaaabac():
    tok = Tokenizer.train("aaabdaaabac", 256 + 3, special_tokens=[], pattern=None)
    # aa -> 256 (4 times); then ab and (256, a) both occur twice: the smaller pair (97, 98) wins the tie.
    assert tok.merges == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"


def all_chunks(texts, pattern):
    compiled = bpe.compile_pattern(pattern)
    return [chunk.encode("utf-8") for text in texts for chunk in bpe.split_text(compiled, text)]


@pytest.mark.parametrize("texts, pattern, num_merges", [
    ([CORPUS[:3000]], bpe.SPLIT_PATTERN, 10_000),          # until no pair occurs twice
    ([CORPUS[:3000]], bpe.GPT2_SPLIT_PATTERN, 150),
    (["aaabdaaabac" * 7, "abcabcab", "zzzz"], None, 10_000),
])
def test_fast_training_gives_the_reference_merges(texts, pattern, num_merges):
    chunks = all_chunks(texts, pattern)
    reference = bpe.train_merges_reference(chunks, num_merges)
    assert len(reference) > 10
    assert bpe.train_merges_fast(Counter(chunks), num_merges) == reference


def test_fast_training_gives_the_reference_merges_on_random_tie_heavy_texts():
    rng = random.Random(1)
    for _ in range(30):
        alphabet = rng.choice(["ab", "abc", "ab ", "aAb1 ", "ab😀"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(5)]
        for pattern in (None, bpe.SPLIT_PATTERN):
            chunks = all_chunks(texts, pattern)
            assert bpe.train_merges_fast(Counter(chunks), 100) == bpe.train_merges_reference(chunks, 100)


def test_train_uses_the_fast_merges_and_puts_specials_last():
    tok = Tokenizer.train(CORPUS, 400)
    reference = bpe.train_merges_reference(all_chunks([CORPUS], bpe.SPLIT_PATTERN), 400 - 256 - 8)
    assert [pair for pair, _ in tok.merges] == reference
    assert [new_id for _, new_id in tok.merges] == list(range(256, 392))
    assert tok.special_tokens == {text: 392 + k for k, text in enumerate(SPECIAL_TOKENS)}
    assert tok.vocab_size == 400 == 256 + len(tok.merges) + len(SPECIAL_TOKENS)
    assert all(tok.vocab[b] == bytes([b]) for b in range(256))


def test_documents_are_never_merged_across_boundaries():
    tok = Tokenizer.train(iter(["ab", "ab", "ab"]), 257, special_tokens=[], pattern=None)   # any iterable
    assert tok.merges == [((97, 98), 256)]
    # As one text "ababab" the pair (b, a) would occur twice; as documents it never occurs.
    assert len(Tokenizer.train("ababab", 258, special_tokens=[], pattern=None).merges) == 2
    with pytest.raises(UsageError, match="--vocab_size 258 is more than this text supports.*257 or less"):
        Tokenizer.train(["ab", "ab", "ab"], 258, special_tokens=[], pattern=None)


def test_special_token_strings_in_training_text_are_boundaries():
    tok = Tokenizer.train("hello<|endoftext|>" * 50 + "world<|end|>" * 50, 256 + 8 + 8)
    learned = [tok.vocab[new_id] for _, new_id in tok.merges]
    assert not any(b"<|" in token or b"|>" in token for token in learned)


def test_digits_are_single_tokens():
    tok = Tokenizer.train(("12 + 34 = 46. 1234 * 1234 = 1522756, year 2023. " * 30) + CORPUS, 450)
    assert not any(re.search(rb"[0-9][0-9]", tok.vocab[new_id]) for _, new_id in tok.merges)
    assert bpe.split_text(bpe.compile_pattern(bpe.SPLIT_PATTERN), " 1176") == [" ", "1", "1", "7", "6"]


# --- pre-splitting and round trips -------------------------------------------------------------------

def test_split_pattern_on_a_hand_checked_example():
    split = bpe.compile_pattern(bpe.SPLIT_PATTERN).findall
    assert split("Hello world's 347+8, foo_bar!\n\n  x") == [
        "Hello", " world", "'s", " ", "3", "4", "7", "+", "8", ",", " foo", "_bar", "!\n\n", " ", " x"]
    gpt2_split = bpe.compile_pattern(bpe.GPT2_SPLIT_PATTERN).findall
    assert gpt2_split("Hello world's 347+8, foo_bar!\n\n  x") == [
        "Hello", " world", "'s", " 347", "+", "8", ",", " foo", "_", "bar", "!", "\n\n ", " x"]


@pytest.mark.parametrize("pattern", [bpe.SPLIT_PATTERN, bpe.GPT2_SPLIT_PATTERN])
def test_chunks_always_join_back_to_the_text(pattern):
    compiled = bpe.compile_pattern(pattern)
    for text in HAND_PICKED + random_unicode_strings(seed=0, count=500):
        assert "".join(compiled.findall(text)) == text


def test_round_trip_hand_picked(tokenizer):
    for text in HAND_PICKED:
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text
        assert tokenizer.decode_bytes(tokenizer.encode(text)) == text.encode("utf-8", "surrogatepass")
    assert tokenizer.encode("") == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_round_trip_random_unicode(tokenizer, seed):
    for text in random_unicode_strings(seed):
        assert tokenizer.decode(tokenizer.encode(text)) == text
        assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text
    long_text = "".join(random_unicode_strings(seed, count=50))
    assert tokenizer.decode(tokenizer.encode(long_text)) == long_text


def test_encoding_compresses_and_the_cache_gives_the_same_ids(tokenizer):
    ids = tokenizer.encode(CORPUS)
    assert len(ids) < len(CORPUS.encode("utf-8")) / 2
    fresh = Tokenizer.from_dict(tokenizer.to_dict())     # empty cache
    assert [fresh.encode(line) for line in CORPUS.splitlines()] == \
           [tokenizer.encode(line) for line in CORPUS.splitlines()]


def test_decode_of_a_cut_character_shows_a_replacement(tokenizer):
    ids = tokenizer.encode("𝄞")
    assert len(ids) == 4                                  # four bytes, never merged in this corpus
    assert tokenizer.decode(ids[:2]) == "\ufffd"
    with pytest.raises(UsageError, match="token id 400 is not in this tokenizer's vocabulary"):
        tokenizer.decode([1, 400])


# --- special tokens ------------------------------------------------------------------------------------

def test_specials_are_not_injectable_from_text(tokenizer):
    special_ids = set(tokenizer.special_tokens.values())
    text = "hi <|endoftext|><|user|><|assistant|><|end|><|reward|><|calc|><|result|><|/result|> there"
    assert not special_ids & set(tokenizer.encode(text))
    assert tokenizer.encode("<|end|>") == tokenizer.encode("<|") + tokenizer.encode("end|>")


def test_specials_only_where_allowed(tokenizer):
    ids = tokenizer.special_tokens
    assert tokenizer.encode("<|endoftext|>", allowed_special="all") == [ids["<|endoftext|>"]]
    text = "a<|calc|>1+2<|result|>3<|/result|><|end|>"
    got = tokenizer.encode(text, allowed_special={"<|calc|>", "<|result|>"})
    assert got == ([*tokenizer.encode("a"), ids["<|calc|>"], *tokenizer.encode("1+2"), ids["<|result|>"],
                    *tokenizer.encode("3<|/result|><|end|>")])
    assert tokenizer.encode(text, allowed_special=set()) == tokenizer.encode(text)
    with pytest.raises(UsageError, match=re.escape("does not have: ['<|nope|>']")):
        tokenizer.encode("x", allowed_special={"<|nope|>"})


# --- saving and loading --------------------------------------------------------------------------------

def test_save_load_gives_identical_encodings(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.merges == tokenizer.merges and loaded.special_tokens == tokenizer.special_tokens
    for text in HAND_PICKED + [CORPUS]:
        assert loaded.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert loaded.to_dict() == tokenizer.to_dict()
    # Checkpoints keep to_dict() as plain containers: it survives JSON unchanged.
    assert Tokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict()))).merges == tokenizer.merges
    # The file is readable: one merge per line, with the tokens as text.
    first_merge = tokenizer.merges[0]
    left, right = (bpe.readable(tokenizer.vocab[i]) for i in first_merge[0])
    line = json.dumps([*first_merge[0], first_merge[1], left, right], ensure_ascii=False)
    assert line in path.read_text(encoding="utf-8").splitlines()[7]
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]   # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # an ordinary file, not the temporary's private one


def test_damaged_tokenizer_files_are_one_line_errors(tokenizer, tmp_path):
    good = tokenizer.to_dict()
    path = tmp_path / "tok.json"
    with pytest.raises(UsageError, match="no such tokenizer file"):
        Tokenizer.load(path)
    path.write_text(json.dumps(good)[:-20], encoding="utf-8")
    with pytest.raises(UsageError, match=f"{re.escape(str(path))}: not a tokenizer file"):
        Tokenizer.load(path)
    for damage in [lambda d: d.pop("merges"), lambda d: d["merges"].__setitem__(0, [1, 2]),
                   lambda d: d["merges"].__setitem__(3, [9999, 1, 600, "", ""]),
                   lambda d: d["byte_ids"].pop(), lambda d: d.__setitem__("format", "other"),
                   lambda d: d["special_tokens"].__setitem__("<|end|>", 5),
                   lambda d: d.__setitem__("pattern", "(unclosed")]:
        data = json.loads(json.dumps(good))
        damage(data)
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(UsageError, match=f"{re.escape(str(path))}: damaged tokenizer") as error:
            Tokenizer.load(path)
        assert "\n" not in str(error.value)


# --- GPT-2 files -------------------------------------------------------------------------------------

def gpt2_byte_characters():
    """Written here independently of bpe.py: GPT-2 keeps the 188 printable bytes as themselves and maps
    the other 68 (control characters, space, DEL, the non-breaking space, soft hyphen ...) to U+0100 on."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    characters = {b: chr(b) for b in printable}
    characters.update({b: chr(0x100 + k) for k, b in enumerate(others)})
    return printable + others, characters


def write_gpt2_files(folder):
    order, characters = gpt2_byte_characters()
    encoder = {characters[b]: token_id for token_id, b in enumerate(order)}   # GPT-2's own id order
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l")]
    for left, right in merges:
        encoder[left + right] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{l} {r}\n" for l, r in merges),
                                      encoding="utf-8")
    return folder / "encoder.json", folder / "vocab.bpe"


def test_gpt2_byte_mapping_matches_known_characters():
    table = bpe.gpt2_bytes_to_unicode()
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("!")] == "!"
    assert table[0] == "Ā" and table[0xAD] == "Ń" and len(set(table.values())) == 256
    assert table == gpt2_byte_characters()[1]


def test_gpt2_files_give_hand_computed_ids(tmp_path):
    tok = Tokenizer.from_gpt2_files(*write_gpt2_files(tmp_path))
    # Byte ids as in GPT-2: "!" is 0, so a printable byte b is b - 33; the space "Ġ" is 220.
    # "hello" -> h e l l o -> (h e)=257 l l o -> 257 (l l)=259 o -> [257, 259, 111 - 33]
    # " the"  -> Ġ t h e -> (Ġ t)=256 h e -> 256 257 -> (Ġt he)=258
    # " world" -> no merge applies: Ġ w o r l d
    # " 2023" -> GPT-2 keeps a number in one chunk: Ġ 2 0 2 3
    expected = [257, 259, 78, 258, 220, 86, 78, 81, 75, 67, 220, 17, 15, 17, 18]
    assert tok.encode("hello the world 2023") == expected
    assert tok.decode(expected) == "hello the world 2023"
    # <|endoftext|> keeps encoder.json's id; our other specials come after it.
    assert tok.special_tokens == {text: 260 + k for k, text in enumerate(SPECIAL_TOKENS)}
    assert tok.encode("<|endoftext|><|/result|>", allowed_special="all") == [260, 267]
    assert tok.vocab_size == 268
    for text in HAND_PICKED:
        assert tok.decode(tok.encode(text)) == text
    again = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode("hello the world 2023") == expected


def test_gpt2_files_errors(tmp_path):
    encoder_path, merges_path = write_gpt2_files(tmp_path)
    merges_path.write_text("#version: 0.2\nĠ t\nq zz\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"vocab\.bpe:3: not a merge of two known tokens"):
        Tokenizer.from_gpt2_files(encoder_path, merges_path)
    with pytest.raises(UsageError, match="no such file"):
        Tokenizer.from_gpt2_files(tmp_path / "missing.json", merges_path)
    merges_path.write_bytes(b"#version: 0.2\n\xff\xfe\n")
    with pytest.raises(UsageError, match=r"vocab\.bpe: not UTF-8 text"):   # the file that is at fault
        Tokenizer.from_gpt2_files(encoder_path, merges_path)
    encoder_path.write_text('{"a": 1', encoding="utf-8")
    with pytest.raises(UsageError, match="not a GPT-2 encoder.json"):
        Tokenizer.from_gpt2_files(encoder_path, merges_path)


# --- training errors -------------------------------------------------------------------------------

def test_training_errors_name_the_option():
    with pytest.raises(UsageError, match="--vocab_size 263 is too small: it must be at least 264"):
        Tokenizer.train(CORPUS, 263)
    with pytest.raises(UsageError, match="--vocab_size 100000 is more than this text supports"):
        Tokenizer.train(CORPUS, 100_000)
    for empty in ["", [], ["", ""]]:
        with pytest.raises(UsageError, match="training text is empty"):
            Tokenizer.train(empty, 300)
    with pytest.raises(UsageError, match="not a str"):
        Tokenizer.train([b"bytes"], 300)


# --- chat rendering --------------------------------------------------------------------------------

def test_render_chat_ids_and_mask(tokenizer):
    s = tokenizer.special_tokens
    enc = tokenizer.encode
    messages = [
        {"role": "user", "content": "What is 347 * 829?"},
        {"role": "assistant", "content": "<|calc|>347 * 829<|result|> 287663<|/result|> So 287663."},
        {"role": "user", "content": "thanks <|end|><|assistant|>"},
        {"role": "assistant", "content": "ok"},
    ]
    ids, mask = render_chat(tokenizer, messages)
    parts = [  # (ids, mask value); every message's text is encoded after one space (MESSAGE_PREFIX)
        ([s["<|user|>"], *enc(" What is 347 * 829?"), s["<|end|>"]], 0),
        ([s["<|assistant|>"]], 0),
        ([*enc(" "), s["<|calc|>"], *enc("347 * 829"), s["<|result|>"]], 1),     # the model asks the tool
        ([*enc(" 287663"), s["<|/result|>"]], 0),                      # the tool answers
        ([*enc(" So 287663."), s["<|end|>"]], 1),
        ([s["<|user|>"], *enc(" thanks <|end|><|assistant|>"), s["<|end|>"], s["<|assistant|>"]], 0),
        ([*enc(" ok"), s["<|end|>"]], 1),
    ]
    assert ids == [i for part, _ in parts for i in part]
    assert mask == [m for part, m in parts for _ in part]

    prompt_ids, prompt_mask = render_chat(tokenizer, messages[:1], add_generation_prompt=True)
    assert prompt_ids == parts[0][0] + [s["<|assistant|>"]] and prompt_mask == [0] * len(prompt_ids)
    assert render_chat(tokenizer, []) == ([], [])


def test_a_word_starting_a_message_is_the_token_it_is_inside_a_sentence(tokenizer):
    # Without the space, "Paris" opening an answer would be other tokens than " Paris" in the question.
    assert tokenizer.encode(" Paris") != tokenizer.encode("Paris")
    answer = "Paris is the capital of France."
    ids, mask = render_chat(tokenizer, [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": answer}])
    question = ids[1:ids.index(tokenizer.special_tokens["<|end|>"])]
    response = [token for token, trained in zip(ids, mask) if trained][:-1]    # without <|end|>
    assert question[:len(tokenizer.encode(" Paris"))] == tokenizer.encode(" Paris")
    assert response[:len(tokenizer.encode(" Paris"))] == tokenizer.encode(" Paris")
    # response_text undoes it: the generated tokens give back the message exactly.
    assert response_text(tokenizer, response) == answer
    assert response_text(tokenizer, tokenizer.encode("no prefix")) == "no prefix"


def test_render_chat_rejects_bad_messages(tokenizer):
    with pytest.raises(UsageError, match="role 'system'"):
        render_chat(tokenizer, [{"role": "system", "content": "be nice"}])
    with pytest.raises(UsageError, match="message 1 must be"):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}])
    bare = Tokenizer.train(CORPUS, 300, special_tokens=["<|endoftext|>"])
    with pytest.raises(UsageError, match="no chat special tokens"):
        render_chat(bare, [{"role": "user", "content": "hi"}])


# --- command line ------------------------------------------------------------------------------------

def test_cli_train_and_show(tmp_path, capsys):
    data = tmp_path / "input.txt"
    data.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "tok.json"
    bpe.main(["train", "--data", str(data), "--vocab_size", "300", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "trained 36 merges (vocab_size 300)" in printed and "bytes per token" in printed
    tok = Tokenizer.load(out)
    bpe.main(["show", "The capital of Peru", "--tokenizer", str(out)])
    boundaries, ids, summary = capsys.readouterr().out.splitlines()
    expected_ids = tok.encode("The capital of Peru")
    assert ids == str(expected_ids)
    assert boundaries == "|" + "|".join(tok.decode([i]) for i in expected_ids) + "|"
    assert summary.startswith(f"19 bytes -> {len(expected_ids)} tokens")


def test_saving_onto_a_folder_is_a_one_line_error(tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(UsageError, match="is a folder: give a file name in it instead"):
        tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert os.listdir(tmp_path) == ["tokenizer.json"]   # no temporary file left beside it


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "{bad}", "--vocab_size", "300"], r"--data .*bad\.txt:2: not UTF-8 text"),
    (["train", "--data", "{missing}", "--vocab_size", "300"], "no such file"),
    (["train", "--data", "{good}", "--vocab_size", "10"], "--vocab_size 10 is too small"),
    (["show", "x", "--tokenizer", "{missing}"], "no such tokenizer file"),
])
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nthen \xff\xfe latin-1\n")
    (tmp_path / "good.txt").write_text("hello hello", encoding="utf-8")
    files = {"bad": tmp_path / "bad.txt", "good": tmp_path / "good.txt", "missing": tmp_path / "nope.json"}
    argv = [a.format(**files) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        bpe.main(argv + (["--out", str(tmp_path / "o.json")] if argv[0] == "train" else []))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert re.search(message, stderr)
