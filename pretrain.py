"""
Stage 1 — pretraining: teach a transformer to predict the next token of a pile of documents.

The talk: pretraining is where "99% of the training compute" goes. Gather a large collection of
documents, tokenize them, pack them into rows separated by a special <|endoftext|> token, and train
the network to predict every next token. What comes out is a *base model*: it does not answer
questions, it completes documents — but a prompt that looks like a document with a few questions and
answers already in it can "trick" it into answering the next one.

    python pretrain.py                 # the tiny world on a laptop CPU, about 5 minutes

    python pretrain.py --show_batch    # print one batch of the training data and stop
    python pretrain.py --data FILE     # your own text: a .txt file, a folder of .txt, or JSONL {"text": ...}
    torchrun --nproc_per_node=8 pretrain.py --preset gpu    # many GPUs, one process each

Reads top to bottom: configuration, data (documents -> tokenizer -> one flat array of tokens cached on
disk -> batches), the learning-rate schedule, evaluation (loss and bits per byte), the training loop
(with Ctrl-C, resume and several processes), and the end-of-training probes of what the model knows.
Writes out/pretrain.pt (the model with the best validation loss), out/pretrain.json, out/pretrain.png.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bpe import SPECIAL_TOKENS, Tokenizer, UsageError, load_any_tokenizer
from model import (GPT, GPTConfig, Progress, StopRequest, atomic_path, autocast, check_options, check_out_dir,
                   check_resume_options, choose_device, load_checkpoint, map_batches, plot_curves, read_jsonl,
                   read_text, run_cli, save_checkpoint, training_dtype, write_json)

EOT = "<|endoftext|>"


# -----------------------------------------------------------------------------------------------
# Configuration: every field is a command-line option (--name value), and main(Config(...)) is the
# same thing from Python.

@dataclass
class Config:
    # data
    data: str = field(default="", metadata={"help": "a .txt file, a folder of .txt files, or JSONL with a "
                                                    "\"text\" field; empty = the tiny world"})
    tokenizer: str = field(default="", metadata={"help": "reuse this tokenizer (a bpe.py file, or the one inside a "
                                                         "checkpoint such as out/pretrain.pt) instead of training one"})
    vocab_size: int = field(default=1024, metadata={"help": "tokenizer size when training one, special tokens "
                                                          "included; 256 = plain bytes (+ the special tokens)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the documents held out for validation"})
    show_batch: bool = field(default=False, metadata={"help": "print one training batch readably and stop"})
    # model
    preset: str = field(default="cpu", metadata={"help": "cpu: the laptop default; gpu: a bigger model and "
                                                         "batch (replaces the options left at their defaults)",
                                                 "choices": ["cpu", "gpu"]})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=128, metadata={"help": "width of the residual stream"})
    block_size: int = field(default=256, metadata={"help": "context length in tokens (rows of a batch are this long)"})
    positions: str = field(default="rotary", metadata={"help": "how attention knows where a token is: rotary "
                                                               "(RoPE, as LLaMA) or learned (GPT-2's table); measured "
                                                               "in 5.5 minutes: 0.51 against 0.60-0.69 bits per byte",
                                                       "choices": ["rotary", "learned"]})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability (0 for short runs)"})
    # optimization
    batch_size: int = field(default=4, metadata={"help": "rows per optimizer step, over all processes and "
                                                         "accumulation steps (on the 2-core CPU measured, 4 rows move as "
                                                         "many tokens per second as 16, and 4x the steps learn more)"})
    grad_accum: int = field(default=1, metadata={"help": "split each batch into this many forward/backward passes"})
    learning_rate: float = field(default=4e-3, metadata={"help": "peak learning rate (a 1M-parameter model takes a "
                                                               "high one: 4e-3 learned the facts in 1200 steps of "
                                                               "16 rows, 1e-3 had not in 1500; with 4 rows 6e-3 "
                                                               "did no better)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine decays to this fraction of the peak"})
    warmup_iters: int = field(default=100, metadata={"help": "steps of linear warmup"})
    lr_decay_iters: int = field(default=0, metadata={"help": "steps the cosine spans (0 = max_iters); with --max_time "
                                                             "the clock may end it sooner"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    max_iters: int = field(default=20000, metadata={"help": "stop after this many optimizer steps"})
    max_time: float = field(default=5.5, metadata={"help": "stop after this many minutes of training steps (0 = no "
                                                           "limit; evaluations stop the clock); whichever of "
                                                           "max_iters and max_time comes first ends the run"})
    # evaluation
    eval_interval: int = field(default=500, metadata={"help": "evaluate (and save) every this many steps"})
    eval_tokens: int = field(default=16384, metadata={"help": "validation tokens per evaluation (a fixed sample)"})
    samples: int = field(default=2, metadata={"help": "continuations printed at each evaluation"})
    # running
    resume: bool = field(default=False, metadata={"help": "continue from out_dir/pretrain.pt"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (faster on GPU; slow to start)"})
    dtype: str = field(default="auto", metadata={"help": "precision of the matrix products (weights stay float32): "
                                                         "auto = bfloat16 where the hardware has it (CUDA, a CPU with "
                                                         "AVX-512 BF16 or AMX: 1.67x faster here), else float32",
                                                 "choices": ["auto", "float32", "bfloat16"]})
    out_dir: str = field(default="out", metadata={"help": "where the checkpoint, metrics, plot and token cache go"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "seeds the weights and every batch"})


# A preset is a set of defaults for a kind of machine. It replaces only the fields still at their
# dataclass default, so an option given on the command line wins unless it was given its default value.
PRESETS = {
    "cpu": {},
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=64, learning_rate=6e-4,
                warmup_iters=200, max_time=10.0, max_iters=20000, eval_interval=500, eval_tokens=131072,
                compile=True),
}


def apply_preset(config):
    defaults = Config()
    changes = {name: value for name, value in PRESETS[config.preset].items()
               if getattr(config, name) == getattr(defaults, name)}
    return dataclasses.replace(config, **changes)


def check_config(config):
    check_options(config, positive=("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                    "grad_accum", "max_iters", "eval_interval", "eval_tokens", "learning_rate"),
                  not_negative=("warmup_iters", "lr_decay_iters", "max_time", "weight_decay", "grad_clip", "samples"),
                  fractions=("dropout",))
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise UsageError(f"--min_lr_ratio must lie between 0 and 1, got {config.min_lr_ratio}")
    if config.n_embd % config.n_head:
        raise UsageError(f"--n_embd {config.n_embd} must be a multiple of --n_head {config.n_head}")
    if config.positions == "rotary" and (config.n_embd // config.n_head) % 2:
        raise UsageError(f"--positions rotary turns pairs of numbers: --n_embd / --n_head must be even, "
                         f"got {config.n_embd // config.n_head}")
    if not 0.0 < config.val_fraction < 1.0:
        raise UsageError(f"--val_fraction must lie between 0 and 1, got {config.val_fraction}")


# -----------------------------------------------------------------------------------------------
# Data, part 1: documents. The tiny world by default; else the user's text.

def load_documents(data):
    """-> (documents, a short description). A text file is one document; a folder gives one document
    per .txt file; JSONL gives one per record's "text"."""
    if not data:
        from data.tinyworld import World
        return World().documents(), "the tiny world"
    if os.path.isdir(data):
        paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(data)
                       for name in names if name.endswith(".txt"))
        if not paths:
            raise UsageError(f"{data}: the folder holds no .txt files")
        documents = [read_text(path) for path in paths]
    elif not os.path.exists(data):
        raise UsageError(f"{data}: no such file or folder (--data takes a .txt file, a folder or a .jsonl file)")
    elif data.endswith(".json"):
        raise UsageError(f"{data}: a .json file is neither plain text nor records; give JSONL (a .jsonl file, one "
                         "{\"text\": ...} per line) or text (.txt)")
    elif data.endswith(".jsonl"):
        documents = []
        for line, record in read_jsonl(data):
            if not isinstance(record.get("text"), str):
                raise UsageError(f"{data}:{line}: expected a \"text\" field holding a string")
            documents.append(record["text"])
    else:
        documents = [read_text(data)]
    kept = [document for document in documents if document.strip()]
    if not kept:
        raise UsageError(f"{data}: no text in it (empty)")
    if len(kept) < len(documents):
        print(f"skipped {len(documents) - len(kept)} empty document(s) in {data}")
    return kept, data


