"""bpe.py — a byte-level BPE tokenizer, written from scratch.

The talk ("State of GPT") starts the pipeline before any neural network: the raw text is translated,
losslessly, into a sequence of integers — tokens — and that sequence is all the model ever sees. GPT-style
tokenizers do this with byte-pair encoding (BPE): start from the 256 possible bytes, then repeatedly
merge the most frequent adjacent pair of tokens into a new token, until the vocabulary has the size you
asked for. Common words become one token, rare words a few, and any text at all still round-trips,
because the 256 bytes are always there to fall back on.

    python bpe.py train --data input.txt --vocab_size 1024 --out tokenizer.json
    python bpe.py show "The capital of France is Paris. 347 * 829 = 287663" --tokenizer tokenizer.json

The file reads top to bottom: the pre-split pattern, the two training algorithms (a plain reference and
the fast one used in practice), the Tokenizer class (train, encode, decode, save/load, GPT-2 files), the
chat renderer every later stage uses, and the command line.
"""

import argparse
import heapq
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from itertools import repeat


class UsageError(Exception):
    """A mistake the user can fix (a bad option, a missing or damaged file). CLIs print it and exit 2."""


# Special tokens take the LAST ids of the vocabulary, after the 256 bytes and the merges.
# <|endoftext|> separates documents; <|user|> <|assistant|> <|end|> frame chat turns; <|reward|> is where
# the reward model reads its score; <|calc|> <|result|> <|/result|> are the calculator tool's markers.
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|reward|>",
                  "<|calc|>", "<|result|>", "<|/result|>"]

# -----------------------------------------------------------------------------------------------------
# Pre-splitting. Before BPE runs, text is cut into chunks (words, numbers, punctuation, whitespace) and
# merges never cross a chunk boundary: otherwise BPE would happily learn tokens like "dog." or "the cat",
# wasting the vocabulary on accidents of punctuation. GPT-2/GPT-4 describe the chunks with \p{L} (any
# letter) and \p{N} (any number), which Python's `re` module lacks. `re` does have \w (letters, digits,
# other numerics and the underscore) and \d (decimal digits), so:
#   a letter                   = [^\W\d_]         (\w minus digits minus underscore)
#   neither letter nor digit   = [^\s\w]|_        ([^\s\w] alone would silently lose the underscore)
# (Approximation: numerals that are not decimal digits, like "²" or "½", count as letters here.)

LETTERS = r"[^\W\d_]+"
NOT_LETTER_OR_DIGIT = r"(?:[^\s\w]|_)"

# Our own pattern, GPT-4 style, with one difference: every digit is its own chunk. The talk's point that
# tokenization shapes what a model can learn is sharpest for arithmetic: if "347" were one token and "348"
# another, the model would have to memorise a sum for every pair of arbitrary token ids. With one digit per
# token, "347 + 829" is the same ten digit tokens in every problem, and addition becomes the digit-by-digit
# procedure a small model can actually learn. (GPT-4 groups up to 3 digits; LLaMA also splits single digits.)
SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",                       # English contractions: 's 'd 'm 't 'll 've 're
    r"(?:[^\r\n\w]|_)?" + LETTERS,                  # a word, with at most one leading space or mark
    r"\d",                                          # one digit per chunk (see above)
    r" ?" + NOT_LETTER_OR_DIGIT + r"+[\r\n]*",      # punctuation run, optional leading space
    r"\s*[\r\n]",                                   # whitespace up to and including a line break
    r"\s+(?!\S)",                                   # whitespace, leaving the last space to the next word
    r"\s+",                                         # whatever whitespace remains
])

# GPT-2's own pattern, translated the same way (used by from_gpt2_files so encodings match GPT-2's; they
# do on ordinary text, while rare characters such as "²" or the control characters \x1c-\x1f, which `re`
# counts as whitespace, may split differently).
GPT2_SPLIT_PATTERN = "|".join([
    r"'s|'t|'re|'ve|'m|'ll|'d",
    r" ?" + LETTERS,
    r" ?\d+",
    r" ?" + NOT_LETTER_OR_DIGIT + r"+",
    r"\s+(?!\S)",
    r"\s+",
])


