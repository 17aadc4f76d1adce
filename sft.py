"""
Supervised finetuning (SFT): turn the base model, which only completes documents, into an assistant.

    python sft.py                 # out/pretrain.pt -> out/sft.pt, out/sft.json, out/sft.png

The talk's idea, in short: nothing changes in the algorithm. We swap the huge, low-quality internet pile
for a small, high-quality set of documents of the form (prompt, ideal response), written by human
contractors following labeling instructions, and keep doing language modeling on them. The base model,
which would answer a question with more questions, learns the shape of an assistant's answer.

Three details matter on a model this small:
  - the loss counts only the assistant's tokens (the user's words are context, not something to imitate);
  - every step also trains on a few rows of pretraining text, or the model forgets what it knew
    (measured: questions about entities known from pretraining only, 10% right without, 80% with);
  - 3,000 "reading practice" conversations, each about a country invented for it alone, teach it to
    answer from a passage in its prompt: the world's own retrieval conversations recur over 40 countries,
    few enough to memorise (measured: retrieval 0% without, 71-98% with, by base model: README).

The talk's finetuning advice lives here too: `--lora_rank 8` trains small low-rank adapters while the
GPT stays frozen (they fit more slowly than the whole model, and need a 10x larger learning rate to reach
67-94% of full SFT's accuracy; they forget less of what pretraining taught), and
`--base_precision int8` holds that frozen part in 8 bits.

Evaluation is the talk's comparison: the base model tricked into answering by a few-shot page against the
SFT assistant, on held-out prompts graded by the tiny world's oracle; chain-of-thought sums, calculator
products and retrieval questions are asked a second time with their technique, for both models.

    python sft.py --show_example                         # one conversation, with the trained tokens marked
    python sft.py --lora_rank 8 --base_precision int8    # parameter-efficient finetuning
    python sft.py --data my_chats.jsonl                  # your own {"messages": [...]} or {"prompt", "completion"}

Read it top to bottom: configuration, data (conversations -> ids + loss mask -> batches; the pretraining
mix), LoRA and int8, the training loop, evaluation, saving.
"""

import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from bpe import MESSAGE_PREFIX, UsageError, render_chat
from model import (IGNORE_INDEX, Progress, atomic_path, autocast, chat_responses, check_options, check_out_dir,
                   check_resume_options, choose_device, load_checkpoint, load_model, map_batches, prompt_room, read_jsonl,
                   run_cli, save_checkpoint, set_seed, training_dtype, write_json)