def split_documents(documents, val_fraction):
    """Hold out whole documents for validation, so the model is judged on text it never saw. With
    fewer than 10 documents (one book, say) that is impossible; then the tail of each document is held
    out instead, cut at a line break (what nanoGPT does with tiny Shakespeare)."""
    if len(documents) >= 10:
        order = list(range(len(documents)))
        random.Random(0).shuffle(order)  # a fixed split, whatever --seed: runs stay comparable
        held_out = set(order[:max(1, round(len(documents) * val_fraction))])
        train = [document for index, document in enumerate(documents) if index not in held_out]
        val = [document for index, document in enumerate(documents) if index in held_out]
        return train, val
    train, val = [], []
    for document in documents:
        cut = int(len(document) * (1 - val_fraction))
        line_break = document.rfind("\n", 0, cut)
        cut = line_break + 1 if line_break > 0 else cut
        train.append(document[:cut])
        val.append(document[cut:])
    return train, val


# -----------------------------------------------------------------------------------------------
# Data, part 2: tokens. Each document is encoded once, the results concatenated into one flat array
# with <|endoftext|> before every document (and once at the very end), and stored on disk. The model
# sees the stream in rows of block_size tokens; a row may run across a document boundary, and the
# <|endoftext|> token tells it that what follows is unrelated to what came before.