def compile_pattern(pattern):
    """Compile a split pattern (None means: no pre-split, each document is one chunk)."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as error:
        raise UsageError(f"damaged tokenizer: the split pattern does not compile ({error})") from None


def split_text(compiled_pattern, text):
    """Cut text into chunks. Every character of the text belongs to exactly one chunk."""
    if compiled_pattern is None:
        return [text] if text else []
    return compiled_pattern.findall(text)


# -----------------------------------------------------------------------------------------------------
# Training. Both algorithms learn merges the same way: find the most frequent adjacent pair of token ids
# (counted inside chunks only), give it the next id, replace it everywhere, repeat. Ties are broken by the
# smaller pair (a, b), so the same text gives the same merges on every machine. A pair must occur at
# least twice to be merged: merging a pair seen once would only memorise that one spot.

def merge_pair(ids, pair, new_id):
    """Replace every non-overlapping occurrence of pair in ids (left to right) by new_id."""
    first, second = pair
    merged = []
    i = 0
    length = len(ids)
    while i < length:
        if ids[i] == first and i + 1 < length and ids[i + 1] == second:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_merges_reference(chunks, num_merges, first_id=256):
    """The plain algorithm, for reading and for testing the fast one: after every merge, count every pair
    in every chunk again. chunks: list of lists of byte ids, one per chunk of the text (repeats included).
    Returns the merged pairs in order; merge k created id first_id + k."""
    chunks = [list(chunk) for chunk in chunks]
    merges = []
    for k in range(num_merges):
        counts = {}
        for chunk in chunks:
            for pair in zip(chunk, chunk[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))   # most frequent, then smallest
        if counts[best] < 2:
            break
        chunks = [merge_pair(chunk, best, first_id + k) for chunk in chunks]
        merges.append(best)
    return merges


def train_merges_fast(chunk_counts, num_merges, first_id=256, verbose=False):
    """The same merges as train_merges_reference, without recounting the whole text after every merge.
    chunk_counts: {chunk as bytes (or tuple of ids): how often it occurs}.

    1. Each distinct chunk is stored once with its count ("the" seen 20,000 times is one entry).
    2. pair_counts[pair] = occurrences of pair in the whole text; where[pair] = the chunks that contain it.
    3. A heap of (-count, pair) gives the best pair; when a count changes we push the new value and leave
       the old entry in the heap, skipping it when it comes out (it no longer matches pair_counts).
    4. A merge rewrites only the chunks listed in where[pair] and adjusts the counts of the pairs they held.
    """
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts = defaultdict(int)
    where = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[index]
            where[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    started = time.perf_counter()
    while len(merges) < num_merges and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -negative_count:
            continue                                  # a stale entry: the count has changed since
        if -negative_count < 2:
            break
        new_id = first_id + len(merges)
        merges.append(pair)
        delta = defaultdict(int)                      # net change of each pair's count in this merge
        for index in where.pop(pair):
            word = words[index]
            new_word = merge_pair(word, pair, new_id)
            if len(new_word) == len(word):
                continue                              # where[] is only ever added to: pair left this chunk
            freq = freqs[index]
            for old in zip(word, word[1:]):
                delta[old] -= freq
            for new in zip(new_word, new_word[1:]):
                delta[new] += freq
                where[new].add(index)
            words[index] = new_word
        for changed, change in delta.items():
            if change:
                pair_counts[changed] += change
                if pair_counts[changed]:
                    heapq.heappush(heap, (-pair_counts[changed], changed))
                else:
                    del pair_counts[changed]
        if verbose and (len(merges) % max(1, num_merges // 10) == 0 or len(merges) == num_merges):
            print(f"merge {len(merges)}/{num_merges}: {pair} -> {new_id} (seen {-negative_count} times), "
                  f"{time.perf_counter() - started:.1f}s")
    return merges


# -----------------------------------------------------------------------------------------------------
# GPT-2's files store tokens as text: each byte is shown as a printable unicode character (a space is "Ġ",
# a newline "Ċ"), so that its vocabulary and merges are readable JSON and text lines.

def gpt2_bytes_to_unicode():
    """GPT-2's byte -> character table: printable bytes stand for themselves, the other 68 bytes are
    mapped, in byte order, to the characters 256, 257, ... ."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def readable(token_bytes):
    """A token's bytes as text a person can read: invalid UTF-8 shows as \\xNN, line breaks as \\n."""
    text = token_bytes.decode("utf-8", errors="backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


# A Python str may hold a lone surrogate (json.loads('"\\ud83d"') gives one: half an emoji from a badly cut
# JSONL line). Strict UTF-8 refuses to encode it; "surrogatepass" writes it as the 3 bytes it would take,
# and decode reads them back, so that even such strings round-trip exactly.
UTF8_ERRORS = "surrogatepass"


class Tokenizer:
    """Byte-level BPE: ids for the 256 bytes, one id per learned merge, then the special tokens."""

    def __init__(self, merges, special_tokens, pattern=SPLIT_PATTERN, byte_ids=None):
        """merges: [((left_id, right_id), new_id), ...] in the order they are applied.
        special_tokens: {text: id}. byte_ids: the id of each byte 0..255 (default: the byte itself)."""
        self.merges = [(tuple(pair), new_id) for pair, new_id in merges]
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self.byte_ids = list(range(256)) if byte_ids is None else list(byte_ids)
        self._compiled = compile_pattern(pattern)
        # Encoding applies merges by rank: the earliest-learned merge first, as in training.
        self._rank = {pair: rank for rank, (pair, _) in enumerate(self.merges)}
        self._merged_id = dict(self.merges)
        self.vocab = {token_id: bytes([byte]) for byte, token_id in enumerate(self.byte_ids)}
        for (left, right), new_id in self.merges:
            self.vocab[new_id] = self.vocab[left] + self.vocab[right]
        for text, token_id in self.special_tokens.items():
            self.vocab[token_id] = text.encode("utf-8")
        self.vocab_size = max(self.vocab) + 1
        self._cache = {}              # chunk text -> its ids: repeated words cost one dict look-up
        self._special_splitters = {}  # frozenset of allowed specials -> compiled regex that finds them

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)})")

    # --- training ------------------------------------------------------------------------------------

    @classmethod
    def train(cls, text_or_documents, vocab_size, special_tokens=SPECIAL_TOKENS, verbose=False,
              pattern=SPLIT_PATTERN):
        """Learn vocab_size - 256 - len(special_tokens) merges from a str or an iterable of documents
        (str each; merges never cross from one document to the next). pattern=None: no pre-split."""
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or not all(special_tokens):
            raise UsageError(f"special_tokens must be distinct non-empty strings, got {special_tokens}")
        num_merges = vocab_size - 256 - len(special_tokens)
        if num_merges < 0:
            raise UsageError(f"--vocab_size {vocab_size} is too small: it must be at least "
                             f"{256 + len(special_tokens)} (256 bytes + {len(special_tokens)} special tokens)")
        documents = [text_or_documents] if isinstance(text_or_documents, str) else text_or_documents
        compiled = compile_pattern(pattern)
        # Special-token strings already in the text are boundaries, never material for merges.
        longest_first = sorted(special_tokens, key=len, reverse=True)
        special_splitter = (re.compile("|".join(re.escape(s) for s in longest_first))
                            if special_tokens else None)
        chunk_counts = Counter()
        total_chars = 0
        for number, document in enumerate(documents):
            if not isinstance(document, str):
                raise UsageError(f"training document {number} is a {type(document).__name__}, not a str")
            total_chars += len(document)
            pieces = special_splitter.split(document) if special_splitter else [document]
            for piece in pieces:
                chunk_counts.update(split_text(compiled, piece))
        if total_chars == 0:
            raise UsageError("the training text is empty: give the tokenizer some text to learn from")
        byte_counts = {chunk.encode("utf-8", UTF8_ERRORS): count for chunk, count in chunk_counts.items()}
        pairs = train_merges_fast(byte_counts, num_merges, verbose=verbose)
        if len(pairs) < num_merges:
            supported = 256 + len(pairs) + len(special_tokens)
            raise UsageError(f"--vocab_size {vocab_size} is more than this text supports: after {len(pairs)} "
                             f"merges no pair of tokens occurs twice; use --vocab_size {supported} or less")
        merges = [(pair, 256 + k) for k, pair in enumerate(pairs)]
        first_special = 256 + len(merges)
        specials = {text: first_special + k for k, text in enumerate(special_tokens)}
        return cls(merges, specials, pattern=pattern)

    # --- encoding and decoding -----------------------------------------------------------------------

    def _encode_chunk(self, chunk):
        """Apply the merges to one chunk, lowest rank first, exactly as they were learned."""
        byte_ids = self.byte_ids
        ids = [byte_ids[byte] for byte in chunk.encode("utf-8", UTF8_ERRORS)]
        rank_of = self._rank.get
        never = len(self._rank)       # the rank of a pair that has no merge
        while len(ids) >= 2:
            ranks = list(map(rank_of, zip(ids, ids[1:]), repeat(never)))   # rank_of(pair, never) for each
            best_rank = min(ranks)
            if best_rank == never:
                break
            position = ranks.index(best_rank)
            pair = (ids[position], ids[position + 1])
            if ranks.count(best_rank) == 1:   # the usual case: the pair occurs once, merge it in place
                ids[position:position + 2] = [self._merged_id[pair]]
            else:
                ids = merge_pair(ids, pair, self._merged_id[pair])
        return ids

    def encode_ordinary(self, text):
        """Encode text with no special tokens at all: "<|end|>" in the text is just its bytes."""
        cache = self._cache
        if len(cache) > 100_000:      # bound the memory a long stream of new words could take
            cache.clear()
        ids = []
        for chunk in split_text(self._compiled, text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = cache[chunk] = self._encode_chunk(chunk)
            ids.extend(chunk_ids)
        return ids

    def encode(self, text, allowed_special="none"):
        """Text -> ids. allowed_special: "none" (default: special-token strings in the text are encoded
        as plain text, so a user cannot inject them), "all", or a set of the special tokens to recognise."""
        if allowed_special == "none":
            return self.encode_ordinary(text)
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise UsageError(f"allowed_special names tokens this tokenizer does not have: {sorted(unknown)}")
        if not allowed:
            return self.encode_ordinary(text)
        key = frozenset(allowed)
        splitter = self._special_splitters.get(key)
        if splitter is None:
            # Longest first, so that a special that is a prefix of another never wins by accident.
            alternatives = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
            splitter = self._special_splitters[key] = re.compile(f"({alternatives})")
        ids = []
        for index, part in enumerate(splitter.split(text)):
            if index % 2:             # odd parts are the separators: the special tokens themselves
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids):
        """Ids -> the exact bytes they stand for."""
        vocab = self.vocab
        try:
            return b"".join([vocab[token_id] for token_id in ids])
        except (KeyError, TypeError):
            parts = []
            for token_id in ids:
                token_id = int(token_id)   # also accepts numpy / torch integers
                if token_id not in vocab:
                    raise UsageError(f"token id {token_id} is not in this tokenizer's vocabulary "
                                     f"(ids 0..{self.vocab_size - 1})") from None
                parts.append(vocab[token_id])
            return b"".join(parts)

    def decode(self, ids):
        """Ids -> text. A sequence cut mid-character (possible when sampling) shows U+FFFD there."""
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", errors="surrogatepass")   # see UTF8_ERRORS
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    # --- saving and loading --------------------------------------------------------------------------

    def to_dict(self):
        """The tokenizer as plain containers (JSON-able, and what checkpoints store). Each merge is
        [left_id, right_id, new_id, "left as text", "right as text"]; the texts are for reading only."""
        return {
            "format": "bpe-tokenizer",
            "version": 1,
            "pattern": self.pattern,
            "byte_ids": list(self.byte_ids),
            "merges": [[left, right, new_id, readable(self.vocab[left]), readable(self.vocab[right])]
                       for (left, right), new_id in self.merges],
            "special_tokens": dict(self.special_tokens),
        }

    @classmethod
    def from_dict(cls, data):
        """Rebuild a tokenizer from to_dict()'s output; anything inconsistent is a UsageError."""
        def damaged(what):
            return UsageError(f"damaged tokenizer: {what}")
        if not isinstance(data, dict) or data.get("format") != "bpe-tokenizer":
            raise damaged("not a bpe-tokenizer (no \"format\": \"bpe-tokenizer\" entry)")
        if data.get("version") != 1:
            raise damaged(f"version {data.get('version')!r} is not one this bpe.py reads (1)")
        byte_ids = data.get("byte_ids")
        if (not isinstance(byte_ids, list) or len(byte_ids) != 256
                or not all(type(i) is int and i >= 0 for i in byte_ids) or len(set(byte_ids)) != 256):
            raise damaged("byte_ids must be 256 distinct non-negative integers")
        known = set(byte_ids)
        merges = []
        raw_merges = data.get("merges")
        if not isinstance(raw_merges, list):
            raise damaged("merges must be a list")
        for number, merge in enumerate(raw_merges):
            if (not isinstance(merge, list) or len(merge) < 3
                    or not all(type(i) is int for i in merge[:3])):
                raise damaged(f"merge {number} is not [left_id, right_id, new_id, ...]")
            left, right, new_id = merge[:3]
            if left not in known or right not in known or new_id in known or new_id < 0:
                raise damaged(f"merge {number} {merge[:3]} uses an unknown id or reuses one")
            known.add(new_id)
            merges.append(((left, right), new_id))
        specials = data.get("special_tokens")
        if not isinstance(specials, dict) or not all(
                isinstance(text, str) and type(i) is int and i >= 0 for text, i in specials.items()):
            raise damaged("special_tokens must map text to integer ids")
        if known & set(specials.values()) or len(set(specials.values())) != len(specials):
            raise damaged("a special token's id is used twice")
        pattern = data.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise damaged("pattern must be a string or null")
        return cls(merges, specials, pattern=pattern, byte_ids=byte_ids)

    def save(self, path):
        """Write the tokenizer as readable JSON, one merge per line; atomically (never half a file)."""
        data = self.to_dict()
        lines = ["{"]
        for key in ("format", "version", "pattern", "byte_ids", "special_tokens"):
            lines.append(f"  {json.dumps(key)}: {json.dumps(data[key], ensure_ascii=False)},")
        merge_lines = [f"    {json.dumps(m, ensure_ascii=False)}" for m in data["merges"]]
        lines.append('  "merges": [' + ("\n" + ",\n".join(merge_lines) + "\n  " if merge_lines else "") + "]")
        lines.append("}")
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UsageError(f"{path} is a folder: give a file name in it instead")
        try:
            os.makedirs(folder, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tokenizer-", suffix=".tmp")
        except OSError as error:
            raise UsageError(f"cannot write to {folder}: {error.strerror}; choose another place") from None
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write("\n".join(lines) + "\n")
                file.flush()
                os.fsync(file.fileno())   # on disk before it takes the old file's place
            umask = os.umask(0)   # mkstemp makes the file private (0600): give it an ordinary new file's mode
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such tokenizer file (make one with `python bpe.py train`)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{path}: not a tokenizer file (damaged JSON: {error})") from None
        try:
            return cls.from_dict(data)
        except UsageError as error:
            raise UsageError(f"{path}: {error}") from None

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe, special_tokens=SPECIAL_TOKENS):
        """Load OpenAI's GPT-2 tokenizer (encoder.json + vocab.bpe; Hugging Face's vocab.json + merges.txt
        are the same format). Ids follow encoder.json, so encodings match GPT-2's. Our special tokens
        that encoder.json lacks are appended after its last id (<|endoftext|> keeps GPT-2's 50256)."""
        def read(path):
            try:
                with open(path, encoding="utf-8") as file:
                    return file.read()
            except FileNotFoundError:
                raise UsageError(f"{path}: no such file") from None
            except UnicodeDecodeError:
                raise UsageError(f"{path}: not UTF-8 text") from None
        try:
            encoder = json.loads(read(encoder_json))
        except json.JSONDecodeError as error:
            raise UsageError(f"{encoder_json}: not a GPT-2 encoder.json ({error})") from None
        merge_lines = read(vocab_bpe).split("\n")
        if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
            raise UsageError(f"{encoder_json}: not a GPT-2 encoder.json (expected {{token: id}})")
        byte_to_char = gpt2_bytes_to_unicode()
        try:
            byte_ids = [encoder[byte_to_char[byte]] for byte in range(256)]
        except KeyError as error:
            raise UsageError(f"{encoder_json}: the byte token {error.args[0]!r} is missing") from None
        merges = []
        for line_number, line in enumerate(merge_lines, start=1):
            if not line.strip() or (line_number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or any(part not in encoder for part in parts) or parts[0] + parts[1] not in encoder:
                raise UsageError(f"{vocab_bpe}:{line_number}: not a merge of two known tokens: {line!r}")
            merges.append(((encoder[parts[0]], encoder[parts[1]]), encoder[parts[0] + parts[1]]))
        # Tokens that are neither a byte nor made by a merge are GPT-2's own specials (<|endoftext|>).
        produced = set(byte_ids) | {new_id for _, new_id in merges}
        specials = {text: token_id for text, token_id in encoder.items() if token_id not in produced}
        next_id = max(encoder.values()) + 1
        for text in special_tokens:
            if text not in specials:
                specials[text] = next_id
                next_id += 1
        return cls(merges, specials, pattern=GPT2_SPLIT_PATTERN, byte_ids=byte_ids)


# -----------------------------------------------------------------------------------------------------
# Chat. The talk's assistant models are "just" documents in a chat format: the SFT data, the reward
# model's comparisons, RLHF and sampling all render conversations the same way, with this one function.

TOOL_OUTPUT_SPECIALS = {"<|calc|>", "<|result|>", "<|/result|>"}

# Every message is encoded after one space, as SentencePiece's "dummy prefix" does. Byte-level BPE gives a
# word at the very start of a text other tokens than the same word after a space: " Mexico" is one token,
# "Mexico" is "M" + "exico". Names in questions and in the pretraining text are the first kind; without
# the space an answer would start with the second, and SFT teaches the model to spell out there only the
# names it shows ("Which continent is Mexico in?" -> "Vietnam is in Asia."). Measured on the same base
# model: continent questions about countries known from pretraining only, 1% right without it, 75% with.
MESSAGE_PREFIX = " "

# The calculator's result is written after one space too: "<|result|> 287663<|/result|>". Digits are single
# tokens either way (see the split pattern), but in the corpus every number follows a space ("-> 287663",
# "= 287663"), and that is where the base model learnt to copy numbers. Glued to <|result|>, the result was
# copied into the answer digit for digit but for the second: most likely the copy finds each next digit
# after the two tokens before it, and " " + the first digit stood nowhere in the result. One SFT model wrote
# "508 * 287 = 125796." after the tool's 145796 and was right on 12% of held-out products; SFT on the same
# base with the space, 100% (README, "The calculator tool", has three bases). The tiny world's SFT answers
# write the result the same way (data/tinyworld.py, calculator_answer).
TOOL_RESULT_PREFIX = " "


def render_chat(tokenizer, messages, add_generation_prompt=False):
    """messages: [{"role": "user" | "assistant", "content": str}, ...] -> (ids, train_mask).

    Each turn is <|user|> content <|end|> or <|assistant|> content <|end|>, the content encoded after
    MESSAGE_PREFIX (see above; response_text takes it off a generated answer). User content never yields a
    special token; assistant content may contain the calculator's markers. train_mask[i] is 1 exactly
    where the model should learn to produce ids[i]: assistant content and the <|end|> closing an assistant
    turn — except the tool's output, the tokens after <|result|> up to and including <|/result|>, which the
    calculator writes (the model learns to ask with <|calc|> ... <|result|>, so <|result|> itself is 1)."""
    specials = tokenizer.special_tokens
    missing = [s for s in ("<|user|>", "<|assistant|>", "<|end|>", *TOOL_OUTPUT_SPECIALS) if s not in specials]
    if missing:
        raise UsageError(f"this tokenizer has no chat special tokens {missing}")
    result_id, end_result_id = specials["<|result|>"], specials["<|/result|>"]
    ids, mask = [], []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UsageError(f"message {number} must be {{\"role\": ..., \"content\": str}}, got {message!r:.80}")
        role = message.get("role")
        if role == "user":
            content = tokenizer.encode(MESSAGE_PREFIX + message["content"])
            ids += [specials["<|user|>"], *content, specials["<|end|>"]]
            mask += [0] * (len(content) + 2)
        elif role == "assistant":
            content = tokenizer.encode(MESSAGE_PREFIX + message["content"], allowed_special=TOOL_OUTPUT_SPECIALS)
            ids.append(specials["<|assistant|>"])
            mask.append(0)
            in_tool_output = False
            for token_id in content:
                ids.append(token_id)
                if in_tool_output:
                    mask.append(0)
                    in_tool_output = token_id != end_result_id
                else:
                    mask.append(1)
                    in_tool_output = token_id == result_id
            ids.append(specials["<|end|>"])
            mask.append(1)
        else:
            raise UsageError(f"message {number} has role {role!r}; only 'user' and 'assistant' are supported")
    if add_generation_prompt:
        ids.append(specials["<|assistant|>"])
        mask.append(0)
    return ids, mask


def response_text(tokenizer, ids):
    """The assistant's generated tokens -> its message: the text without render_chat's MESSAGE_PREFIX."""
    return tokenizer.decode(ids).removeprefix(MESSAGE_PREFIX)


# -----------------------------------------------------------------------------------------------------
# Command line: train a tokenizer on a text file, or show how a text is cut into tokens.

def read_text_file(path):
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise UsageError(f"--data {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--data {path}: is a folder; give one text file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise UsageError(f"--data {path}:{line}: not UTF-8 text (byte {error.start}); "
                         f"convert it, e.g. with iconv -t utf-8") from None


def load_any_tokenizer(path):
    """A tokenizer JSON file, or the tokenizer inside a checkpoint (out/pretrain.pt etc.)."""
    if path.endswith(".pt"):
        import torch   # only this path needs torch
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UsageError(f"--tokenizer {path}: no such file") from None
        except Exception as error:
            raise UsageError(f"--tokenizer {path}: not a readable checkpoint ({error})") from None
        if not isinstance(checkpoint, dict) or "tokenizer" not in checkpoint:
            raise UsageError(f"--tokenizer {path}: this checkpoint holds no tokenizer")
        return Tokenizer.from_dict(checkpoint["tokenizer"])
    return Tokenizer.load(path)


def command_train(args):
    text = read_text_file(args.data)
    started = time.perf_counter()
    tokenizer = Tokenizer.train(text, args.vocab_size, verbose=args.verbose)
    seconds = time.perf_counter() - started
    tokenizer.save(args.out)
    num_tokens = len(tokenizer.encode_ordinary(text))
    size = len(text.encode("utf-8"))
    print(f"trained {len(tokenizer.merges)} merges (vocab_size {tokenizer.vocab_size}) on {size:,} bytes "
          f"in {seconds:.2f}s")
    print(f"{args.data}: {num_tokens:,} tokens, {size / max(num_tokens, 1):.2f} bytes per token")
    print(f"wrote {args.out}")


def command_show(args):
    if args.tokenizer:
        tokenizer = load_any_tokenizer(args.tokenizer)
    else:
        tokenizer = Tokenizer([], {s: 256 + k for k, s in enumerate(SPECIAL_TOKENS)})
        print("(no --tokenizer given: showing plain bytes, no merges; pass a tokenizer .json or out/pretrain.pt)")
    ids = tokenizer.encode(args.text, allowed_special=args.allowed_special)
    pieces = [readable(tokenizer.vocab[token_id]) for token_id in ids]
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        # On a terminal, alternate background colours so that a "|" in the text cannot be mistaken for
        # a boundary; in a file or pipe, mark the boundaries with "|".
        backgrounds = ["\033[48;5;153m", "\033[48;5;223m", "\033[48;5;194m", "\033[48;5;225m"]
        print("".join(f"{backgrounds[k % 4]}\033[30m{piece}\033[0m" for k, piece in enumerate(pieces)))
    else:
        print("|" + "|".join(pieces) + "|")
    print(ids)
    size = len(args.text.encode("utf-8"))
    print(f"{size} bytes -> {len(ids)} tokens ({size / max(len(ids), 1):.2f} bytes per token)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="learn merges from a UTF-8 text file")
    train.add_argument("--data", required=True, help="UTF-8 text file to learn from")
    train.add_argument("--vocab_size", type=int, default=1024, help="256 bytes + merges + 8 special tokens")
    train.add_argument("--out", default="tokenizer.json", help="where to write the tokenizer (JSON)")
    train.add_argument("--verbose", action="store_true", help="print progress while merging")
    show = commands.add_parser("show", help="show a text's tokens with visible boundaries and ids")
    show.add_argument("text")
    show.add_argument("--tokenizer", default=None, help="a tokenizer .json, or a checkpoint such as out/pretrain.pt")
    show.add_argument("--allowed_special", choices=["none", "all"], default="none",
                      help="'all' turns special-token strings like <|end|> into their ids")
    args = parser.parse_args(argv)
    try:
        {"train": command_train, "show": command_show}[args.command](args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