# -----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    init_from: str = field(default="", metadata={"help": "pretrained checkpoint to start from; empty = <out_dir>/pretrain.pt"})
    data: str = field(default="", metadata={"help": "SFT conversations as JSONL ({\"messages\": [...]} or "
                                                    "{\"prompt\", \"completion\"}); empty = the tiny world's SFT pairs"})
    out_dir: str = field(default="out", metadata={"help": "where sft.pt, sft.json and sft.png go"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed (data order, LoRA init, sampling)"})
    max_iters: int = field(default=800, metadata={"help": "optimizer steps (800: the reading practice needs "
                                                          "them; 400 is enough without it)"})
    max_time: float = field(default=0.0, metadata={"help": "stop after this many minutes of training (0 = no limit); "
                                                           "the learning-rate schedule follows whichever budget ends first"})
    batch_size: int = field(default=32, metadata={"help": "conversations per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate for full finetuning (on a "
                                                                 "rotary base, one run each: 2e-3 copied names "
                                                                 "into answers far better than 1e-3, retrieval "
                                                                 "91.7% against 33.3%)"})
    lora_learning_rate: float = field(default=1e-2, metadata={"help": "peak learning rate when --lora_rank > 0 "
                                                                     "(adapters start at zero and need larger steps; "
                                                                     "measured on one base: 1e-2 reached 94% of full "
                                                                     "SFT, 5e-3 84%)"})
    warmup_iters: int = field(default=20, metadata={"help": "linear warmup steps, then cosine decay to 10%"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    pretrain_mix: int = field(default=32, metadata={"help": "rows of pretraining text trained on in every step "
                                                            "alongside the conversations (0 = plain SFT)"})
    pretrain_mix_length: int = field(default=64, metadata={"help": "tokens per pretraining-mix row"})
    pretrain_mix_coef: float = field(default=1.0, metadata={"help": "weight of the pretraining-mix loss"})
    pretrain_mix_data: str = field(default="", metadata={"help": "text for the pretraining mix (.txt, folder, "
                                                               "JSONL \"text\"); empty = what the base model was pretrained on"})
    pretrain_mix_tokens: int = field(default=300_000, metadata={"help": "tokens of pretraining documents to "
                                                                        "tokenize for the mix (a random sample)"})
    lora_rank: int = field(default=0, metadata={"help": "> 0: freeze the GPT and train rank-R adapters instead"})
    lora_layers: list[str] = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj", "mlp.c_fc"],
                                   metadata={"help": "the block linears that get adapters (ends of their names in "
                                                     "model.py; mlp.c_proj too is possible)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale: the adapters' update is multiplied by alpha/rank"})
    base_precision: str = field(default="fp32", metadata={"help": "precision of the frozen base under LoRA",
                                                           "choices": ["fp32", "int8"]})
    dtype: str = field(default="auto", metadata={"help": "precision of the matrix products (weights stay float32): "
                                                         "auto = bfloat16 where the hardware has it (CUDA, a CPU with "
                                                         "AVX-512 BF16 or AMX: 1.3x faster here), else float32",
                                                 "choices": ["auto", "float32", "bfloat16"]})
    eval_interval: int = field(default=50, metadata={"help": "steps between validation-loss measurements"})
    eval_limit: int = field(default=0, metadata={"help": "evaluate on at most this many held-out prompts of each "
                                                          "task family (0 = all)"})
    eval_max_new_tokens: int = field(default=96, metadata={"help": "longest answer generated in evaluation"})
    reading_practice: int = field(default=3000, metadata={"help": "add N retrieval-layout conversations, each about a "
                                                                  "country invented for it alone, to the tiny world's "
                                                                  "SFT pairs (0: none; measured: retrieval 0% -> 71-98%)"})
    calculator_practice: int = field(default=0, metadata={
        "help": "add N calculator conversations (3-digit products no split asks) to the tiny world's 100 "
                "(0: none; measured on a base whose SFT model did not copy the tool's result: with 150 or 300 "
                "the answers copied it 98-100% of the time, 0% and 76% without (two seeds), but retrieval fell "
                "from 83-88% to 67-81%, since in a fixed number of steps one practice crowds out another; on a "
                "base whose SFT model copied it already, only the cost)"})
    skip_base_eval: bool = field(default=False, metadata={"help": "do not evaluate the base model few-shot"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from <out_dir>/sft.pt"})
    show_example: bool = field(default=False, metadata={"help": "print one rendered conversation with its "
                                                               "trained tokens marked, then exit"})


# -----------------------------------------------------------------------------------------------
# Data: conversations -> (ids, loss mask) -> padded batches

def world_conversations(world, reading_practice=0, calculator_practice=0):
    """The tiny world's SFT pairs as one-turn conversations: the user's prompt, the ideal answer; plus
    `reading_practice` retrieval-layout tasks about countries invented for each one alone, and
    `calculator_practice` more products to answer with the calculator."""
    tasks = (world.tasks("sft") + (world.reading_practice(reading_practice) if reading_practice > 0 else [])
             + (world.calculator_practice(calculator_practice) if calculator_practice > 0 else []))
    return [[{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.answer}]
            for task in tasks]


def _as_messages(value, role, where, key):
    """TRL's prompt/completion fields are either plain strings or lists of messages. Plain strings are
    meant to be joined ({"prompt": "The sky is", "completion": " blue."}), so a completion brings its own
    space; render_chat puts one before every message itself, so that one goes."""
    if isinstance(value, str):
        return [{"role": role, "content": value.removeprefix(MESSAGE_PREFIX)}]
    if isinstance(value, list):
        return value
    raise UsageError(f"{where}: \"{key}\" must be a string or a list of messages, got {type(value).__name__}")


def _check_messages(messages, where):
    """Validate one conversation; a "system" message is folded into the next user turn (our chat
    format has no system role)."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: \"messages\" must be a non-empty list")
    checked, system = [], None
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UsageError(f"{where}: message {number} must be {{\"role\": ..., \"content\": \"text\"}}")
        role = message.get("role")
        if role == "system":
            system = message["content"]
        elif role in ("user", "assistant"):
            content = message["content"]
            if role == "user" and system is not None:
                content, system = f"{system}\n\n{content}", None
            checked.append({"role": role, "content": content})
        else:
            raise UsageError(f"{where}: message {number} has role {role!r}; expected user, assistant or system")
    if not any(message["role"] == "assistant" for message in checked):
        raise UsageError(f"{where}: the conversation has no assistant message, so nothing to learn")
    return checked


def jsonl_conversations(path):
    """Read SFT data in the two shapes of Hugging Face TRL:
        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
        {"prompt": ..., "completion": ...}
    A malformed line stops everything with FILE:LINE: reason (nothing is skipped silently)."""
    conversations = []
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        if "messages" in record:
            messages = record["messages"]
        elif "prompt" in record and "completion" in record:
            messages = (_as_messages(record["prompt"], "user", where, "prompt") +
                        _as_messages(record["completion"], "assistant", where, "completion"))
        else:
            keys = ", ".join(sorted(record)) or "none"
            raise UsageError(f"{where}: expected a \"messages\" list or \"prompt\" and \"completion\" (keys found: {keys})")
        conversations.append(_check_messages(messages, where))
    return conversations


def encode_conversation(tokenizer, messages, block_size):
    """One conversation -> (inputs, targets, truncated). The model reads ids[:-1] and is asked to predict
    ids[1:], but only where train_mask says the token is the assistant's: every other target becomes
    IGNORE_INDEX, so the user's words shape the context and never the loss."""
    ids, train_mask = render_chat(tokenizer, messages)
    truncated = len(ids) > block_size + 1
    ids, train_mask = ids[:block_size + 1], train_mask[:block_size + 1]
    inputs = ids[:-1]
    targets = [token if trained else IGNORE_INDEX for token, trained in zip(ids[1:], train_mask[1:])]
    return inputs, targets, truncated


def encode_all(tokenizer, conversations, block_size):
    """Encode every conversation; count (and warn about) those cut at the context length. An example
    whose assistant part lies wholly past the cut has nothing left to learn and is dropped, counted."""
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        inputs, targets, was_truncated = encode_conversation(tokenizer, messages, block_size)
        truncated += was_truncated
        if all(target == IGNORE_INDEX for target in targets):
            dropped += 1
            continue
        examples.append((inputs, targets))
    if truncated:
        print(f"warning: {truncated} of {len(conversations)} conversations are longer than the context "
              f"({block_size + 1} tokens) and were truncated; {dropped} had no assistant tokens left and were dropped",
              file=sys.stderr)
    if not examples:
        raise UsageError("no conversation has an assistant token inside the context; nothing to train on")
    return examples, truncated, dropped


def pad_batch(examples, pad_id=0):
    """Right-pad a list of (inputs, targets) to the longest one in the batch (not to the full context:
    short chats cost short compute). Padded targets are IGNORE_INDEX, and since attention is causal the
    padding after a sequence never changes what comes before it (so the pad id does not matter)."""
    length = max(len(inputs) for inputs, _ in examples)
    x = torch.full((len(examples), length), pad_id, dtype=torch.long)
    y = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(examples):
        x[row, :len(inputs)] = torch.tensor(inputs)
        y[row, :len(targets)] = torch.tensor(targets)
    return x, y


class BatchSchedule:
    """Which conversations make up step s's batch. Each epoch shuffles, then sorts groups of 4 batches'
    worth by length, so that conversations of similar length share a batch and padding stays small,
    while the batch order is still random. A pure function of (seed, step): a resumed run sees exactly
    the batches an uninterrupted one would. (Measured on the tiny world's SFT data, padded tokens per
    real token: 2.25 unsorted, 1.35 sorting 4 batches' worth, 1.08 sorting 16; but 16 made SFT no
    faster, and batches of one kind of conversation each cost facts and sums: 88% and 16% against 90%
    and 34%, one run each.)"""

    group_batches = 4

    def __init__(self, examples, batch_size, seed):
        self.examples, self.seed = examples, seed
        self.batch_size = min(batch_size, len(examples))
        self.per_epoch = len(examples) // self.batch_size   # full batches; a few leftovers wait for another epoch
        self.epoch, self.batches = None, None

    def __call__(self, step):
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, self._epoch_batches(epoch)
        return [self.examples[i] for i in self.batches[index]]

    def _epoch_batches(self, epoch):
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        group, batches = self.group_batches * self.batch_size, []
        for start in range(0, len(order), group):
            chunk = sorted(order[start:start + group], key=lambda i: len(self.examples[i][0]))
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk) - self.batch_size + 1, self.batch_size)]
        rng.shuffle(batches)
        return batches


# --- The pretraining mix ----------------------------------------------------------------------
# A model this small, finetuned on the SFT chats alone, forgets what pretraining taught it: it answers
# questions about entities it only saw in pretraining with entities from the SFT set. Measured with the
# defaults otherwise: held-out entities 10% right with plain SFT, 80% with the mix (seen ones 87% both
# ways). InstructGPT met the same problem in its RL stage and mixed pretraining gradients into PPO
# ("PPO-ptx"): the objective gains a term gamma * log p(pretraining text). We do the same in SFT: every
# step also trains on a few rows of the pretraining corpus, and the loss is
# sft_loss + pretrain_mix_coef * pretrain_loss. The knowledge stays, the assistant format is learned.

def pretraining_tokens(tokenizer, documents, max_tokens, rng):
    """Tokenize a random sample of the pretraining documents (up to about max_tokens) into one stream
    of ids, <|endoftext|> before each document as in pretraining. A sample is enough: the rows only
    have to remind the model of its corpus, and tokenizing all of it would cost more than the SFT."""
    endoftext = tokenizer.special_tokens["<|endoftext|>"]
    order = list(range(len(documents)))
    rng.shuffle(order)
    stream = []
    for index in order:
        stream.append(endoftext)
        stream += tokenizer.encode(documents[index])
        if len(stream) >= max_tokens:
            break
    return torch.tensor(stream, dtype=torch.long)


def mix_documents(config, checkpoint, world):
    """The documents of the pretraining mix: --pretrain_mix_data if given, else what the checkpoint
    was pretrained on (pretrain.py records its --data; empty means the tiny world)."""
    from pretrain import load_documents
    if config.pretrain_mix_data:
        return load_documents(config.pretrain_mix_data)[0]
    data = (checkpoint.get("args") or {}).get("data") or ""
    if not data:
        return world.documents()
    if not os.path.exists(data):
        raise UsageError(f"the base model was pretrained on {data}, which is gone: give the pretraining mix "
                         f"another text with --pretrain_mix_data FILE, or turn it off with --pretrain_mix 0")
    return load_documents(data)[0]


def pretraining_batch(stream, rows, length, seed, step):
    """`rows` random windows of the stream: inputs and next-token targets, every position trained.
    The windows depend only on (seed, step), like the conversations."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    length = min(length, len(stream) - 1)
    starts = torch.randint(len(stream) - length, (rows,), generator=generator)
    x = torch.stack([stream[start:start + length] for start in starts])
    y = torch.stack([stream[start + 1:start + 1 + length] for start in starts])
    return x, y


def show_example(tokenizer, messages, block_size):
    """Print a rendered conversation: first as text with the trained tokens marked, then token by token.
    This is exactly what the loss sees."""
    ids, train_mask = render_chat(tokenizer, messages)
    color = sys.stdout.isatty()
    start, stop = ("\033[42;30m", "\033[0m") if color else ("[", "]")
    pieces, inside = [], False
    for token, trained in zip(ids, train_mask):
        if trained and not inside:
            pieces.append(start)
        if not trained and inside:
            pieces.append(stop)
        inside = bool(trained)
        pieces.append(tokenizer.decode([token]))
    if inside:
        pieces.append(stop)
    marked = "highlighted" if color else "inside [ ]"
    print(f"\nOne conversation as the model sees it; the loss counts only the tokens {marked}:\n")
    print("".join(pieces))
    print(f"\n{'position':>8}  {'id':>5}  {'token':<24} trained")
    for position, (token, trained) in enumerate(zip(ids, train_mask)):
        print(f"{position:>8}  {token:>5}  {tokenizer.decode([token])!r:<24} {'yes' if trained else ''}")
    inputs, targets, _ = encode_conversation(tokenizer, messages, block_size)
    counted = sum(target != IGNORE_INDEX for target in targets)
    print(f"\n{len(ids)} tokens; {counted} of the {len(targets)} next-token targets count in the loss "
          f"(the target at position i is the token at i + 1).")


# -----------------------------------------------------------------------------------------------
# LoRA and an int8 frozen base: the talk's parameter-efficient finetuning
#
# LoRA (Hu et al., 2021): a finetuned weight matrix W' = W + dW, and dW turns out to have low rank, so
# learn it as a product dW = B @ A of a tall (out x r) and a wide (r x in) matrix. W stays frozen; only A
# and B train: r * (in + out) numbers instead of in * out. B starts at zero, so at step 0 the model is
# exactly the base model, and A starts small and random so that B's gradient is not zero. After training,
# W + (alpha / r) * B @ A is one plain matrix again: later stages never know adapters existed.
#
# int8 base (as QLoRA does with 4 bits): a frozen matrix does not need 32-bit floats. Each output row o
# keeps one fp32 scale s[o] = max_j |W[o, j]| / 127 and int8 values q = round(W / s) in [-127, 127];
# the layer computes with q * s. Rounding moves each weight by at most half a step: |W - q*s| <= s/2.
# Memory: 1 byte per weight plus 4 bytes per row, about 4x smaller than fp32. Gradients flow into the
# adapters, never into q, so the rounding is fixed, not compounded.

def quantize_int8(weight):
    """fp32 [out, in] -> (int8 [out, in], fp32 scale [out]); symmetric, one scale per output channel."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0   # a row of zeros keeps a tiny scale, not 0/0
    quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized, scale


def dequantize_int8(quantized, scale):
    return quantized.float() * scale[:, None]


class LoRALinear(nn.Module):
    """A frozen nn.Linear (fp32 or int8) plus a trainable low-rank update (alpha / rank) * B @ A.
    With rank 0 there is no update: just the frozen layer (how an int8 base holds a layer without adapter)."""

    def __init__(self, linear, rank, alpha, precision="fp32"):
        super().__init__()
        self.in_features, self.out_features, self.rank = linear.in_features, linear.out_features, rank
        self.precision = precision
        weight = linear.weight.detach()
        if precision == "int8":
            quantized, scale = quantize_int8(weight)
            self.register_buffer("weight_int8", quantized)
            self.register_buffer("weight_scale", scale)
        else:
            self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if rank > 0:
            self.scaling = alpha / rank
            self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, device=weight.device) / math.sqrt(self.in_features))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device))

    def base_weight(self):
        if self.precision == "int8":
            return dequantize_int8(self.weight_int8, self.weight_scale)
        return self.weight

    def forward(self, x):
        base = F.linear(x, self.base_weight(), self.bias)   # the same op nn.Linear runs: step 0 is exact
        if self.rank == 0:
            return base
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return base + self.scaling * update

    def merged(self):
        """One plain nn.Linear with W + (alpha / r) * B @ A."""
        weight = self.base_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight if self.rank == 0 else weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