def encode_documents(tokenizer, documents):
    end_of_text = tokenizer.special_tokens[EOT]
    stream = []
    for document in documents:
        stream.append(end_of_text)
        stream.extend(tokenizer.encode(document))  # ordinary text never turns into special tokens
    stream.append(end_of_text)
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32  # half the disk of int32
    return np.array(stream, dtype=dtype)


def token_byte_counts(tokenizer):
    """How many bytes of text each token id stands for; special tokens stand for no text (0)."""
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    specials = set(tokenizer.special_tokens.values())
    for token in range(tokenizer.vocab_size):
        if token not in specials:
            counts[token] = len(tokenizer.decode_bytes([token]))
    return counts


@dataclass
class Corpus:
    train: np.ndarray       # flat token array (a read-only np.memmap)
    val: np.ndarray
    tokenizer: Tokenizer
    key: str                # identifies (data, split, tokenizer): a resume must see the same
    description: str
    from_cache: bool


def cache_key(config, train_documents, val_documents):
    digest = hashlib.sha256(b"pretrain-tokens-v1")
    for name, documents in (("train", train_documents), ("val", val_documents)):
        digest.update(f"{name}:{len(documents)}".encode())
        for document in documents:
            text = document.encode("utf-8")
            digest.update(len(text).to_bytes(8, "little") + text)
    if config.tokenizer:
        digest.update(json.dumps(load_tokenizer(config.tokenizer).to_dict(), sort_keys=True).encode())
    else:
        digest.update(f"train vocab_size={config.vocab_size}".encode())
    return digest.hexdigest()[:16]


def tokenizer_size(vocab_size):
    """--vocab_size 256 asks for plain bytes: no merges, the special tokens on top (ids 256 and up)."""
    return 256 + len(SPECIAL_TOKENS) if vocab_size == 256 else vocab_size


def load_tokenizer(path):
    if not os.path.isfile(path):
        raise UsageError(f"--tokenizer {path}: no such file (bpe.py writes one; a checkpoint such as "
                         f"out/pretrain.pt holds one)")
    try:
        tokenizer = load_any_tokenizer(path)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"--tokenizer {path}: not a tokenizer file ({type(error).__name__})") from None
    if EOT not in tokenizer.special_tokens:
        raise UsageError(f"--tokenizer {path}: it has no {EOT} token to separate documents")
    return tokenizer


def prepare_corpus(config):
    """Documents -> train/val split -> tokenizer -> token arrays, from the cache in out_dir when the
    same data and tokenizer were seen before (a second run starts at once)."""
    documents, description = load_documents(config.data)
    train_documents, val_documents = split_documents(documents, config.val_fraction)
    key = cache_key(config, train_documents, val_documents)
    folder = os.path.join(config.out_dir, "cache")
    paths = {name: os.path.join(folder, f"tokens-{key}.{name}") for name in ("train.bin", "val.bin", "json")}
    from_cache = os.path.isfile(paths["json"])
    if not from_cache:
        if config.tokenizer:
            tokenizer = load_tokenizer(config.tokenizer)
        else:
            started = time.time()
            print(f"training a {config.vocab_size}-token BPE tokenizer on {len(train_documents):,} documents ...")
            tokenizer = Tokenizer.train(train_documents, tokenizer_size(config.vocab_size))
            print(f"  done in {time.time() - started:.1f}s: {tokenizer.vocab_size} tokens")
        started = time.time()
        arrays = {"train.bin": encode_documents(tokenizer, train_documents),
                  "val.bin": encode_documents(tokenizer, val_documents)}
        print(f"tokenized {description}: {len(arrays['train.bin']):,} train + {len(arrays['val.bin']):,} "
              f"val tokens in {time.time() - started:.1f}s")
        for name, array in arrays.items():
            with atomic_path(paths[name]) as temporary:
                array.tofile(temporary)
        meta = {"dtype": str(arrays["train.bin"].dtype), "tokenizer": tokenizer.to_dict(),
                "data": description, "train_tokens": len(arrays["train.bin"]),
                "val_tokens": len(arrays["val.bin"])}
        write_json(paths["json"], meta)  # written last: its presence means the cache is complete
    with open(paths["json"], encoding="utf-8") as file:
        meta = json.load(file)
    tokenizer = Tokenizer.from_dict(meta["tokenizer"])
    train, val = (np.memmap(paths[name], dtype=meta["dtype"], mode="r") for name in ("train.bin", "val.bin"))
    for name, array in (("training", train), ("validation", val)):
        if len(array) < config.block_size + 1:
            raise UsageError(f"{description}: its {name} split is {len(array)} tokens, shorter than one context "
                             f"of --block_size {config.block_size} + 1; give more text or a smaller --block_size")
    return Corpus(train, val, tokenizer, key, description, from_cache)