# The linear layers of each block that can get adapters, by the end of their names in model.py. The
# default (Config.lora_layers) leaves out the MLP's output projection: at rank 8, adapters on all four
# would be 6.4% of this 1M-parameter model's weights, on three 4.6% (on a GPT of real size, well under 1%).
LORA_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def block_linears(model):
    """The attention and MLP linear layers inside the transformer blocks. The output head is left
    alone: it is tied to the token embedding (see train_token_rows)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(LORA_LAYERS)]


def _replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model, rank, alpha, precision="fp32", layers=LORA_LAYERS):
    """Freeze every parameter of the model, then give the block linears named in `layers` LoRA adapters
    (trainable). With an int8 base every block linear is held in int8, adapter or not: all are frozen.
    Returns the names of the layers with adapters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapted = []
    for name in block_linears(model):
        if name.endswith(tuple(layers)):
            _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, precision))
            adapted.append(name)
        elif precision == "int8":
            _replace(model, name, LoRALinear(model.get_submodule(name), 0, alpha, precision))
    return adapted


def merge_lora(model):
    """Fold every adapter into its weight, in place: the model is a plain GPT again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def train_token_rows(model, token_ids):
    """Let LoRA also learn the embeddings of the chat's special tokens, and nothing else of the matrix.

    <|user|>, <|assistant|>, <|end|>... never occur in pretraining, so their embedding rows are still
    random. Frozen, they cannot be learned: measured, a LoRA model then never learns to end its answer
    (validation loss on <|end|> 3.9 nats against 0.002 with full finetuning). Libraries that add tokens
    for LoRA train those rows too (PEFT's trainable tokens). The matrix is made trainable and a hook
    zeroes the gradient of every other row; with no weight decay on it, AdamW then leaves those rows
    exactly as they were. The output head is the same matrix (weight tying), so this also teaches the
    model to *emit* <|end|>. Returns the number of parameters that really train."""
    embedding = model.transformer.wte.weight
    keep = torch.zeros(embedding.size(0), 1, device=embedding.device)
    keep[list(token_ids)] = 1.0
    embedding.requires_grad_(True)
    embedding.register_hook(lambda gradient: gradient * keep)
    return len(set(token_ids)) * embedding.size(1)


def base_weight_bytes(model):
    """Bytes held by the base model's weights: every parameter but the adapters, plus the int8 buffers."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "lora_" not in name)
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                 if name.endswith(("weight_int8", "weight_scale")))
    return total


# -----------------------------------------------------------------------------------------------
# Evaluation: the base model tricked into answering with a few-shot page, vs the SFT assistant

def newline_token_ids(tokenizer):
    """Every token whose bytes contain a newline: the base model's answer ends at the first one."""
    return [token for token in range(tokenizer.vocab_size)
            if token not in tokenizer.special_tokens.values() and b"\n" in tokenizer.decode_bytes([token])]


@torch.no_grad()
def greedy_continuations(model, tokenizer, texts, max_new_tokens, stop_tokens, batch_size=64):
    """What the base model writes after each text, greedy, up to (not including) its first stop token.
    A text too long for the context keeps its end, where the question is."""
    keep = prompt_room(model.config.block_size, max_new_tokens)

    def continue_batch(start):
        prompts = [tokenizer.encode(text)[-keep:] for text in texts[start:start + batch_size]]
        return [tokenizer.decode(generation.tokens[:-1] if generation.stopped else generation.tokens)
                for generation in model.generate(prompts, max_new_tokens, temperature=0.0, stop_tokens=stop_tokens)]
    return map_batches(model, continue_batch, len(texts), batch_size)


def line_stops(tokenizer):
    return tuple(newline_token_ids(tokenizer)) + (tokenizer.special_tokens["<|endoftext|>"],)