# -----------------------------------------------------------------------------------------------
# Data, part 3: batches. The rows of step s come from a random generator seeded with (seed, s): any
# step's batch can be rebuilt from its number alone, so a resumed run sees exactly the batches the
# uninterrupted run would have, and no random-number state has to be saved.

def batch_starts(step, seed, num_tokens, block_size, batch_size):
    generator = np.random.default_rng([seed, step])
    return generator.integers(0, num_tokens - block_size, size=batch_size)  # a row needs block_size + 1 tokens


def rows_at(tokens, starts, block_size):
    """x = block_size tokens from each start; y = the same rows shifted left by one (the next token)."""
    rows = np.stack([np.asarray(tokens[start:start + block_size + 1], dtype=np.int64) for start in starts])
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def micro_batches(step, config, num_tokens, rank, world_size):
    """The global batch of `step`, cut into grad_accum micro-batches per process; this process's share.
    Together the processes' shares are exactly the single-process batch, so N processes follow the
    same trajectory as one."""
    starts = batch_starts(step, config.seed, num_tokens, config.block_size, config.batch_size)
    rows = config.batch_size // (config.grad_accum * world_size)
    return [starts[(micro * world_size + rank) * rows:(micro * world_size + rank + 1) * rows]
            for micro in range(config.grad_accum)]


def show_batch(corpus, config, rows_shown=2, positions_shown=12):
    tokenizer = corpus.tokenizer
    starts = batch_starts(0, config.seed, len(corpus.train), config.block_size, config.batch_size)
    x, y = rows_at(corpus.train, starts, config.block_size)
    piece = lambda token: tokenizer.decode([int(token)])
    print(f"The batch of step 0: x is {tuple(x.shape)} (batch_size rows x block_size tokens); "
          f"y is x shifted left by one: y[b, t] = x[b, t + 1], the token to predict after x[b, :t + 1].\n")
    for row in range(min(rows_shown, len(x))):
        print(f"row {row} (starts at token {starts[row]:,} of the training stream), as text with "
              f"tokens split by |:")
        print("  " + "|".join(piece(token) for token in x[row]).replace("\n", "\\n"))
        print(f"  x ids: {x[row, :positions_shown].tolist()} ...")
        print(f"  y ids: {y[row, :positions_shown].tolist()} ...")
        print("  what the model learns at the first positions:")
        for t in range(min(positions_shown, config.block_size)):
            context = "".join(piece(token) for token in x[row, max(0, t - 5):t + 1])
            print(f"    ...{context!r:40} -> {piece(y[row, t])!r}")
        print()


# -----------------------------------------------------------------------------------------------
# The learning-rate schedule: linear warmup over the first steps, times a cosine that falls from the
# peak to min_lr_ratio * peak over the run. "Over the run" is measured by progress = the larger of
# step / lr_decay_iters and elapsed time / max_time: whichever budget ends the run, the learning rate
# reaches its minimum just as it ends.

def learning_rate_at(step, elapsed_seconds, config):
    warmup = min(1.0, (step + 1) / config.warmup_iters) if config.warmup_iters > 0 else 1.0
    progress = step / (config.lr_decay_iters or config.max_iters)
    if config.max_time > 0:
        progress = max(progress, elapsed_seconds / (config.max_time * 60))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * warmup * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


# -----------------------------------------------------------------------------------------------
# Evaluation: loss on held-out text, and bits per byte. Loss per token depends on the tokenizer (a
# bigger vocabulary packs more text into a token, so each costs more nats); bits per byte does not:
# the total information the model needs to encode the validation text, divided by its length in
# bytes. A character model, a byte model and BPE models compare fairly on it.