def base_fewshot_responses(model, tokenizer, world, prompts, max_new_tokens):
    """The talk's "trick the base model into being an assistant": put the question at the end of a page of
    questions and answers and take the first line of what the model writes next."""
    pages = [world.fewshot_prompt(prompt) for prompt in prompts]
    return [text.split("\n")[0].strip()
            for text in greedy_continuations(model, tokenizer, pages, max_new_tokens, line_stops(tokenizer))]


# --- Each family with its technique ---------------------------------------------------------------
# Asked bare, a chain-of-thought sum, a 6-digit product or a question about a country known only from a
# retrieved passage is beyond both models (0% each), which says nothing about SFT. So these three families
# are asked again the way the assistant is used (sample.py): "Let's think step by step." in front, the
# calculator run, the two passages TF-IDF retrieval finds put before the question. The base model gets the
# same help in the layouts its corpus shows it: a worked-addition page, a calculator log (the tool runs
# between the "Calculator:" line and the answer), a reading page.
TECHNIQUE_FAMILIES = ("cot", "calculator", "retrieval")   # sample.asked_with_technique builds their prompts
TECHNIQUE_SUFFIX = "_with_technique"


def sft_technique_responses(model, tokenizer, tasks, asked):
    """task prompt -> (prompt as asked, the SFT model's greedy answer with its family's technique).
    asked: asked_with_technique's prompts."""
    from sample import Sampling, chat_answers
    answers = {}
    for family in TECHNIQUE_FAMILIES:
        subset = [task.prompt for task in tasks if task.family == family]
        room = model.config.block_size if family == "cot" else 96     # a worked 4-digit sum is ~200 tokens
        sampling = Sampling(max_new_tokens=room, temperature=0.0, tool=family == "calculator")
        written = chat_answers(model, tokenizer, [asked[prompt] for prompt in subset], sampling)
        answers.update((prompt, (asked[prompt], answer)) for prompt, answer in zip(subset, written))
    return answers


def base_technique_responses(model, tokenizer, world, tasks, asked_as):
    """task prompt -> (prompt as asked, the base model's greedy answer with its family's technique), each
    technique in a layout of the base model's corpus. asked_as: asked_with_technique's prompts (graded
    against; the retrieval prompt is also what the base model reads)."""
    from data.tinyworld import ARITHMETIC_PATTERN, CALCULATOR_LOG_HEADER, calculator_log_row
    lines = line_stops(tokenizer)

    def complete(texts, max_new_tokens, stops):
        return greedy_continuations(model, tokenizer, texts, max_new_tokens, stops)

    answers = {}
    # chain of thought: a worked-addition page; the answer runs to the first blank line
    subset = [task for task in tasks if task.family == "cot"]
    written = complete([f"Question: {task.prompt}\nLet's think step by step.\n" for task in subset],
                       model.config.block_size,   # a worked 4-digit sum is ~200 tokens: as long as fits
                       (tokenizer.special_tokens["<|endoftext|>"],))
    answers.update((task.prompt, (asked_as[task.prompt], text.split("\n\n")[0].strip()))
                   for task, text in zip(subset, written))
    # the calculator: two solved rows of a calculator log, then the question. The model writes the
    # calculator line up to "->"; we compute what follows, and the model then writes the answer line.
    subset = [task for task in tasks if task.family == "calculator"]
    solved = [task for task in world.tasks("sft") if task.family == "calculator"][:2]
    rows = []
    for task in solved:
        a, _, b = ARITHMETIC_PATTERN.search(task.prompt).groups()
        rows.append(calculator_log_row(task.prompt, int(a), int(b)))
    page = "\n\n".join([CALCULATOR_LOG_HEADER] + rows) + "\n\n"
    asked = [f"{page}Question: {task.prompt}\nCalculator:" for task in subset]
    calls = [run_calculator_line(line) for line in complete(asked, 24, lines)]
    written = complete([f"{text}{call}Answer:" for text, call in zip(asked, calls)], 32, lines)
    answers.update((task.prompt, (asked_as[task.prompt], text.strip())) for task, text in zip(subset, written))
    # retrieval: the retrieval layout, which the corpus's reading pages use, then "Answer:"
    subset = [task for task in tasks if task.family == "retrieval"]
    written = complete([asked_as[task.prompt] + "\nAnswer:" for task in subset], 32, lines)
    answers.update((task.prompt, (asked_as[task.prompt], text.strip())) for task, text in zip(subset, written))
    return answers


def run_calculator_line(line):
    """What the base model wrote after "Calculator:" -> that line as the tool completes it: the expression
    up to "->", then the computed result (the model's own guess after "->" is thrown away)."""
    from sample import CalculatorError, calculate
    call = line.split("->")[0].strip()
    try:
        result = calculate(call)
    except CalculatorError:
        result = "error"
    return f" {call} -> {result}\n"


def technique_metrics(world, tasks, answers):
    """answers: task prompt -> (prompt as asked, answer). Accuracy and score of each technique family,
    graded against the prompt as asked, as "accuracy/cot_with_technique" and so on."""
    metrics = {}
    for family in TECHNIQUE_FAMILIES:
        grades = [world.grade(*answers[task.prompt]) for task in tasks if task.family == family]
        if grades:
            metrics[f"accuracy/{family}{TECHNIQUE_SUFFIX}"] = sum(grade.correct for grade in grades) / len(grades)
            metrics[f"score/{family}{TECHNIQUE_SUFFIX}"] = sum(grade.score for grade in grades) / len(grades)
    return metrics


@torch.no_grad()
def validation_loss(model, batches, device, dtype="auto"):
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


def prefixed(prefix, metrics):
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def families_in(metrics, prefix=""):
    return [key[len(prefix + "accuracy/"):] for key in metrics
            if key.startswith(prefix + "accuracy/") and key[len(prefix + "accuracy/"):] not in
            ("all", "facts_heldout", "facts_seen")]


def print_table(metrics, columns):
    """Accuracy per family (rows) for each evaluated model (columns)."""
    families = [family for family in families_in(metrics, columns[0][1]) if not family.endswith(TECHNIQUE_SUFFIX)]
    rows = families + ["all", "facts_seen", "facts_heldout"] + [family + TECHNIQUE_SUFFIX for family in TECHNIQUE_FAMILIES]
    print(f"\n{'accuracy':<26}" + "".join(f"{title:>20}" for title, _ in columns))
    for row in rows:
        cells = [metrics.get(f"{prefix}accuracy/{row}") for _, prefix in columns]
        if any(cell is not None for cell in cells):
            print(f"{row:<26}" + "".join(f"{'-':>20}" if cell is None else f"{cell:>20.1%}" for cell in cells))


# -----------------------------------------------------------------------------------------------
# Saving: checkpoint, metrics, the picture

def save_plot(path, history, metrics, columns):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, key in (("SFT loss (assistant tokens)", "sft"), ("pretraining-mix loss", "pretrain"),
                       ("validation SFT loss (held-out prompts)", "val")):
        points = history[key]
        if points:
            left.plot([step for step, _ in points], [value for _, value in points], label=label)
    left.set_xlabel("step")
    left.set_title("loss")
    left.grid(alpha=0.3)
    left.legend()
    if columns:
        families = max((families_in(metrics, prefix) for _, prefix in columns), key=len)
        width = 0.8 / len(columns)
        for index, (title, prefix) in enumerate(columns):
            values = [metrics.get(f"{prefix}accuracy/{family}", 0.0) for family in families]
            right.bar([position + index * width for position in range(len(families))], values, width, label=title)
        right.set_xticks([position + width * (len(columns) - 1) / 2 for position in range(len(families))])
        right.set_xticklabels([family.replace(TECHNIQUE_SUFFIX, " + technique") for family in families],
                              rotation=30, ha="right", fontsize=8)
        right.set_ylim(0, 1)
        right.set_title("held-out accuracy per task family")
        right.legend(fontsize=8)
    else:   # interrupted before any evaluation: only the losses to show
        figure.delaxes(right)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


# -----------------------------------------------------------------------------------------------
# The stage

def learning_rate_at(progress, warmup_fraction, peak):
    """Linear warmup, then cosine decay to 10% of the peak; progress runs from 0 to 1."""
    if progress < warmup_fraction:
        return peak * progress / warmup_fraction
    decay = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-9)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(decay, 1.0))))


def train(model, optimizer, config, batches, mix_stream, validation, device, step, history, seconds_before=0.0):
    """The loop: each step is one batch of conversations (loss on assistant tokens only) plus, when
    --pretrain_mix > 0, a few rows of pretraining text. seconds_before: training time an interrupted run
    already spent, so a --max_time clock goes on from there. Returns (steps done, interrupted, seconds
    of training in all)."""
    peak = config.lora_learning_rate if config.lora_rank > 0 else config.learning_rate
    warmup_fraction = config.warmup_iters / config.max_iters
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_seconds = config.max_time * 60
    progress = Progress(config.max_iters, max_seconds or None, prefix="sft ")
    started, interrupted = time.time() - seconds_before, False
    model.train()
    try:
        while True:
            elapsed = time.time() - started
            done = max(step / config.max_iters, elapsed / max_seconds if max_seconds else 0.0)
            if validation and (step % config.eval_interval == 0 or done >= 1.0):
                history["val"].append((step, validation_loss(model, validation, device, config.dtype)))
            if done >= 1.0:
                break
            learning_rate = learning_rate_at(max(done, (step + 1) / config.max_iters), warmup_fraction, peak)
            for group in optimizer.param_groups:   # (the progress this step completes sets its rate)
                group["lr"] = learning_rate
            x, y = pad_batch(batches(step))
            with autocast(device, config.dtype):
                _, sft_loss = model(x.to(device), y.to(device))
            loss, tokens = sft_loss, x.numel()   # tokens computed, padding included: the progress line's tokens/s
            if mix_stream is not None:
                mix_x, mix_y = pretraining_batch(mix_stream, config.pretrain_mix, config.pretrain_mix_length,
                                                 config.seed, step)
                with autocast(device, config.dtype):
                    _, pretrain_loss = model(mix_x.to(device), mix_y.to(device))
                loss = sft_loss + config.pretrain_mix_coef * pretrain_loss   # InstructGPT's PPO-ptx, in SFT
                history["pretrain"].append((step + 1, pretrain_loss.item()))
                tokens += mix_x.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            step += 1
            history["sft"].append((step, sft_loss.item()))
            progress.update(step, tokens=tokens, loss=sft_loss.item())
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted at step {step}: saving what was learned so far; continue with --resume", file=sys.stderr)
    progress.close()
    return step, interrupted, time.time() - started