def eval_starts(num_tokens, block_size, eval_tokens):
    """A fixed, evenly spread set of non-overlapping rows: every evaluation scores the same text."""
    count = max(1, min(eval_tokens // block_size, (num_tokens - 1) // block_size))
    return np.linspace(0, num_tokens - block_size - 1, count).astype(np.int64)


def bits_per_byte(total_nats, total_bytes):
    return total_nats / math.log(2) / max(total_bytes, 1)


@torch.no_grad()
def evaluate(model, tokens, starts, block_size, byte_counts, device, rows_per_pass=16, rank=0, world_size=1,
             dtype="auto"):
    """-> (mean loss in nats per token, bits per byte) over the rows at `starts`. With several
    processes each scores its share of the rows and the sums are added up."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    mine = starts[rank::world_size]
    for first in range(0, len(mine), rows_per_pass):
        x, y = rows_at(tokens, mine[first:first + rows_per_pass], block_size)
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        totals[0] += loss.double() * y.numel()  # loss is the mean over these tokens
        totals[1] += y.numel()
        totals[2] += int(byte_counts[y.numpy()].sum())
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    nats, count, num_bytes = totals.tolist()
    return nats / count, bits_per_byte(nats, num_bytes)


def sample_continuations(model, tokenizer, count, max_new_tokens=48, seed=0):
    """What does the model write, starting a fresh document? (temperature 0.8: typical, not greedy)"""
    if count == 0:
        return []
    was_training = model.training
    model.eval()  # no dropout while writing
    prompts = [[tokenizer.special_tokens[EOT]]] * count
    generations = model.generate(prompts, max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    model.train(was_training)
    return [tokenizer.decode(generation.tokens) for generation in generations]


# -----------------------------------------------------------------------------------------------
# Probes at the end: what does the base model know, and can a few-shot page trick it into answering?

def fact_completed(completion, answer):
    """The completion states the answer first: 'Lima. It lies ...' completes '... capital of Peru is'."""
    text = completion.strip()
    if not text.startswith(answer):
        return False
    rest = text[len(answer):]
    return not rest or not rest[0].isalnum()


def generate_text(model, tokenizer, texts, max_new_tokens, batch_size=64):
    """Greedy completions of document-style prompts, each started like a fresh document. A prompt too
    long for the context keeps its last tokens."""
    keep = max(model.config.block_size - max_new_tokens, 1)
    end_of_text = tokenizer.special_tokens[EOT]
    prompts = [([end_of_text] + tokenizer.encode(text))[-keep:] for text in texts]

    def complete(first):
        generations = model.generate(prompts[first:first + batch_size], max_new_tokens, temperature=0.0,
                                     stop_tokens=(end_of_text,))
        return [tokenizer.decode([t for t in g.tokens if t != end_of_text]) for g in generations]
    return map_batches(model, complete, len(prompts), batch_size)


def probe_knowledge(model, tokenizer):
    """Three probes of the base model, all greedy:
    facts    -- every fact of the tiny world as the start of a sentence the documents use ("The capital
                of Peru is" -> "Lima"), also counted apart for the entities SFT will never ask about;
    sums     -- "23 + 45 =" for the evaluation sums, none of which is in the corpus: did it learn to add?
    few-shot -- held-out questions at the end of a quiz page of solved ones: the talk's trick that makes
                a document completer answer questions (its answer is the first line it writes)."""
    from data.tinyworld import World
    world = World()
    metrics, examples = {}, []
    heldout = set(world.fact_probes(heldout=True))
    for name, probes in (("facts", world.fact_probes()), ("sums", world.arithmetic_probes())):
        longest = max(len(tokenizer.encode(" " + answer)) for _, answer in probes)
        completions = generate_text(model, tokenizer, [prefix for prefix, _ in probes], longest + 2)
        correct = [fact_completed(text, answer) for text, (_, answer) in zip(completions, probes)]
        metrics[f"{name}_accuracy"] = sum(correct) / len(correct)
        if name == "facts":
            marks = [right for right, probe in zip(correct, probes) if probe in heldout]
            metrics["facts_heldout_accuracy"] = sum(marks) / max(len(marks), 1)
        examples += [(prefix, answer, text) for (prefix, answer), text in zip(probes, completions)][:2]

    tasks = [task for task in world.tasks("eval") if task.family in ("facts", "arithmetic")]
    answer_tokens = max(len(tokenizer.encode(task.answer)) for task in tasks) + 4

    def respond(questions):
        pages = [world.fewshot_prompt(question) for question in questions]
        return [text.strip().split("\n")[0].strip() for text in generate_text(model, tokenizer, pages, answer_tokens)]

    results, _ = world.evaluate(respond, tasks)
    metrics.update({f"fewshot_{name}": value for name, value in results.items() if name.startswith("accuracy/")})
    return metrics, examples


# -----------------------------------------------------------------------------------------------
# Several processes (torchrun): one per GPU (or CPU share), each with a full copy of the model,
# each computing gradients on its own rows of every batch; DistributedDataParallel averages the
# gradients so every copy takes the same step. Rank 0 alone prints and writes files.

def start_processes(device_name):
    """-> (rank, world_size, device). Without torchrun: (0, 1, the chosen device)."""
    device = choose_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def prepare_corpus_once(config, rank, world_size, device):
    """Rank 0 trains the tokenizer and fills the cache; the others then read the cache. An error on
    rank 0 is passed on, so no process waits forever for it."""
    corpus, error = None, None
    if rank == 0:
        try:
            corpus = prepare_corpus(config)
        except UsageError as caught:
            error = caught
    if world_size > 1:
        ok = torch.tensor([0.0 if error else 1.0], device=device)
        dist.broadcast(ok, src=0)
        if ok.item() == 0:
            raise error or UsageError("stopped: rank 0 could not prepare the data")
        if rank != 0:
            corpus = prepare_corpus(config)
    if error:
        raise error
    return corpus


# -----------------------------------------------------------------------------------------------
# The training loop.

def main(config: Config) -> dict:
    started = time.time()
    config = apply_preset(config)
    check_config(config)
    checkpoint_path = os.path.join(config.out_dir, "pretrain.pt")
    if config.resume and not os.path.isfile(checkpoint_path):   # before the tokenizer and the data are made
        raise UsageError(f"--resume: {checkpoint_path} not found (nothing to resume; run without --resume)")
    rank, world_size, device = start_processes(config.device)
    config = dataclasses.replace(config, dtype=training_dtype(device, config.dtype))   # what "auto" is here
    try:
        metrics = train(config, rank, world_size, device, started)
        if world_size > 1:
            # the other ranks wait until rank 0 has saved: a rank tearing down its connections while
            # rank 0 still holds them aborts the process ("terminate called without an active exception")
            dist.barrier()
        return metrics
    finally:
        if dist.is_initialized():   # torchrun with one process initialises a group too
            dist.destroy_process_group()


def train(config, rank, world_size, device, started):
    master = rank == 0
    say = print if master else (lambda *args, **kwargs: None)
    if config.batch_size % (config.grad_accum * world_size):
        raise UsageError(f"--batch_size {config.batch_size} must divide evenly into --grad_accum "
                         f"{config.grad_accum} x {world_size} processes")
    check_out_dir(config.out_dir)
    checkpoint_path = os.path.join(config.out_dir, "pretrain.pt")

    # --- data
    corpus = prepare_corpus_once(config, rank, world_size, device)
    tokenizer = corpus.tokenizer
    if config.show_batch:
        if master:
            show_batch(corpus, config)
        return {}
    byte_counts = token_byte_counts(tokenizer)
    val_starts = eval_starts(len(corpus.val), config.block_size, config.eval_tokens)
    prepare_seconds = time.time() - started

    # --- model and optimizer (the same seed on every process: the copies start identical)
    torch.manual_seed(config.seed)
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                             n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                             positions=config.positions)
    model = GPT(model_config).to(device)
    optimizer = model.configure_optimizer(config.learning_rate, weight_decay=config.weight_decay)
    step, elapsed_before, best, history = 0, 0.0, None, {key: [] for key in HISTORY_KEYS}
    if config.resume:
        step, elapsed_before, best, history = restore(checkpoint_path, model, optimizer, model_config, corpus, config)
        say(f"resuming {checkpoint_path} at step {step} ({elapsed_before / 60:.1f} min trained)")
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    say(f"model: {raw_model.num_parameters():,} parameters; data: {corpus.description}, "
        f"{len(corpus.train):,} train / {len(corpus.val):,} val tokens "
        f"({'from the cache' if corpus.from_cache else 'tokenized now'}), vocabulary {tokenizer.vocab_size}; "
        f"device {device} x {world_size}")

    # --- evaluation and saving, every eval_interval steps and at the end
    start_step, run_start, step_seconds = step, time.time(), 0.0
    last_eval_step = history["eval_step"][-1] if history["eval_step"] else None
    budget = config.max_time * 60 if config.max_time > 0 else math.inf
    progress = Progress(config.max_iters, max_seconds=budget - elapsed_before if config.max_time > 0 else None,
                        prefix="pretrain ") if master else None

    paused = 0.0  # seconds spent evaluating and saving: the training clock (max_time) stops meanwhile

    def elapsed():
        return elapsed_before + time.time() - run_start - paused

    def evaluate_and_save():
        nonlocal paused
        started_eval, seconds = time.time(), elapsed()
        try:
            evaluate_and_save_now(seconds)
        finally:
            paused += time.time() - started_eval

    def evaluate_and_save_now(seconds):
        nonlocal best, last_eval_step
        last_eval_step = step
        val_loss, val_bpb = evaluate(raw_model, corpus.val, val_starts, config.block_size, byte_counts, device,
                                     rank=rank, world_size=world_size, dtype=config.dtype)
        history["eval_step"].append(step)
        history["val_loss"].append(val_loss)
        history["val_bpb"].append(val_bpb)
        if best is None or val_loss < best["val_loss"]:
            best = {"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "model": snapshot(raw_model)}
        if not master:
            return
        if progress:
            progress.close()
        say(f"step {step}: val loss {val_loss:.4f}, {val_bpb:.3f} bits per byte")
        for text in sample_continuations(raw_model, tokenizer, config.samples, seed=step):
            say("  sample: " + text.replace("\n", " / ")[:160])
        published = raw_model if best["step"] == step else model_from(best["model"], model_config)
        save(checkpoint_path, published, raw_model.state_dict(), optimizer, tokenizer, config, step, seconds,
             best, history, corpus.key)

    # --- the loop: stop at max_iters, at max_time, or on Ctrl-C
    interrupted = False
    finished = step >= config.max_iters or elapsed_before >= budget
    with StopRequest() as stop:
        while not finished:
            if step % config.eval_interval == 0 and step != last_eval_step:
                evaluate_and_save()
            learning_rate = learning_rate_at(step, elapsed(), config)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate
            step_started = time.time()
            loss = train_step(model, optimizer, micro_batches(step, config, len(corpus.train), rank, world_size),
                              corpus.train, config, device, seed=config.seed * 1_000_003 + step * 1_009 + rank)
            step_seconds += time.time() - step_started
            step += 1
            # one collective per step makes every process agree on the loss, the clock and Ctrl-C
            loss, seconds, interrupted = agree(loss, elapsed(), stop.requested, world_size, rank, device)
            history["train_step"].append(step)
            history["train_loss"].append(loss)
            history["learning_rate"].append(learning_rate)
            if progress:
                progress.update(step, tokens=config.batch_size * config.block_size, loss=loss, lr=f"{learning_rate:.2e}")
            finished = interrupted or step >= config.max_iters or seconds >= budget
        if step != last_eval_step:
            evaluate_and_save()
    if progress:
        progress.close()
    train_seconds = elapsed()
    if not master:
        return {}

    # --- the best model: probed, reported, saved with its figures
    latest = snapshot(raw_model)
    raw_model.load_state_dict(best["model"])
    raw_model.eval()
    tokens_this_run = (step - start_step) * config.batch_size * config.block_size
    metrics = {
        "params": raw_model.num_parameters(), "vocab_size": tokenizer.vocab_size, "block_size": config.block_size,
        "steps": step, "tokens": step * config.batch_size * config.block_size, "processes": world_size,
        "tokens_per_second": tokens_this_run / max(step_seconds, 1e-9),
        "train_loss": float(np.mean(history["train_loss"][-20:])) if history["train_loss"] else None,
        "val_loss": best["val_loss"], "val_bpb": best["val_bpb"], "best_step": best["step"],
        "last_val_loss": history["val_loss"][-1], "last_val_bpb": history["val_bpb"][-1],
        "bytes_per_token": float(byte_counts[np.asarray(corpus.val[:1_000_000], dtype=np.int64)].mean()),
        "prepare_seconds": prepare_seconds, "train_seconds": train_seconds, "interrupted": interrupted,
    }
    if not config.data and not interrupted:
        probe_started = time.time()
        knowledge, examples = probe_knowledge(raw_model, tokenizer)
        metrics.update(knowledge)
        metrics["probe_seconds"] = time.time() - probe_started
        for prefix, answer, completion in examples:
            say(f"  probe: {prefix!r} -> {completion.strip()[:60]!r} (expected {answer!r})")
    metrics["seconds"] = time.time() - started
    save(checkpoint_path, raw_model, latest, optimizer, tokenizer, config, step, train_seconds, best, history,
         corpus.key, metrics=metrics)
    write_json(os.path.join(config.out_dir, "pretrain.json"), metrics)
    plot_history(os.path.join(config.out_dir, "pretrain.png"), history)
    say(" | ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                   for name, value in metrics.items()))
    if interrupted:
        say(f"stopped at step {step}; saved {checkpoint_path}. Continue with the same options and --resume")
    return metrics


HISTORY_KEYS = ("train_step", "train_loss", "learning_rate", "eval_step", "val_loss", "val_bpb")


def train_step(model, optimizer, micro_batch_starts, tokens, config, device, seed):
    """One optimizer step: forward and backward on each micro-batch (gradients add up), clip, update."""
    torch.manual_seed(seed)  # dropout masks, too, follow from (seed, step): resume stays exact
    total = 0.0
    for index, starts in enumerate(micro_batch_starts):
        x, y = rows_at(tokens, starts, config.block_size)
        x, y = x.to(device), y.to(device)
        # with several processes, average the gradients across them only after the last micro-batch
        last = index == len(micro_batch_starts) - 1
        wait = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
        with wait:
            with autocast(device, config.dtype):
                _, loss = model(x, y)
            (loss / len(micro_batch_starts)).backward()
        total += loss.item() / len(micro_batch_starts)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def agree(loss, seconds, stop_requested, world_size, rank, device):
    """-> (mean loss over processes, rank 0's clock, did anyone press Ctrl-C). Each process has its own
    clock; if each decided alone when time is up, one would wait forever for the others."""
    if world_size == 1:
        return loss, seconds, stop_requested
    values = torch.tensor([loss / world_size, seconds if rank == 0 else 0.0, float(stop_requested)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(values)
    loss, seconds, stop = values.tolist()
    return loss, seconds, stop > 0


# -----------------------------------------------------------------------------------------------
# Saving and resuming. pretrain.pt holds the best model for the later stages and, under "resume", the
# latest weights, the optimizer's moments, the step and the clock: with batches derived from the step
# number, that is all a resumed run needs to retrace the uninterrupted one exactly, when the run counts
# steps (--max_time 0). On the clock (the default) the learning rate follows the elapsed time, which no
# two runs spend alike, so a resumed run sees the same batches at slightly different rates.

def snapshot(model):
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def model_from(weights, model_config):
    model = GPT(model_config)
    model.load_state_dict(weights)
    return model


def save(path, model, latest_weights, optimizer, tokenizer, config, step, seconds, best, history, data_key,
         metrics=None):
    """`model` holds the weights to publish (the best so far); `latest_weights` those to resume from."""
    resume = {"model": {name: tensor.detach().cpu() for name, tensor in latest_weights.items()},
              "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds, "data_key": data_key,
              "best_step": best["step"], "best_val_loss": best["val_loss"], "best_val_bpb": best["val_bpb"],
              "history": history}
    metrics = metrics or {"step": best["step"], "val_loss": best["val_loss"], "val_bpb": best["val_bpb"]}
    save_checkpoint(path, stage="pretrain", model=model, tokenizer=tokenizer, parent=None,
                    args=dataclasses.asdict(config), metrics=metrics, extra={"resume": resume})


# The options that decide what each step does. --max_iters and --max_time may change on --resume: they
# extend (or shorten) a run, and --lr_decay_iters keeps its schedule where it was.
RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum", "learning_rate", "min_lr_ratio", "warmup_iters",
                     "lr_decay_iters", "weight_decay", "grad_clip")


def restore(path, model, optimizer, model_config, corpus, config):
    checkpoint = load_checkpoint(path, "pretrain")
    resume = checkpoint.get("resume")
    if not resume:
        raise UsageError(f"{path} holds no training state to resume (it was not written by pretrain.py)")
    check_resume_options(path, checkpoint, config, RESUME_MUST_MATCH)
    # through GPTConfig, so that a checkpoint saved before a new config field existed gets its default
    if dataclasses.asdict(GPTConfig(**checkpoint["model_config"])) != dataclasses.asdict(model_config):
        raise UsageError(f"{path} was trained with another model shape ({checkpoint['model_config']}); "
                         f"give the same options as that run, or start afresh without --resume")
    if resume["data_key"] != corpus.key:
        raise UsageError(f"{path} was trained on other data or another tokenizer; resume with the same --data, "
                         f"--tokenizer, --vocab_size and --val_fraction")
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    best = {"step": resume["best_step"], "val_loss": resume["best_val_loss"], "val_bpb": resume["best_val_bpb"],
            "model": checkpoint["model"]}
    history = {key: list(resume["history"].get(key, [])) for key in HISTORY_KEYS}
    return resume["step"], resume["seconds"], best, history


def plot_history(path, history):
    plot_curves(path, [
        ("loss (nats per token)", {"train": (history["train_step"], history["train_loss"]),
                                   "val": (history["eval_step"], history["val_loss"])}),
        ("val bits per byte", {"val": (history["eval_step"], history["val_bpb"])}),
        ("learning rate", {"lr": (history["train_step"], history["learning_rate"])}),
    ])


if __name__ == "__main__":
    run_cli(main, Config, __doc__)