def check_config(config):
    if config.base_precision == "int8" and config.lora_rank <= 0:
        raise UsageError("--base_precision int8 needs --lora_rank > 0: only a frozen base can be held in int8")
    check_options(config, positive=("max_iters", "batch_size", "eval_interval", "pretrain_mix_length", "learning_rate",
                                    "lora_learning_rate", "lora_alpha", "eval_max_new_tokens"),
                  not_negative=("pretrain_mix", "lora_rank", "warmup_iters", "eval_limit", "max_time", "reading_practice",
                                "calculator_practice", "weight_decay", "grad_clip", "pretrain_mix_coef",
                                "pretrain_mix_tokens"))


def main(config: Config) -> dict:
    started = time.time()
    check_config(config)
    if not config.show_example:   # which only prints
        check_out_dir(config.out_dir)
    set_seed(config.seed)
    device = choose_device(config.device)
    config = dataclasses.replace(config, dtype=training_dtype(device, config.dtype))   # what "auto" is here
    init_from = config.init_from or os.path.join(config.out_dir, "pretrain.pt")
    sft_path = os.path.join(config.out_dir, "sft.pt")
    model, tokenizer, base_checkpoint = load_model(init_from, stages="pretrain", device=device)
    block_size = model.config.block_size
    saved = load_resume_state(sft_path, config) if config.resume else None

    # --- data ---
    from data.tinyworld import FAMILIES, World
    world = World()   # the prompts we evaluate on, and the default data
    conversations = (jsonl_conversations(config.data) if config.data
                     else world_conversations(world, config.reading_practice, config.calculator_practice))
    if config.show_example:   # the first conversation, and the first with a tool call if there is one
        tool_calls = [c for c in conversations if any("<|result|>" in m["content"] for m in c)]
        for messages in [conversations[0]] + tool_calls[:1]:
            show_example(tokenizer, messages, block_size)
        return {}
    examples, truncated, dropped = encode_all(tokenizer, conversations, block_size)
    batches = BatchSchedule(examples, config.batch_size, config.seed)
    mix_stream = None
    if config.pretrain_mix > 0:
        mix_stream = pretraining_tokens(tokenizer, mix_documents(config, base_checkpoint, world),
                                        config.pretrain_mix_tokens, random.Random(config.seed))
    eval_tasks = world.tasks("eval")
    if config.eval_limit:   # the first N of every family
        eval_tasks = [task for family in FAMILIES
                      for task in [task for task in eval_tasks if task.family == family][:config.eval_limit]]
    validation = validation_batches(tokenizer, eval_tasks, block_size)
    from sample import asked_with_technique
    asked = asked_with_technique(world, eval_tasks)   # cot, calculator, retrieval as the assistant is asked them
    print(f"SFT on {len(examples):,} conversations from {config.data or 'the tiny world'} "
          f"({truncated} truncated, {dropped} dropped); {config.pretrain_mix} rows of pretraining text in every step")

    # --- the "before" picture: the base model, tricked into answering by a few-shot page ---
    metrics, columns, before = {}, [], {}
    if saved:
        metrics, before = saved["base_metrics"], saved["before"]
    elif eval_tasks and not config.skip_base_eval:
        base_metrics, answers = world.evaluate(lambda prompts: base_fewshot_responses(
            model, tokenizer, world, prompts, config.eval_max_new_tokens), eval_tasks)
        base_metrics.update(technique_metrics(world, eval_tasks,
                                              base_technique_responses(model, tokenizer, world, eval_tasks, asked)))
        metrics = prefixed("base_fewshot/", base_metrics)
        before = {task.prompt: answer for task, answer in zip(eval_tasks, answers)}
    if metrics:
        columns.append(("base few-shot", "base_fewshot/"))
    base_metrics = dict(metrics)

    # --- the model: full finetuning, or LoRA adapters on a frozen (maybe int8) base ---
    total = sum(p.numel() for p in model.parameters())
    trainable = total
    if config.lora_rank > 0:
        base_fp32 = base_weight_bytes(model)
        wrapped = add_lora(model, config.lora_rank, config.lora_alpha, config.base_precision, config.lora_layers)
        if not wrapped:
            raise UsageError(f"--lora_layers {' '.join(config.lora_layers)}: no linear layer of the model ends with "
                             f"these names; choose from {', '.join(LORA_LAYERS)}")
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total += adapters
        trainable = adapters + train_token_rows(model, tokenizer.special_tokens.values())
        model.to(device)
        held = base_weight_bytes(model)
        metrics.update({"memory/base_bytes_fp32": base_fp32, "memory/base_bytes": held})
        print(f"LoRA rank {config.lora_rank} on {len(wrapped)} linear layers, plus the special tokens' embeddings; "
              f"base weights {base_fp32 / 1e6:.2f} MB in fp32 -> {held / 1e6:.2f} MB held in {config.base_precision}")
    metrics.update({"params/total": total, "params/trainable": trainable, "params/trainable_fraction": trainable / total})
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%})")
    peak = config.lora_learning_rate if config.lora_rank > 0 else config.learning_rate
    # No weight decay under LoRA: it would move the embedding rows that must stay frozen.
    optimizer = model.configure_optimizer(peak, weight_decay=0.0 if config.lora_rank > 0 else config.weight_decay)
    step, history, seconds_before = 0, {"sft": [], "pretrain": [], "val": []}, 0.0
    if saved:
        step, seconds_before = saved["step"], saved.get("train_seconds", 0.0)
        missing, unexpected = model.load_state_dict(saved["weights"], strict=config.lora_rank == 0)
        if unexpected or (config.lora_rank > 0 and any("lora_" in name for name in missing)):
            raise UsageError(f"{sft_path}: its adapters do not fit this model; start afresh without --resume")
        optimizer.load_state_dict(saved["optimizer"])
        history = saved["history"]
        print(f"resuming at step {step}")

    # --- training ---
    step, interrupted, train_seconds = train(model, optimizer, config, batches, mix_stream, validation, device,
                                             step, history, seconds_before)
    metrics.update({"steps": step, "seconds/train": round(train_seconds, 1),
                    "examples": len(examples), "truncated": truncated, "dropped": dropped,
                    "interrupted": int(interrupted), "lora_rank": config.lora_rank,
                    "base_precision": config.base_precision,
                    "train/sft_loss_start": history["sft"][0][1] if history["sft"] else None,
                    "train/sft_loss": mean_last(history["sft"]), "train/pretrain_loss": mean_last(history["pretrain"]),
                    "val/loss": history["val"][-1][1] if history["val"] else None})
    extra = {}
    if interrupted:   # what --resume needs: for LoRA the adapters themselves, before they are merged away
        weights = model.state_dict()
        if config.lora_rank > 0:   # the adapters and the (tied) embedding whose special rows train
            weights = {name: tensor for name, tensor in weights.items()
                       if "lora_" in name or name in ("transformer.wte.weight", "lm_head.weight")}
        extra["resume"] = {"step": step, "weights": weights, "optimizer": optimizer.state_dict(),
                           "history": history, "lora_rank": config.lora_rank, "train_seconds": train_seconds,
                           "base_metrics": base_metrics, "before": before}
    if config.lora_rank > 0:
        merge_lora(model)   # a plain GPT from here on: evaluation and later stages see no adapters
    model.eval()

    # --- the "after" picture: the SFT model, greedy and at temperature 1 ---
    if eval_tasks and not interrupted:
        try:
            metrics.update(evaluate_sft(model, tokenizer, world, eval_tasks, asked, config, before))
            columns += [("SFT greedy", ""), ("SFT temperature 1", "temperature1/")]
            print_table(metrics, columns)
        except KeyboardInterrupt:
            metrics["interrupted"] = 1
            print("\ninterrupted during evaluation: saving the trained model without its figures", file=sys.stderr)

    # --- save ---
    metrics["seconds"] = round(time.time() - started, 1)
    save_checkpoint(sft_path, stage="sft", model=model, tokenizer=tokenizer,
                    parent={"path": init_from, "stage": base_checkpoint["stage"]}, args=config,
                    metrics=metrics, extra=extra)
    write_json(os.path.join(config.out_dir, "sft.json"), metrics)
    save_plot(os.path.join(config.out_dir, "sft.png"), history, metrics, columns)
    print(f"saved {sft_path} ({step} steps, {metrics['seconds']:.0f}s in all)")
    return metrics


# The options that shape the steps: a resumed run must take the same ones to be the run it continues.
RESUME_MUST_MATCH = ("init_from", "data", "seed", "max_iters", "max_time", "batch_size", "learning_rate",
                     "lora_learning_rate", "warmup_iters", "weight_decay", "pretrain_mix", "pretrain_mix_length",
                     "pretrain_mix_coef", "pretrain_mix_data", "pretrain_mix_tokens", "lora_rank", "lora_layers",
                     "lora_alpha", "base_precision", "reading_practice", "calculator_practice")


def load_resume_state(sft_path, config):
    """The state an interrupted run left in its checkpoint."""
    checkpoint = load_checkpoint(sft_path, stages="sft")
    state = checkpoint.get("resume")
    if state is None:
        raise UsageError(f"{sft_path} finished training; there is nothing to resume (run without --resume to start over)")
    check_resume_options(sft_path, checkpoint, config, RESUME_MUST_MATCH)
    return state


def evaluate_sft(model, tokenizer, world, tasks, asked, config, before):
    """The oracle's figures for the SFT model, greedy (the plain keys: the stage's headline) and at
    temperature 1 (what the reward model and RLHF will see), and three answers before and after."""
    evaluation_started = time.time()
    greedy, answers = world.evaluate(lambda prompts: chat_responses(
        model, tokenizer, prompts, temperature=0.0, max_new_tokens=config.eval_max_new_tokens), tasks)
    sampled, _ = world.evaluate(lambda prompts: chat_responses(
        model, tokenizer, prompts, temperature=1.0, max_new_tokens=config.eval_max_new_tokens, seed=config.seed), tasks)
    greedy.update(technique_metrics(world, tasks, sft_technique_responses(model, tokenizer, tasks, asked)))
    show_answers(tasks, before, {task.prompt: answer for task, answer in zip(tasks, answers)})
    return {**greedy, **prefixed("temperature1/", sampled), "seconds/eval": round(time.time() - evaluation_started, 1)}


def validation_batches(tokenizer, tasks, block_size, limit=256, batch_size=64):
    """Held-out prompts with their ideal answers: the SFT loss on conversations never trained on."""
    if not tasks:
        return []
    conversations = [[{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.answer}]
                     for task in tasks[:limit]]
    examples = [encode_conversation(tokenizer, messages, block_size)[:2] for messages in conversations]
    return [pad_batch(examples[start:start + batch_size]) for start in range(0, len(examples), batch_size)]


def mean_last(points, count=20):
    values = [value for _, value in points[-count:]]
    return sum(values) / len(values) if values else None


def show_answers(tasks, before, after, count=3):
    """Three held-out prompts from different families: the base model few-shot, then the SFT model."""
    shown, seen = 0, set()
    print()
    for task in tasks:
        if task.family in seen or shown == count:
            continue
        seen.add(task.family)
        shown += 1
        print(f"[{task.family}] {task.prompt}")
        if task.prompt in before:
            print(f"  base few-shot: {before[task.prompt]!r}")
        print(f"  SFT:           {after[task.prompt]!r}")
        print(f"  ideal:         {task.answer!r}")


if __name__ == "__main__":
    run_cli(main, Config, __doc__)
