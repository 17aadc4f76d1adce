"""
Talk to the models the pipeline trained, compare the stages, and print the pipeline's report card.

    python sample.py                  # chat with the latest stage present (rlhf, else sft, else pretrain)

The talk's last part is about *using* an assistant, and the payoff of the pipeline is seeing what each
stage did. A base model only completes documents ("it will answer a question with more questions"), and
can be tricked into answering by a page of questions and answers (--fewshot); the SFT model answers; RLHF
nudges the answers towards what the reward model likes. The second half of the talk is how to get the
most out of an assistant, and each of its ideas is here, measured with and without:
  - models need tokens to think: --cot asks for the steps before the answer;
  - offload what they are bad at to tools: the model writes <|calc|>347 * 829<|result|>, generation
    pauses, a small hand-written parser (never eval) computes 287663, we insert it, generation continues;
  - load relevant information into the working memory (the context): --retrieval / --docs PATH finds the
    passages most like the question (TF-IDF or the model's own hidden states, numpy cosine similarity);
  - constrain the output to a template: --json masks every token that would break the JSON, so the answer
    always parses (--schema name,age also requires those fields).

    python sample.py --prompt "What is the capital of Veldra?"   # answer once and exit
    python sample.py --compare --prompt "What is 23 + 45?"       # every stage answers the same prompt
    python sample.py --best_of 8 --verbose --prompt "..."        # the reward model picks the best of 8
    python sample.py --ckpt out/pretrain.pt --fewshot            # the base model, tricked into answering
    python sample.py --report                                    # out/report.md + out/report.png

Read it top to bottom: configuration; answering (the one generation loop every mode uses, with the tool
and the JSON mask); chat; one-shot; compare; best-of-N; the techniques (calculator, JSON prefix checker,
retrieval, chain of thought); the report card; main.
"""

import codecs
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from bpe import MESSAGE_PREFIX, TOOL_RESULT_PREFIX, UsageError, render_chat, response_text
from model import (Generation, answer_stops, atomic_path, autocast, chat_responses, check_same_tokenizer,
                   choose_device, cut_prompt, load_model, map_batches, prompt_room, read_text, run_cli,
                   write_json)

CHAT_STAGES = ("sft", "rlhf")
GENERATING_STAGES = ("pretrain", "sft", "rlhf")   # the reward model scores; it does not write


# -----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class Config:
    ckpt: str = field(default="", metadata={"help": "checkpoint to talk to; empty = the latest stage in --out_dir "
                                                    "(rlhf, else sft, else pretrain)"})
    out_dir: str = field(default="out", metadata={"help": "where the checkpoints are and report.md/png go"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "random seed for sampling (same seed, same answers)"})
    prompt: Optional[str] = field(default=None, metadata={"help": "answer this once and exit (no chat)"})
    num_samples: int = field(default=1, metadata={"help": "--prompt: how many answers to sample"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest answer, in tokens"})
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy; higher = more varied (chat: /temperature X)"})
    top_k: Optional[int] = field(default=None, metadata={"help": "sample only among the k likeliest tokens"})
    top_p: Optional[float] = field(default=None, metadata={"help": "sample only among the likeliest tokens "
                                                                   "whose probabilities add up to p"})
    fewshot: bool = field(default=False, metadata={"help": "base model: wrap the question in a page of Q&A "
                                                           "(the talk's trick) and answer with its first line"})
    compare: bool = field(default=False, metadata={"help": "answer --prompt with every stage present, side by side"})
    best_of: int = field(default=0, metadata={"help": "sample N answers, print the one the reward model likes best"})
    reward_ckpt: str = field(default="", metadata={"help": "reward model for --best_of and --report's best-of-8; "
                                                           "empty = <out_dir>/reward.pt"})
    verbose: bool = field(default=False, metadata={"help": "--best_of: show all N answers with their rewards; "
                                                           "retrieval: show the passages"})
    report: bool = field(default=False, metadata={"help": "evaluate every stage present on the held-out prompts "
                                                          "and write <out_dir>/report.md and report.png"})
    report_limit: int = field(default=0, metadata={"help": "--report: at most this many held-out prompts per "
                                                           "family (0 = all)"})
    cot: bool = field(default=False, metadata={"help": "chain of thought: ask for the steps before the answer "
                                                       "(answers may then run to the end of the context)"})
    tool: bool = field(default=True, metadata={"help": "run the calculator when the model calls it "
                                                       "(--tool false: the model must write the result itself)"})
    retrieval: bool = field(default=False, metadata={"help": "put the passages most like the question into the prompt"})
    docs: str = field(default="", metadata={"help": "documents to retrieve from: a text file (blank lines "
                                                    "separate documents) or a folder of .txt; implies --retrieval; "
                                                    "empty = the tiny world's retrieval documents"})
    embedding: str = field(default="tfidf", metadata={"help": "how passages are embedded for retrieval",
                                                      "choices": ["tfidf", "model"]})
    retrieve_k: int = field(default=2, metadata={"help": "how many passages retrieval puts in the prompt (2: the "
                                                         "tiny world has two per country; a third, about another "
                                                         "country, misleads the small model: README)"})
    index: str = field(default="", metadata={"help": "retrieval index file (.npz): loaded if it exists (it must "
                                                     "hold the same passages and --embedding), else built and "
                                                     "saved there"})
    json: bool = field(default=False, metadata={"help": "constrain the answer to valid JSON"})
    schema: str = field(default="", metadata={"help": "--json: comma-separated fields the top-level object "
                                                      "must have, e.g. name,capital"})


def check_config(config):
    """Bad option values are one clear line each, before any model is loaded."""
    if config.prompt is not None and not config.prompt.strip():
        raise UsageError("--prompt is empty: give the question to answer, e.g. --prompt \"What is 2 + 2?\"")
    if config.temperature < 0:
        raise UsageError(f"--temperature {config.temperature}: must be 0 (greedy) or more")
    if config.top_k is not None and config.top_k < 1:
        raise UsageError(f"--top_k {config.top_k}: must be 1 or more (leave it out for no limit)")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise UsageError(f"--top_p {config.top_p}: must be in (0, 1]")
    if config.num_samples < 1:
        raise UsageError(f"--num_samples {config.num_samples}: must be 1 or more")
    if config.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens {config.max_new_tokens}: must be 1 or more")
    if config.best_of < 0 or config.best_of == 1:
        raise UsageError(f"--best_of {config.best_of}: must be 2 or more (0 = off)")
    if config.retrieve_k < 1:
        raise UsageError(f"--retrieve_k {config.retrieve_k}: must be 1 or more")
    if (config.compare or config.best_of) and config.prompt is None:
        raise UsageError(f"--{'compare' if config.compare else 'best_of'} needs --prompt \"...\"")
    if config.schema and not config.json:
        raise UsageError("--schema only applies with --json")
    if config.schema:
        schema_fields(config.schema)  # raises on a malformed list


def schema_fields(schema):
    fields = [name.strip() for name in schema.split(",")]
    if not all(fields):
        raise UsageError(f"--schema {schema!r}: expected comma-separated field names, e.g. name,capital")
    # The JSON mask compares keys as the model writes them, so a name must read the same in JSON as in
    # the option: no character that JSON would escape (quotes, backslashes, control or non-ASCII ones)
    for name in fields:
        if json.dumps(name)[1:-1] != name:   # (json.dumps escapes every non-ASCII character too)
            raise UsageError(f"--schema: field {name!r} needs escaping in JSON; use plain ASCII names, "
                             f"e.g. name,capital")
    return fields


# -----------------------------------------------------------------------------------------------
# Finding checkpoints and the world they came from

def stage_path(out_dir, stage):
    return os.path.join(out_dir, f"{stage}.pt")


def stages_present(out_dir, stages=GENERATING_STAGES):
    return [stage for stage in stages if os.path.isfile(stage_path(out_dir, stage))]


def default_checkpoint(config):
    """--ckpt, else the latest stage that has been trained."""
    if config.ckpt:
        return config.ckpt
    for stage in reversed(GENERATING_STAGES):
        if os.path.isfile(stage_path(config.out_dir, stage)):
            return stage_path(config.out_dir, stage)
    raise UsageError(f"no checkpoint in {config.out_dir}/: run `python pretrain.py` first (then sft.py, "
                     "reward.py, rlhf.py), or pass --ckpt PATH")


def tiny_world():
    """The tiny world every default stage trains on (imported only by the commands that need it)."""
    from data.tinyworld import World
    return World()


# -----------------------------------------------------------------------------------------------
# Answering: the one generation loop every mode uses. It renders nothing itself (callers pass token
# ids), runs the calculator when the model asks for it, and applies the JSON mask when asked.

MAX_TOOL_CALLS = 4   # per answer: a model stuck in a loop of calls cannot run forever


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    tool: bool = True            # execute <|calc|> ... <|result|> calls
    json_fields: Optional[list] = None   # None = free text; a list (maybe empty) = constrained JSON


def sampling_from(config, block_size, temperature=None):
    # A worked addition is long (up to ~200 tokens for 4 digits), so with --cot the answer may run to the
    # end of the context whatever --max_new_tokens says; the report measures chain of thought the same way.
    max_new_tokens = max(config.max_new_tokens, block_size) if config.cot else config.max_new_tokens
    return Sampling(max_new_tokens=max_new_tokens,
                    temperature=config.temperature if temperature is None else temperature,
                    top_k=config.top_k, top_p=config.top_p, seed=config.seed, tool=config.tool,
                    json_fields=(schema_fields(config.schema) if config.schema else []) if config.json else None)


def generate_answers(model, tokenizer, prompts, sampling, stop_tokens, on_token=None, stats=None, details=None):
    """prompts: token ids ending where the answer starts. Returns each answer's token ids, without the
    stop token that ended it. on_token(index, token_id) streams every token as it comes, including the
    tool's results. stats (a dict), if given, gathers tool calls and the JSON mask's time. details (a
    list), if given, receives one Generation per answer, as RL needs them: its tokens with the stop
    token that ended it, whether one did, and the model's log-probability of each token it chose
    (None for the tokens the calculator wrote: the model did not choose them)."""
    specials = tokenizer.special_tokens
    calc_result, result_end = specials.get("<|result|>"), specials.get("<|/result|>")
    use_tool = sampling.tool and sampling.json_fields is None and calc_result is not None
    stops = tuple(stop_tokens) + ((calc_result,) if use_tool else ())
    block_size = model.config.block_size
    answers = [[] for _ in prompts]
    logprobs, ended = [[] for _ in prompts], [None] * len(prompts)   # (for details) the stop token
    calls = [0] * len(prompts)
    active = [i for i in range(len(prompts)) if len(prompts[i]) < block_size]
    round_number = 0
    while active:
        budget = max(sampling.max_new_tokens - len(answers[i]) for i in active)
        hook = None
        if sampling.json_fields is not None:
            hook = JsonMask(tokenizer, [len(prompts[i]) for i in active], sampling.json_fields,
                            end_token=stop_tokens[0], max_new_tokens=budget, block_size=block_size,
                            greedy=sampling.temperature == 0, top_k=sampling.top_k)
        stream = None if on_token is None else (lambda row, token, _active=list(active): on_token(_active[row], token))
        seed = None if sampling.seed is None else sampling.seed + 1000 * round_number
        generations = model.generate([list(prompts[i]) + answers[i] for i in active], budget,
                                     temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                     stop_tokens=stops, seed=seed, logits_hook=hook, on_token=stream)
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + sum(len(generation.tokens) for generation in generations)
            if hook is not None:
                stats["mask_seconds"] = stats.get("mask_seconds", 0.0) + hook.seconds
        still_active = []
        for i, generation in zip(active, generations):
            tokens = list(generation.tokens)
            room = sampling.max_new_tokens - len(answers[i])
            if len(tokens) > room:  # a shared budget can overshoot this answer's own
                answers[i] += tokens[:room]
                logprobs[i] += generation.logprobs[:room]
                continue
            logprobs[i] += generation.logprobs
            if generation.stopped and tokens and tokens[-1] in stop_tokens:
                answers[i] += tokens[:-1]
                ended[i] = tokens[-1]
                continue
            answers[i] += tokens
            if not (use_tool and generation.stopped and tokens and tokens[-1] == calc_result):
                continue  # ran out of tokens or context
            # The model asked for the calculator: compute, insert the result, and let it continue.
            calls[i] += 1
            if stats is not None:
                stats["tool_calls"] = stats.get("tool_calls", 0) + 1
            expression = tool_call_expression(tokenizer, answers[i])
            result = calculator_result(expression) if calls[i] <= MAX_TOOL_CALLS else "error: too many calculator calls"
            inserted = tokenizer.encode(TOOL_RESULT_PREFIX + result) + [result_end]   # bpe.py says why the space
            # a result near the end of the context or the budget is cut there, like any answer that runs out
            inserted = inserted[:min(sampling.max_new_tokens - len(answers[i]),
                                     block_size - len(prompts[i]) - len(answers[i]))]
            answers[i] += inserted
            logprobs[i] += [None] * len(inserted)
            if on_token is not None:
                for token in inserted:
                    on_token(i, token)
            if len(answers[i]) < sampling.max_new_tokens and len(prompts[i]) + len(answers[i]) < block_size:
                still_active.append(i)
        active = still_active
        round_number += 1
    if details is not None:
        details += [Generation(answer + ([stop] if stop is not None else []), chosen, stop is not None)
                    for answer, chosen, stop in zip(answers, logprobs, ended)]
    return answers


def tool_call_expression(tokenizer, answer):
    """The text between the last <|calc|> and the <|result|> that ends `answer`."""
    calc = tokenizer.special_tokens["<|calc|>"]
    body = answer[:-1]
    start = max((k for k, token in enumerate(body) if token == calc), default=-1)
    if start < 0:
        return ""
    return tokenizer.decode(body[start + 1:])


def chat_prompt(tokenizer, messages, block_size, max_new_tokens):
    """Render a conversation for the assistant to answer, dropping the oldest turns until it fits in the
    context with room for the answer (see prompt_room). Returns (ids, the messages kept, how many turns
    were dropped). A single message too long for the context keeps its end."""
    room = prompt_room(block_size, max_new_tokens)
    dropped = 0
    while True:
        ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
        if len(ids) <= room or len(messages) == 1:
            return cut_prompt(ids, room), messages, dropped
        # Drop the oldest user turn together with the assistant's answer to it.
        cut = 2 if len(messages) > 2 and messages[1]["role"] == "assistant" else 1
        messages, dropped = messages[cut:], dropped + 1


class TextStream:
    """Token ids -> printable text as they arrive. A character can span several byte-level tokens, so
    bytes are decoded incrementally and printed once whole. The token that ends an answer (<|end|>,
    <|endoftext|>) is not text and is not printed; for a chat answer (message=True) neither is the space
    render_chat puts before every message. `file` None means sys.stdout as it is when printing."""

    def __init__(self, tokenizer, file=None, message=False):
        self.tokenizer, self.file = tokenizer, file
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.skip = MESSAGE_PREFIX if message else ""
        self.hidden = set(answer_stops(tokenizer))

    def __call__(self, _index, token):
        if token in self.hidden:
            return
        text = self.decoder.decode(self.tokenizer.decode_bytes([token]))
        if text and self.skip:
            text, self.skip = text.removeprefix(self.skip), ""
        if text:
            print(text, end="", file=self.file or sys.stdout, flush=True)

    def finish(self):
        print(self.decoder.decode(b"", final=True), file=self.file or sys.stdout, flush=True)


# -----------------------------------------------------------------------------------------------
# Preparing the question: the techniques that change what the model is asked

def prepare_question(question, config, retriever=None):
    """The user's words -> the message the model sees (retrieved passages, chain-of-thought prefix)."""
    from data.tinyworld import COT_PREFIX, context_prompt
    if retriever is not None:
        passages = [chunk for _, chunk in retriever.search(question, config.retrieve_k)]
        if config.verbose:
            for passage in passages:
                print(f"[retrieved] {passage}", file=sys.stderr)
        question = context_prompt(passages, question)
    if config.cot:
        question = COT_PREFIX + question
    return question


def asked_with_technique(world, tasks):
    """The tiny world's held-out prompts are stored bare, so that a stage can measure the model with and
    without each technique. This gives, for the three technique families, task prompt -> the prompt as
    the assistant is asked it, prepared as for a user (prepare_question): "Let's think step by step." in
    front of a long sum, the passages TF-IDF finds before a retrieval question, a product as it is (the
    calculator is a sampling option, not part of the prompt). The reward and RL splits store theirs asked
    this way already (half their long sums with the prefix, every retrieval question with passages). The
    oracle grades an answer against the prompt as asked: after "Let's think step by step." only a worked
    answer is ideal."""
    retriever = None
    if any(task.family == "retrieval" for task in tasks):
        retriever = Retriever.build(world.retrieval_documents(), TfidfEmbedder())
    plain, cot = Config(), Config(cot=True)
    asked = {"cot": lambda question: prepare_question(question, cot), "calculator": lambda question: question,
             "retrieval": lambda question: prepare_question(question, plain, retriever)}
    return {task.prompt: asked[task.family](task.prompt) for task in tasks if task.family in asked}


def tasks_as_asked(world, tasks):
    """The same tasks, each with its prompt as the assistant is asked it (asked_with_technique): what
    reward.py holds out and rlhf.py evaluates on, posed the way their training prompts are."""
    asked = asked_with_technique(world, tasks)
    return [replace(task, prompt=asked.get(task.prompt, task.prompt)) for task in tasks]


def chat_answers(model, tokenizer, questions, sampling, batch_size=64, stats=None):
    """Single-turn answers to many questions, in batches: like model.chat_responses, plus the tool
    and the JSON mask."""
    batch_stats = {}   # each batch's own, added up at the end (batches may run side by side)

    def answer(start):   # one batch, seeded by where it starts
        rendered = [chat_prompt(tokenizer, [{"role": "user", "content": question}], model.config.block_size,
                                sampling.max_new_tokens)[0] for question in questions[start:start + batch_size]]
        seeded = Sampling(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + start})
        batch_stats[start] = own = {}
        answers = generate_answers(model, tokenizer, rendered, seeded, answer_stops(tokenizer), stats=own)
        return [response_text(tokenizer, tokens) for tokens in answers]
    answers = map_batches(model, answer, len(questions), batch_size)
    if stats is not None:
        for own in batch_stats.values():
            for key, value in own.items():
                stats[key] = stats.get(key, 0) + value
    return answers


def fewshot_answers(model, tokenizer, world, questions, sampling, batch_size=64):
    """The talk's trick for a base model: each question at the end of a page of solved questions; the
    answer is the first line of what the model writes next."""
    from sft import newline_token_ids
    stops = [tokenizer.special_tokens["<|endoftext|>"]] + newline_token_ids(tokenizer)
    keep = prompt_room(model.config.block_size, sampling.max_new_tokens)

    def answer(start):
        pages = [tokenizer.encode(world.fewshot_prompt(question))[-keep:]
                 for question in questions[start:start + batch_size]]
        plain = Sampling(**{**sampling.__dict__, "tool": False, "json_fields": None,
                            "seed": None if sampling.seed is None else sampling.seed + start})
        return [tokenizer.decode(tokens).split("\n")[0].strip()
                for tokens in generate_answers(model, tokenizer, pages, plain, stops)]
    return map_batches(model, answer, len(questions), batch_size)


# -----------------------------------------------------------------------------------------------
# Chat: multi-turn with a chat stage, document completion with the base model

def chat(config, model, tokenizer, checkpoint, path, retriever):
    stage = checkpoint["stage"]
    sampling = sampling_from(config, model.config.block_size)
    block_size = model.config.block_size
    if stage == "pretrain":
        how = "few-shot Q&A (answers are the first line)" if config.fewshot else \
            "document completion: type the start of a document"
    else:
        how = "chat"
    print(f"{path}: {stage} model, {model.num_parameters() / 1e6:.2f}M parameters, context {block_size} tokens. "
          f"{how}. Commands: /reset /quit /temperature X")
    world = tiny_world() if stage == "pretrain" and config.fewshot else None
    messages = []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command == "/quit":
                return
            if command == "/reset":
                messages = []
                print("(conversation cleared)")
            elif command == "/temperature":
                try:
                    value = float(argument)
                    if value < 0 or not math.isfinite(value):
                        raise ValueError
                    sampling.temperature = value
                    print(f"(temperature {value})")
                except ValueError:
                    print(f"(/temperature needs a number >= 0, e.g. /temperature 0.7; got {argument!r})")
            else:
                print(f"(unknown command {command}: try /reset, /quit or /temperature X)")
            continue
        sampling.seed += 1   # a new draw each turn
        stream = TextStream(tokenizer, message=stage != "pretrain")
        if stage == "pretrain":
            complete_document(model, tokenizer, line, sampling, world, stream)
            continue
        messages = messages + [{"role": "user", "content": prepare_question(line, config, retriever)}]
        ids, messages, dropped = chat_prompt(tokenizer, messages, block_size, sampling.max_new_tokens)
        if dropped:
            print(f"(the conversation outgrew the {block_size}-token context: dropped the oldest "
                  f"{dropped} turn{'s' if dropped > 1 else ''})")
        full_length = len(render_chat(tokenizer, messages, add_generation_prompt=True)[0])
        if full_length > len(ids):
            print(f"(your message alone is longer than the context: the model sees only its last {len(ids)} tokens)")
        answer = generate_answers(model, tokenizer, [ids], sampling, answer_stops(tokenizer),
                                  on_token=stream)[0]
        stream.finish()
        messages = messages + [{"role": "assistant", "content": response_text(tokenizer, answer)}]


def complete_document(model, tokenizer, text, sampling, world, stream=None):
    """The base model continues the text (or, with a world, answers a few-shot Q&A page with its first
    line). Returns the continuation."""
    from sft import newline_token_ids
    keep = prompt_room(model.config.block_size, sampling.max_new_tokens)
    stops = [tokenizer.special_tokens["<|endoftext|>"]]
    if world is not None:
        text = world.fewshot_prompt(text)
        stops += newline_token_ids(tokenizer)
    ids = tokenizer.encode(text)[-keep:]
    plain = Sampling(**{**sampling.__dict__, "tool": False, "json_fields": None})
    tokens = generate_answers(model, tokenizer, [ids], plain, stops, on_token=stream)[0]
    if stream is not None:
        stream.finish()
    return tokenizer.decode(tokens).split("\n")[0].strip() if world is not None else tokenizer.decode(tokens)


# -----------------------------------------------------------------------------------------------
# One-shot: answer --prompt and exit

def answer_prompt(model, tokenizer, checkpoint, question, sampling, config, retriever=None, num_samples=1):
    """num_samples answers to one question, from any generating stage."""
    if checkpoint["stage"] == "pretrain":
        world = tiny_world() if config.fewshot else None
        answers = []
        for k in range(num_samples):
            seeded = Sampling(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + k})
            answers.append(complete_document(model, tokenizer, question, seeded, world))
        return answers
    content = prepare_question(question, config, retriever)
    ids, _, dropped = chat_prompt(tokenizer, [{"role": "user", "content": content}], model.config.block_size,
                                  sampling.max_new_tokens)
    answers = generate_answers(model, tokenizer, [ids] * num_samples, sampling, answer_stops(tokenizer))
    return [response_text(tokenizer, answer) for answer in answers]


def one_shot(config, model, tokenizer, checkpoint, retriever):
    sampling = sampling_from(config, model.config.block_size)
    answers = answer_prompt(model, tokenizer, checkpoint, config.prompt, sampling, config, retriever, config.num_samples)
    for k, answer in enumerate(answers):
        if len(answers) > 1:
            print(f"--- sample {k + 1} of {len(answers)} ---")
        print(answer)
    return answers


# -----------------------------------------------------------------------------------------------
# Compare: the talk's slide of base vs SFT vs RLHF answering the same prompt

def compare(config, device, retriever_for):
    stages = stages_present(config.out_dir)
    if not stages:
        raise UsageError(f"no checkpoint in {config.out_dir}/: run `python pretrain.py` first")
    results = {}
    for stage in stages:
        path = stage_path(config.out_dir, stage)
        model, tokenizer, checkpoint = load_model(path, device=device)
        sampling = sampling_from(config, model.config.block_size)
        answers = answer_prompt(model, tokenizer, checkpoint, config.prompt, sampling, config,
                                retriever_for(model, tokenizer, checkpoint), config.num_samples)
        results[stage] = answers
        print(f"=== {stage} ({path}) ===")
        for answer in answers:
            print(answer.strip() or "(empty answer)")
        print()
    return results


# -----------------------------------------------------------------------------------------------
# Best-of-N: "ensemble multiple attempts" — sample N answers and keep the one the reward model likes

def best_of_n(config, model, tokenizer, checkpoint, path, device, retriever):
    from reward import reward_scores
    if checkpoint["stage"] not in CHAT_STAGES:
        raise UsageError(f"--best_of needs a chat model (sft or rlhf); {path} is a {checkpoint['stage']} model")
    reward_path = config.reward_ckpt or stage_path(config.out_dir, "reward")
    reward_model, reward_tokenizer, _ = load_model(reward_path, stages="reward", device=device)
    check_same_tokenizer(path, tokenizer, reward_path, reward_tokenizer)
    sampling = sampling_from(config, model.config.block_size)
    if sampling.temperature == 0:
        raise UsageError("--best_of with --temperature 0 would sample the same answer N times; use e.g. 0.8")
    question = prepare_question(config.prompt, config, retriever)
    ids, _, _ = chat_prompt(tokenizer, [{"role": "user", "content": question}], model.config.block_size,
                            sampling.max_new_tokens)
    answers = generate_answers(model, tokenizer, [ids] * config.best_of, sampling, answer_stops(tokenizer))
    answers = [response_text(tokenizer, answer) for answer in answers]
    rewards = reward_scores(reward_model, tokenizer, [question] * len(answers), answers).tolist()
    best = max(range(len(answers)), key=lambda k: rewards[k])
    if config.verbose:
        for k in sorted(range(len(answers)), key=lambda k: -rewards[k]):
            print(f"[reward {rewards[k]:+.3f}]{' (best)' if k == best else ''} {answers[k]}")
        print("---")
    print(answers[best])
    return answers[best], answers, rewards


# -----------------------------------------------------------------------------------------------
# Technique 1 — the calculator. A recursive-descent parser over the grammar
#     expression := term (("+" | "-") term)*
#     term       := factor (("*" | "×" | "/" | "÷") factor)*
#     factor     := ("-" | "+") factor | number | "(" expression ")"
# with exact rational arithmetic (fractions), so 0.1 + 0.2 is 0.3 and big products are exact. It never
# calls eval: anything outside the grammar is an error the model reads back as the result.

MAX_EXPRESSION_CHARS = 200
MAX_NUMBER_DIGITS = 40
MAX_DEPTH = 30
MAX_MAGNITUDE = Fraction(10) ** 60


class CalculatorError(ValueError):
    pass


class ExpressionParser:
    OPERATORS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "/": "/", "÷": "/"}

    def __init__(self, text):
        if len(text) > MAX_EXPRESSION_CHARS:
            raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        self.tokens = self.tokenize(text)
        self.position = 0
        self.depth = 0

    def tokenize(self, text):
        tokens, k = [], 0
        while k < len(text):
            character = text[k]
            if character.isspace():
                k += 1
            elif character in "0123456789.":
                start = k
                while k < len(text) and text[k] in "0123456789.":
                    k += 1
                number = text[start:k]
                if number.count(".") > 1 or number == "." or number.endswith("."):
                    raise CalculatorError(f"bad number {number!r}")
                if len(number.replace(".", "")) > MAX_NUMBER_DIGITS:
                    raise CalculatorError(f"number longer than {MAX_NUMBER_DIGITS} digits")
                tokens.append(Fraction(number))
            elif character in self.OPERATORS:
                tokens.append(self.OPERATORS[character])
                k += 1
            elif character in "()":
                tokens.append(character)
                k += 1
            else:
                raise CalculatorError(f"unexpected {character!r}")
        return tokens

    def peek(self):
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self):
        token = self.peek()
        self.position += 1
        return token

    def parse(self):
        if not self.tokens:
            raise CalculatorError("empty expression")
        value = self.expression()
        if self.peek() is not None:
            raise CalculatorError(f"unexpected {self.peek()!r}")
        return value

    def expression(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            operator, right = self.take(), self.term()
            value = checked(value + right if operator == "+" else value - right)
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/"):
            operator, right = self.take(), self.factor()
            if operator == "/" and right == 0:
                raise CalculatorError("division by zero")
            value = checked(value * right if operator == "*" else value / right)
        return value

    def factor(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError("too deeply nested")
        token = self.take()
        if token == "-":
            value = -self.factor()
        elif token == "+":
            value = self.factor()
        elif token == "(":
            value = self.expression()
            if self.take() != ")":
                raise CalculatorError("missing )")
        elif isinstance(token, Fraction):
            value = token
        else:
            raise CalculatorError("expected a number" if token is None else f"unexpected {token!r}")
        self.depth -= 1
        return value


def checked(value):
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    return value


def format_number(value):
    """Integers exactly; other values as decimals rounded to 6 places, without trailing zeros. The
    rounding is done on the fraction itself, not a float, so a large value keeps every digit; a value
    too small to show in 6 places is written as its fraction (1/3000000)."""
    if value.denominator == 1:
        return str(value.numerator)
    millionths = round(abs(value) * 10 ** 6)
    if millionths == 0:
        return f"{value.numerator}/{value.denominator}"
    whole, fraction = divmod(millionths, 10 ** 6)
    text = f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")
    return "-" + text if value < 0 else text


def calculate(text):
    """Expression text -> result text. Raises CalculatorError on anything outside the grammar."""
    return format_number(ExpressionParser(text).parse())


def calculator_result(text):
    """What the tool writes back after <|result|>: the value, or 'error: ...' that the model sees."""
    try:
        return calculate(text)
    except CalculatorError as error:
        return f"error: {error}"


# -----------------------------------------------------------------------------------------------
# Technique 2 — constrained JSON. An incremental checker of "is this a prefix of some JSON value?",
# over bytes (JSON's structure is ASCII, and byte-level tokens can split a character). Its state is a
# small immutable tuple, so trying a token = feeding its bytes to a copy. Each step of generation we
# mask every token that would leave an invalid prefix, or that would leave too little room to finish
# (the checker knows a shortest way to close what is open), so the answer always parses.

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrtu')
NUMBER_END_STATES = frozenset(("zero", "int", "frac", "exp"))
MAX_JSON_DEPTH = 16


class JsonPrefix:
    """State = (mode, stack, aux, keys). mode says what may come next; stack holds the open containers
    ("{" or "["); aux is the mode's detail (a literal's missing letters, a key being written, hex digits
    left); keys are the top-level object's keys so far (tracked only to enforce required fields)."""

    def __init__(self, required=()):
        self.required = tuple(json.dumps(name)[1:-1].encode() for name in required)
        self._closing = {}

    def start(self):
        return ("value", (), None, frozenset())

    def feed(self, state, data):
        """The state after `data` (bytes), or None if the text would no longer be a JSON prefix."""
        for byte in data:
            state = self.step(state, byte)
            if state is None:
                return None
        return state

    def step(self, state, byte):
        mode, stack, aux, keys = state
        if mode in ("value", "value_or_close"):
            if byte in WHITESPACE:
                return state
            if mode == "value_or_close" and byte == ord("]"):
                return self.close(stack, keys)
            if self.required and not stack and byte != ord("{"):
                return None  # a schema asks for an object
            if byte == ord("{") or byte == ord("["):
                if len(stack) >= MAX_JSON_DEPTH:
                    return None
                opened = stack + (chr(byte),)
                return ("key_or_close", opened, None, keys) if byte == ord("{") else ("value_or_close", opened, None, keys)
            if byte == ord('"'):
                return ("string", stack, None, keys)
            if byte == ord("-"):
                return ("minus", stack, None, keys)
            if byte == ord("0"):
                return ("zero", stack, None, keys)
            if byte in DIGITS:
                return ("int", stack, None, keys)
            for literal in (b"true", b"false", b"null"):
                if byte == literal[0]:
                    return ("literal", stack, literal[1:], keys)
            return None
        if mode in ("key_or_close", "key"):
            if byte in WHITESPACE:
                return state
            if byte == ord('"'):
                return ("key_string", stack, b"", keys)
            if mode == "key_or_close" and byte == ord("}"):
                return self.close(stack, keys)
            return None
        if mode in ("string", "key_string"):
            if byte == ord('"'):
                if mode == "string":
                    return ("after", stack, None, keys)
                if self.required and len(stack) == 1:
                    keys = keys | {aux}
                return ("colon", stack, None, keys)
            if byte == ord("\\"):
                return (mode + "_escape", stack, aux, keys)
            if byte < 0x20:
                return None  # control characters must be escaped inside strings
            return (mode, stack, aux + bytes([byte]) if mode == "key_string" else aux, keys)
        if mode in ("string_escape", "key_string_escape"):
            base = mode[:-len("_escape")]
            if byte not in ESCAPES:
                return None
            if byte == ord("u"):
                return (base + "_unicode", stack, (aux + b"\\u" if base == "key_string" else aux, 4), keys)
            return (base, stack, aux + b"\\" + bytes([byte]) if base == "key_string" else aux, keys)
        if mode in ("string_unicode", "key_string_unicode"):
            if byte not in HEX:
                return None
            text, left = aux
            base = mode[:-len("_unicode")]
            text = text + bytes([byte]) if base == "key_string" else text   # keys are kept as written
            return (base, stack, text, keys) if left == 1 else (mode, stack, (text, left - 1), keys)
        if mode == "colon":
            if byte in WHITESPACE:
                return state
            return ("value", stack, None, keys) if byte == ord(":") else None
        if mode == "literal":
            if byte != aux[0]:
                return None
            return ("after", stack, None, keys) if len(aux) == 1 else ("literal", stack, aux[1:], keys)
        # Numbers: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?  — a number ends at the first byte that
        # cannot continue it, which is then read as what follows the value.
        if mode == "minus":
            if byte == ord("0"):
                return ("zero", stack, None, keys)
            return ("int", stack, None, keys) if byte in DIGITS else None
        if mode in ("int", "frac", "exp") and byte in DIGITS:
            return state
        if mode in ("zero", "int") and byte == ord("."):
            return ("dot", stack, None, keys)
        if mode in ("zero", "int", "frac") and byte in (ord("e"), ord("E")):
            return ("e", stack, None, keys)
        if mode == "dot":
            return ("frac", stack, None, keys) if byte in DIGITS else None
        if mode == "e":
            if byte in b"+-":
                return ("e_sign", stack, None, keys)
            return ("exp", stack, None, keys) if byte in DIGITS else None
        if mode == "e_sign":
            return ("exp", stack, None, keys) if byte in DIGITS else None
        if mode in NUMBER_END_STATES:
            return self.step(("after", stack, None, keys), byte)
        if mode == "after":
            if byte in WHITESPACE:
                return state
            if not stack:
                return None  # one value only
            if byte == ord(","):
                return ("value", stack, None, keys) if stack[-1] == "[" else ("key", stack, None, keys)
            if (byte == ord("]") and stack[-1] == "[") or (byte == ord("}") and stack[-1] == "{"):
                return self.close(stack, keys)
            return None
        raise AssertionError(f"unknown mode {mode}")

    def close(self, stack, keys):
        if stack[-1] == "{" and len(stack) == 1 and self.missing(keys):
            return None  # a required field is still missing
        return ("after", stack[:-1], None, keys)

    def missing(self, keys):
        return [name for name in self.required if name not in keys]

    def is_complete(self, state):
        mode, stack = state[0], state[1]
        return not stack and (mode == "after" or mode in NUMBER_END_STATES)

    def next_closing_byte(self, state):
        """One byte of a canonical way to finish the value (None when it is complete). Following these
        bytes always ends in a complete value, so closing_length below is well defined."""
        mode, stack, aux, keys = state
        if self.is_complete(state):
            return None
        if mode == "value":
            return ord("{") if self.required and not stack else ord("0")
        if mode in ("value_or_close",):
            return ord("]")
        if mode in ("key_or_close", "after") or mode in NUMBER_END_STATES:
            top = stack[-1]
            if top == "[":
                return ord("]")
            if len(stack) == 1 and self.missing(keys):
                return ord('"') if mode == "key_or_close" else ord(",")
            return ord("}")
        if mode == "key":
            return ord('"')
        if mode == "key_string":
            missing = self.missing(keys) if len(stack) == 1 else []
            for name in ([] if aux in missing else missing):   # finish a required name being written
                if name.startswith(aux):
                    return name[len(aux)]
            return ord('"')
        if mode == "string":
            return ord('"')
        if mode.endswith("_escape"):
            return ord("n")
        if mode.endswith("_unicode") or mode in ("minus", "dot", "e", "e_sign"):
            return ord("0")
        if mode == "colon":
            return ord(":")
        if mode == "literal":
            return aux[0]
        raise AssertionError(f"unknown mode {mode}")

    def closing(self, state):
        """The canonical bytes that finish the value from `state`."""
        out = bytearray()
        while (byte := self.next_closing_byte(state)) is not None:
            out.append(byte)
            state = self.step(state, byte)
        return bytes(out)

    def closing_length(self, state):
        """len(self.closing(state)), counted without building it: the mask asks this for every token it
        tries, so it must be cheap. (A test checks it against closing() on many states.)"""
        mode, stack, aux, keys = state
        if mode == "value" and self.required and not stack:
            return self.keys_cost(keys) + 1                   # '{' + '"m1":0' + ',"m2":0'... + '}'
        if mode == "value" or mode in ("minus", "dot", "e", "e_sign", "string"):
            return 1 + self.after_cost(stack, keys)
        if mode == "value_or_close":
            return 1 + self.after_cost(stack[:-1], keys)
        if mode in ("after",) or mode in NUMBER_END_STATES:
            return self.after_cost(stack, keys)
        if mode in ("key_or_close", "key"):
            if len(stack) == 1 and self.missing(keys):
                return self.keys_cost(keys) - 1 + 1            # '"m1":0' + ',"m2":0'... + '}'
            if mode == "key_or_close":
                return 1 + self.after_cost(stack[:-1], keys)   # '}'
            return 4 + self.after_cost(stack, keys)            # '"":0'
        if mode == "key_string":
            return self.key_string_cost(stack, aux, keys)
        if mode == "key_string_escape":
            return 1 + self.key_string_cost(stack, aux + b"\\n", keys)
        if mode == "key_string_unicode":
            return aux[1] + self.key_string_cost(stack, aux[0] + b"0" * aux[1], keys)
        if mode == "colon":
            return 2 + self.after_cost(stack, keys)
        if mode == "string_escape":
            return 2 + self.after_cost(stack, keys)
        if mode == "string_unicode":
            return aux[1] + 1 + self.after_cost(stack, keys)
        if mode == "literal":
            return len(aux) + self.after_cost(stack, keys)
        raise AssertionError(f"unknown mode {mode}")

    def keys_cost(self, keys):
        """Bytes of ',"name":0' for every required field still missing."""
        return sum(len(name) + 5 for name in self.missing(keys))

    def after_cost(self, stack, keys):
        """Bytes to close every open container, just after a value: ']' or '}' each, plus the missing
        required fields before the top-level '}'."""
        if not stack:
            return 0
        return len(stack) + (self.keys_cost(keys) if stack[0] == "{" else 0)

    def key_string_cost(self, stack, text, keys):
        if len(stack) == 1 and self.required:
            missing = self.missing(keys)
            for name in ([] if text in missing else missing):
                if name.startswith(text):
                    return len(name) - len(text) + 3 + self.after_cost(stack, keys | {name})
            keys = keys | {text}
        return 3 + self.after_cost(stack, keys)    # '":0'


def json_prefix_ok(text, required=()):
    """True iff `text` is a prefix of some JSON value (with the required top-level fields)."""
    checker = JsonPrefix(required)
    return checker.feed(checker.start(), text.encode("utf-8")) is not None


class JsonMask:
    """A logits_hook for GPT.generate: every step, each row's logits keep only tokens that keep the
    answer a JSON prefix which can still be closed within the tokens left; the end token is allowed only
    once the value is complete. Cost: rather than try all V tokens each step, candidates are tried in
    order of probability, stopping once the untried ones together hold at most 1% as much probability
    as the allowed ones found (greedy: at the first allowed token) — so, like top-p, the long tail of
    unlikely tokens is left out. If nothing tried is allowed, the canonical closing byte is."""

    MASS_TOLERANCE = 0.01
    _token_bytes_cache = {}

    def __init__(self, tokenizer, prompt_lengths, required, end_token, max_new_tokens, block_size,
                 greedy=False, top_k=None):
        self.checker = JsonPrefix(required)
        # Tokens each row may still write: generate stops at max_new_tokens or at the end of the context.
        self.budgets = [min(max_new_tokens, block_size - length) for length in prompt_lengths]
        self.end_token = end_token
        needed = self.checker.closing_length(self.checker.start()) + 1
        if min(self.budgets) < needed:
            raise UsageError(f"--json: an answer with {'these fields' if required else 'JSON'} needs at least {needed} "
                             f"tokens, but only {min(self.budgets)} are left (raise --max_new_tokens or shorten the prompt)")
        self.greedy, self.top_k = greedy, top_k
        self.token_bytes = self.tokens_as_bytes(tokenizer)
        self.byte_token = {data[0]: token for token, data in enumerate(self.token_bytes) if data and len(data) == 1}
        self.states = {}       # (row, tokens so far) -> state
        self.seconds = 0.0     # time spent masking, to measure its cost per token
        self.steps = 0

    @classmethod
    def tokens_as_bytes(cls, tokenizer):
        """Every token's bytes (None for special tokens), computed once per tokenizer."""
        key = id(tokenizer)
        cached = cls._token_bytes_cache.get(key)
        if cached is None or cached[0] is not tokenizer:
            specials = set(tokenizer.special_tokens.values())
            data = [None if token in specials else tokenizer.decode_bytes([token]) for token in range(tokenizer.vocab_size)]
            cached = cls._token_bytes_cache[key] = (tokenizer, data)
        return cached[1]

    def state_of(self, row, new_tokens):
        """The checker's state after this row's answer so far (cached: each step adds one token)."""
        known = len(new_tokens)
        while known > 0 and (row, known) not in self.states:
            known -= 1
        state = self.states.get((row, known), self.checker.start())
        for count in range(known + 1, len(new_tokens) + 1):
            token = new_tokens[count - 1]
            data = self.token_bytes[token] if 0 <= token < len(self.token_bytes) else None
            state = None if state is None or data is None else self.checker.feed(state, data)
            self.states[(row, count)] = state
        return state

    def __call__(self, step, new_tokens_so_far, logits):
        started = time.perf_counter()
        masked = torch.full_like(logits, float("-inf"))
        for row, new_tokens in enumerate(new_tokens_so_far):
            state = self.state_of(row, new_tokens)
            if (new_tokens and new_tokens[-1] == self.end_token) or state is None:
                masked[row] = logits[row]   # a finished row: whatever is chosen here is thrown away
                continue
            allowed = torch.tensor(self.allowed(state, logits[row], self.budgets[row] - len(new_tokens)),
                                   device=logits.device)
            masked[row, allowed] = logits[row, allowed]
        self.seconds += time.perf_counter() - started
        self.steps += 1
        return masked

    def allowed(self, state, logits, left):
        """Tokens allowed from `state` with `left` tokens to go (this one included), likeliest first."""
        checker = self.checker
        if left <= 1:  # the last token there is room for: it must end the answer
            if checker.is_complete(state):
                return [self.end_token]
            return [self.byte_token[checker.next_closing_byte(state)]]
        probabilities = torch.softmax(logits.float(), dim=-1)
        order = torch.argsort(probabilities, descending=True).tolist()
        probabilities = probabilities.tolist()
        allowed, allowed_mass, tried_mass = [], 0.0, 0.0
        for token in order:
            if token == self.end_token:
                ok = checker.is_complete(state)
            else:
                data = self.token_bytes[token] if token < len(self.token_bytes) else None
                new = checker.feed(state, data) if data else None
                ok = new is not None and checker.closing_length(new) + 1 <= left - 1
            tried_mass += probabilities[token]
            if ok:
                allowed.append(token)
                allowed_mass += probabilities[token]
                if self.greedy or (self.top_k and len(allowed) >= self.top_k):
                    break
            if allowed and 1.0 - tried_mass <= self.MASS_TOLERANCE * allowed_mass:
                break
        if not allowed:
            byte = checker.next_closing_byte(state)
            allowed = [self.end_token if byte is None else self.byte_token[byte]]
        return allowed


# -----------------------------------------------------------------------------------------------
# Technique 3 — retrieval. Documents -> chunks -> vectors; a question's vector -> the k most similar
# chunks by cosine similarity (numpy), which go into the prompt in the format SFT taught.

CHUNK_WORDS = 80


def read_documents(path):
    """A text file (documents separated by blank lines) or a folder of .txt files (one document each)."""
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if name.endswith(".txt"))
        if not names:
            raise UsageError(f"--docs {path}: the folder has no .txt files")
        return [read_text(os.path.join(path, name)) for name in names]
    if not os.path.isfile(path):
        raise UsageError(f"--docs {path}: no such file or folder")
    documents = [part.strip() for part in re.split(r"\n\s*\n", read_text(path)) if part.strip()]
    if not documents:
        raise UsageError(f"--docs {path}: the file is empty")
    return documents


def split_chunks(documents, max_words=CHUNK_WORDS):
    """Each document in pieces of at most max_words words, cut between sentences where possible, so a
    short document (one entity's facts) stays whole."""
    chunks = []
    for document in documents:
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(document.split()))
        current = []
        for sentence in sentences:
            words = sentence.split()
            if current and len(current) + len(words) > max_words:
                chunks.append(" ".join(current))
                current = []
            current += words
            while len(current) > max_words:  # a single very long sentence
                chunks.append(" ".join(current[:max_words]))
                current = current[max_words:]
        if current:
            chunks.append(" ".join(current))
    return chunks


def words_of(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def normalize_rows(vectors):
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class TfidfEmbedder:
    """Bag of words weighted by rarity: tf = 1 + log(count), idf = log((1 + N) / (1 + df)) + 1. A word in
    every chunk says nothing about which chunk is meant; an entity's name says almost everything."""

    name = "tfidf"

    def __init__(self, vocabulary=None, idf=None):
        self.vocabulary = vocabulary or {}
        self.idf = idf if idf is not None else np.zeros(0, dtype=np.float32)

    def fit(self, chunks):
        document_frequency = {}
        for chunk in chunks:
            for word in set(words_of(chunk)):
                document_frequency[word] = document_frequency.get(word, 0) + 1
        self.vocabulary = {word: k for k, word in enumerate(sorted(document_frequency))}
        self.idf = np.array([math.log((1 + len(chunks)) / (1 + document_frequency[word])) + 1
                             for word in sorted(document_frequency)], dtype=np.float32)
        return self

    def embed(self, texts):
        vectors = np.zeros((len(texts), len(self.vocabulary)), dtype=np.float32)
        for row, text in enumerate(texts):
            counts = {}
            for word in words_of(text):
                if word in self.vocabulary:
                    counts[word] = counts.get(word, 0) + 1
            for word, count in counts.items():
                column = self.vocabulary[word]
                vectors[row, column] = (1 + math.log(count)) * self.idf[column]
        return normalize_rows(vectors)

    def arrays(self):
        return {"vocabulary": np.array(sorted(self.vocabulary, key=self.vocabulary.get), dtype=str),
                "idf": self.idf}

    @classmethod
    def from_arrays(cls, arrays):
        return cls({str(word): k for k, word in enumerate(arrays["vocabulary"])}, arrays["idf"])


class ModelEmbedder:
    """The model's own view: the mean of its final hidden states over the text's tokens."""

    name = "model"

    def __init__(self, model, tokenizer, batch_size=32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def fit(self, chunks):
        return self

    @torch.no_grad()
    def embed(self, texts):
        device = next(self.model.parameters()).device
        block_size = self.model.config.block_size
        rows = []
        for start in range(0, len(texts), self.batch_size):
            encoded = [self.tokenizer.encode(text)[:block_size] or [0] for text in texts[start:start + self.batch_size]]
            longest = max(len(ids) for ids in encoded)
            # Right padding: a causal model's states at the real positions never see the padding.
            idx = torch.zeros((len(encoded), longest), dtype=torch.long, device=device)
            weights = torch.zeros((len(encoded), longest, 1), device=device)
            for row, ids in enumerate(encoded):
                idx[row, :len(ids)] = torch.tensor(ids, device=device)
                weights[row, :len(ids)] = 1.0
            with autocast(device):
                hidden = self.model.hidden_states(idx).float()
            rows.append(((hidden * weights).sum(1) / weights.sum(1)).cpu().numpy())
        return normalize_rows(np.concatenate(rows) if rows else np.zeros((0, self.model.config.n_embd)))

    def fingerprint(self):
        """Ties a saved index to the weights that embedded it."""
        return float(sum(parameter.double().sum().item() for parameter in self.model.parameters()))

    def arrays(self):
        return {"fingerprint": np.array(self.fingerprint())}


class Retriever:
    def __init__(self, chunks, embedder, vectors=None):
        self.chunks, self.embedder = list(chunks), embedder
        self.vectors = embedder.embed(self.chunks) if vectors is None else vectors

    @classmethod
    def build(cls, documents, embedder, max_words=CHUNK_WORDS):
        chunks = split_chunks(documents, max_words)
        return cls(chunks, embedder.fit(chunks))

    def search(self, question, k=3):
        """[(cosine similarity, chunk)], most similar first."""
        if not self.chunks:
            return []
        similarities = self.vectors @ self.embedder.embed([question])[0]
        best = np.argsort(-similarities, kind="stable")[:k]
        return [(float(similarities[i]), self.chunks[i]) for i in best]

    def save(self, path):
        arrays = {"method": np.array(self.embedder.name), "chunks": np.array(self.chunks, dtype=str),
                  "vectors": self.vectors, **self.embedder.arrays()}
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, **arrays)

    @classmethod
    def load(cls, path, model=None, tokenizer=None):
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise UsageError(f"{path}: not a retrieval index ({error}); delete it to rebuild") from None
        if "method" not in arrays or "chunks" not in arrays or "vectors" not in arrays:
            raise UsageError(f"{path}: not a retrieval index written by sample.py; delete it to rebuild")
        method = str(arrays["method"])
        if method == "tfidf":
            embedder = TfidfEmbedder.from_arrays(arrays)
        else:
            embedder = ModelEmbedder(model, tokenizer)
            if model is None or not math.isclose(float(arrays["fingerprint"]), embedder.fingerprint(), rel_tol=1e-6):
                raise UsageError(f"{path} was embedded by a different model; delete it to rebuild")
        return cls([str(chunk) for chunk in arrays["chunks"]], embedder, arrays["vectors"])


def make_retriever(config, model, tokenizer, checkpoint, embedding=None):
    """The retriever --retrieval / --docs ask for (None when neither is given)."""
    if not (config.retrieval or config.docs):
        return None
    embedding = embedding or config.embedding
    documents = read_documents(config.docs) if config.docs else tiny_world().retrieval_documents()
    if config.index and os.path.isfile(config.index):
        retriever = Retriever.load(config.index, model, tokenizer)
        # an index spares embedding the passages again, not reading them: check that it holds these ones
        if retriever.embedder.name != embedding or retriever.chunks != split_chunks(documents):
            raise UsageError(f"--index {config.index} holds other passages or another --embedding than this "
                             f"command's; delete it to rebuild, or give another --index")
        return retriever
    embedder = TfidfEmbedder() if embedding == "tfidf" else ModelEmbedder(model, tokenizer)
    retriever = Retriever.build(documents, embedder)
    if config.index:
        retriever.save(config.index)
    return retriever


# -----------------------------------------------------------------------------------------------
# The report card: every stage on every family of held-out prompts, then each technique with/without

def report_tasks(world, limit=0):
    """The held-out evaluation prompts, at most `limit` per family (0 = all), in the world's order."""
    from data.tinyworld import FAMILIES
    tasks = world.tasks("eval")
    if limit:
        tasks = [task for family in FAMILIES for task in [t for t in tasks if t.family == family][:limit]]
    return tasks


def stage_answers(model, tokenizer, stage, world, questions, sampling):
    """Plain answers: a chat stage answers in the chat format, the base model a few-shot page."""
    if stage == "pretrain":
        return fewshot_answers(model, tokenizer, world, questions, sampling)
    return chat_responses(model, tokenizer, questions, temperature=sampling.temperature,
                          max_new_tokens=sampling.max_new_tokens, seed=sampling.seed)


def evaluate_stage(model, tokenizer, stage, world, tasks, config):
    """Oracle accuracy and score per family, greedy and at temperature 1 (one sample, fixed seed).
    -> (flat metrics "greedy/accuracy/facts", ..., the greedy responses)."""
    metrics, greedy_responses = {}, None
    for name, temperature in (("greedy", 0.0), ("temp1", 1.0)):
        sampling = Sampling(max_new_tokens=config.max_new_tokens, temperature=temperature, seed=config.seed)
        graded, responses = world.evaluate(
            lambda questions: stage_answers(model, tokenizer, stage, world, questions, sampling), tasks)
        metrics.update({f"{name}/{key}": value for key, value in graded.items()})
        greedy_responses = greedy_responses or responses
    return metrics, greedy_responses


def family(tasks, name):
    return [task for task in tasks if task.family == name]


def measure_techniques(model, tokenizer, world, tasks, plain, config):
    """Each technique on its own family of held-out prompts, with and without, greedy. `plain` holds the
    stage's plain greedy results: the "without" of CoT, the calculator and retrieval."""
    metrics = {}
    for name, measure in (("cot", measure_cot), ("calculator", measure_calculator),
                          ("retrieval", measure_retrieval), ("json", measure_json)):
        subset = family(tasks, name)
        if subset:
            started = time.time()
            metrics.update({f"{name}/{key}": value
                            for key, value in measure(model, tokenizer, world, subset, plain, config).items()})
            metrics[f"{name}/seconds"] = round(time.time() - started, 1)
    return metrics


def greedy_sampling(config, **changes):
    return Sampling(**{**Sampling(max_new_tokens=config.max_new_tokens, temperature=0.0, seed=config.seed,
                                  tool=False).__dict__, **changes})


def accuracy(world, tasks, respond):
    graded, _ = world.evaluate(respond, tasks)
    return graded[f"accuracy/{tasks[0].family}"]


def measure_cot(model, tokenizer, world, tasks, plain, config):
    """The same bare additions, with COT_PREFIX in front. A worked answer is long: as long as fits."""
    from data.tinyworld import COT_PREFIX
    sampling = greedy_sampling(config, max_new_tokens=model.config.block_size)
    return {"without": plain["greedy/accuracy/cot"],
            "with": accuracy(world, tasks, lambda questions: chat_answers(
                model, tokenizer, [COT_PREFIX + question for question in questions], sampling))}


def measure_calculator(model, tokenizer, world, tasks, plain, config):
    """The same products, with the tool run vs the model writing its own "result" (the plain answers).
    Also: how often the model's call computes the right product (so a miss can be told apart: a wrong
    call, or a right result the answer then fails to copy)."""
    stats = {}
    graded, answers = world.evaluate(lambda questions: chat_answers(
        model, tokenizer, questions, greedy_sampling(config, tool=True), stats=stats), tasks)
    calls = [re.search(r"<\|calc\|>(.*?)<\|result\|>", answer, re.DOTALL) for answer in answers]
    right_calls = sum(call is not None and calculator_result(call.group(1)) == task.key
                      for call, task in zip(calls, tasks))
    return {"without": plain["greedy/accuracy/calculator"], "with": graded["accuracy/calculator"],
            "tool_calls_per_answer": stats.get("tool_calls", 0) / len(tasks), "right_calls": right_calls / len(tasks)}


def measure_retrieval(model, tokenizer, world, tasks, plain, config):
    """Questions about countries that exist only in the retrieval documents, answered with the k passages
    each embedding finds; recall@k = the share of questions whose passages include one that states the
    answer (names the country and the fact)."""
    from data.tinyworld import context_prompt
    metrics = {"without": plain["greedy/accuracy/retrieval"]}
    k = config.retrieve_k
    for embedding, embedder in (("tfidf", TfidfEmbedder()), ("model", ModelEmbedder(model, tokenizer))):
        retriever = Retriever.build(world.retrieval_documents(), embedder)
        ranked = {task.prompt: [chunk for _, chunk in retriever.search(task.prompt, max(k, 3))] for task in tasks}
        for depth in sorted({k, 3}):   # recall@3 too, whatever k is: the retriever's quality on its own
            metrics[f"{embedding}/recall@{depth}"] = sum(
                any(task.entity.lower() in chunk.lower() and task.key.lower() in chunk.lower()
                    for chunk in ranked[task.prompt][:depth])
                for task in tasks) / len(tasks)
        found = {prompt: chunks[:k] for prompt, chunks in ranked.items()}
        metrics[f"{embedding}/with"] = accuracy(world, tasks, lambda questions: chat_answers(
            model, tokenizer, [context_prompt(found[question], question) for question in questions],
            greedy_sampling(config)))
    return metrics


def measure_json(model, tokenizer, world, tasks, plain, config):
    """The share of answers that parse, and whose fields are exactly the ideal record's, with and without
    the mask (which requires the record's fields), greedy and at temperature 1; and the time per token."""
    metrics = {}
    questions = [task.prompt for task in tasks]
    required = [list(json.loads(task.answer)) for task in tasks]
    groups = {}   # countries and animals have different fields: one batch each
    for index, fields in enumerate(required):
        groups.setdefault(tuple(fields), []).append(index)
    for name, temperature in (("greedy", 0.0), ("temp1", 1.0)):
        for constrained in (False, True):
            label = f"{name}/{'with' if constrained else 'without'}"
            stats, started, answers = {}, time.perf_counter(), [None] * len(questions)
            try:
                for fields, indices in groups.items():
                    sampling = greedy_sampling(config, temperature=temperature, max_new_tokens=model.config.block_size,
                                               json_fields=list(fields) if constrained else None)
                    for index, answer in zip(indices, chat_answers(model, tokenizer, [questions[i] for i in indices],
                                                                   sampling, stats=stats)):
                        answers[index] = answer
            except UsageError as error:   # a context too small for a whole record
                print(f"constrained JSON not measured: {error}", file=sys.stderr)
                continue
            seconds = time.perf_counter() - started
            values = [parsed_json(answer) for answer in answers]
            metrics[f"{label}/parse_rate"] = sum(value is not None for value in values) / len(values)
            metrics[f"{label}/fields_match"] = sum(isinstance(value, dict) and set(value) == set(fields)
                                                   for value, fields in zip(values, required)) / len(values)
            metrics[f"{label}/accuracy"] = sum(map(world.is_correct, questions, answers)) / len(answers)
            metrics[f"{label}/ms_per_token"] = 1000 * seconds / max(stats["tokens"], 1)
            if constrained:
                metrics[f"{label}/mask_ms_per_token"] = 1000 * stats.get("mask_seconds", 0.0) / max(stats["tokens"], 1)
    return metrics


REPORT_BEST_OF = 8   # samples per prompt in the report's best-of-N measurement


def measure_best_of(model, tokenizer, world, tasks, reward_model, config, n=REPORT_BEST_OF):
    """The talk's "ensemble multiple attempts": n answers to each prompt at temperature 1, and the one the
    reward model scores highest. Accuracy of one sample (the mean over all n), of the reward model's
    pick, and of the oracle's own pick (the most any judge could get out of these n samples).
    A reward model that can be fooled shows here: its pick can be worse than one sample."""
    from reward import reward_scores
    questions = [task.prompt for task in tasks for _ in range(n)]
    answers = chat_responses(model, tokenizer, questions, temperature=1.0, max_new_tokens=config.max_new_tokens,
                             seed=config.seed)
    rewards = reward_scores(reward_model, tokenizer, questions, answers).view(len(tasks), n).cpu()
    right = torch.tensor([world.is_correct(q, a) for q, a in zip(questions, answers)], dtype=torch.float)
    return {**best_of_accuracies(right.view(len(tasks), n), rewards), "n": n}


def measure_best_of_families(model, tokenizer, stage, world, tasks, config, device):
    """measure_best_of on the fact and JSON questions, when there is a reward model to pick with."""
    reward_path = config.reward_ckpt or stage_path(config.out_dir, "reward")
    if not os.path.isfile(reward_path):
        return {}
    reward_model, reward_tokenizer, _ = load_model(reward_path, stages="reward", device=device)
    check_same_tokenizer(stage_path(config.out_dir, stage), tokenizer, reward_path, reward_tokenizer)
    return {f"{name}/{key}": value for name in ("facts", "json") if family(tasks, name)
            for key, value in measure_best_of(model, tokenizer, world, family(tasks, name), reward_model,
                                              config).items()}


def best_of_accuracies(right, rewards):
    """right, rewards: [prompts, n] (1.0 = the oracle says right). -> the accuracy of one sample (the
    mean over all), of the highest-reward sample of each prompt, and of the best one (any right)."""
    picked = right[torch.arange(right.size(0)), rewards.argmax(dim=1)]
    return {"one_sample": right.mean().item(), "reward_pick": picked.mean().item(),
            "oracle_pick": right.max(dim=1).values.mean().item()}


def parsed_json(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def stage_summaries(out_dir):
    """Figures each stage wrote to <out_dir>/<stage>.json: time taken, and the headline of each."""
    headline = {"pretrain": ["val_bpb", "facts_accuracy", "sums_accuracy"],
                "sft": ["val/loss"], "reward": ["heldout/pairwise_accuracy", "heldout/spearman"],
                "rlhf": ["sft/kl", "rlhf/kl", "sft/distinct", "rlhf/distinct", "sft/distinct_2", "rlhf/distinct_2",
                         "sft/reward", "rlhf/reward"]}
    summaries = {}
    for stage in ("pretrain", "sft", "reward", "rlhf"):
        path = os.path.join(out_dir, f"{stage}.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as file:
                figures = json.load(file)
        except (OSError, ValueError):
            continue
        if not isinstance(figures, dict):
            continue
        summaries[stage] = {key: figures[key] for key in ["seconds"] + headline[stage]
                            if isinstance(figures.get(key), (int, float))}
    return summaries


def report(config, device):
    from data.tinyworld import FAMILIES
    stages = stages_present(config.out_dir)
    if not stages:
        raise UsageError(f"no checkpoint in {config.out_dir}/: run `python pretrain.py` first (then sft.py, "
                         "reward.py, rlhf.py)")
    started = time.time()
    world = tiny_world()
    tasks = report_tasks(world, config.report_limit)
    families = [name for name in FAMILIES if family(tasks, name)]
    metrics = {}
    for stage in stages:
        stage_started = time.time()
        model, tokenizer, _ = load_model(stage_path(config.out_dir, stage), device=device)
        figures, _ = evaluate_stage(model, tokenizer, stage, world, tasks, config)
        figures["plain_seconds"] = round(time.time() - stage_started, 1)
        metrics.update({f"{stage}/{key}": value for key, value in figures.items()})
        if stage in CHAT_STAGES and stage == [s for s in stages if s in CHAT_STAGES][-1]:
            techniques = measure_techniques(model, tokenizer, world, tasks, figures, config)
            metrics.update({f"techniques/{key}": value for key, value in techniques.items()})
            metrics["techniques/stage"] = stage
            metrics.update({f"techniques/best_of/{key}": value for key, value in
                            measure_best_of_families(model, tokenizer, stage, world, tasks, config, device).items()})
        metrics[f"{stage}/report_seconds"] = round(time.time() - stage_started, 1)
        print(f"evaluated {stage} in {time.time() - stage_started:.0f}s", file=sys.stderr)
    summaries = stage_summaries(config.out_dir)
    for stage, figures in summaries.items():
        metrics.update({f"pipeline/{stage}/{key}": value for key, value in figures.items()})
    metrics["seconds"] = round(time.time() - started, 1)
    text = report_markdown(config, stages, families, tasks, metrics, summaries)
    with atomic_path(os.path.join(config.out_dir, "report.md")) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
    report_plot(os.path.join(config.out_dir, "report.png"), stages, families, metrics)
    write_json(os.path.join(config.out_dir, "report.json"), metrics)
    print(text)
    print(f"wrote {config.out_dir}/report.md, report.png and report.json in {metrics['seconds']:.0f}s")
    return metrics


def percent(value):
    return "–" if value is None else f"{100 * value:.0f}%"


def report_markdown(config, stages, families, tasks, metrics, summaries):
    lines = [f"# Report card ({time.strftime('%Y-%m-%d')})", "",
             f"`python sample.py --report --out_dir {config.out_dir}`" +
             (f" `--report_limit {config.report_limit}`" if config.report_limit else ""), "",
             "Held-out prompts of the tiny world, graded by its oracle. Accuracy = the key fact or number is "
             "right; score = the labeler's grade in [0, 1]. Plain answers: no tool run, no retrieval, no chain-of-"
             "thought prefix, no JSON mask (the techniques table shows each with and without). The base model "
             "answers a few-shot Q&A page.", "",
             "| stage | family | prompts | accuracy (greedy) | score (greedy) | accuracy (T=1) | score (T=1) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for stage in stages:
        for name in families:
            get = lambda key: metrics.get(f"{stage}/{key}/{name}")
            lines.append(f"| {stage} | {name} | {len(family(tasks, name))} | {percent(get('greedy/accuracy'))} | "
                         f"{get('greedy/score'):.2f} | {percent(get('temp1/accuracy'))} | {get('temp1/score'):.2f} |")
    technique = {key[len("techniques/"):]: value for key, value in metrics.items() if key.startswith("techniques/")}
    if technique:
        k = config.retrieve_k
        lines += ["", f"## Techniques (the {technique['stage']} model, greedy)", "",
                  "| technique | prompts | without | with | also |", "| --- | ---: | ---: | ---: | --- |"]
        if "cot/with" in technique:
            lines.append(f"| chain of thought (`--cot`), multi-digit additions | {len(family(tasks, 'cot'))} | "
                         f"{percent(technique['cot/without'])} | {percent(technique['cot/with'])} | |")
        if "calculator/with" in technique:
            lines.append(f"| calculator tool, 3-digit products | {len(family(tasks, 'calculator'))} | "
                         f"{percent(technique['calculator/without'])} | {percent(technique['calculator/with'])} | "
                         f"{technique['calculator/tool_calls_per_answer']:.2f} tool calls per answer; "
                         f"{percent(technique['calculator/right_calls'])} of answers call it with the right product |")
        for embedding in ("tfidf", "model"):
            if f"retrieval/{embedding}/with" in technique:
                lines.append(f"| retrieval (`--embedding {embedding}`), retrieval-only countries | "
                             f"{len(family(tasks, 'retrieval'))} | {percent(technique['retrieval/without'])} | "
                             f"{percent(technique[f'retrieval/{embedding}/with'])} | {k} passages; "
                             + "; ".join(f"{key.rsplit('/', 1)[1]} {percent(value)}" for key, value in technique.items()
                                         if key.startswith(f"retrieval/{embedding}/recall@")) + " |")
        for name, label in (("greedy", "greedy"), ("temp1", "T=1")):
            key = f"json/{name}"
            if f"{key}/with/parse_rate" in technique:
                lines.append(
                    f"| constrained JSON (`--json --schema ...`), {label}: parses | {len(family(tasks, 'json'))} | "
                    f"{percent(technique[f'{key}/without/parse_rate'])} | {percent(technique[f'{key}/with/parse_rate'])} | "
                    f"fields match {percent(technique[f'{key}/without/fields_match'])} → "
                    f"{percent(technique[f'{key}/with/fields_match'])}; accuracy "
                    f"{percent(technique[f'{key}/without/accuracy'])} → {percent(technique[f'{key}/with/accuracy'])}; "
                    f"the mask costs {technique[f'{key}/with/mask_ms_per_token']:.2f} ms/token (generating "
                    f"without it: {technique[f'{key}/without/ms_per_token']:.2f} ms/token) |")
        for name in ("facts", "json"):
            key = f"best_of/{name}"
            if f"{key}/reward_pick" in technique:
                lines.append(f"| best-of-{technique[f'{key}/n']} (`--best_of`), the reward model picks; {name}, T=1 | "
                             f"{len(family(tasks, name))} | {percent(technique[f'{key}/one_sample'])} | "
                             f"{percent(technique[f'{key}/reward_pick'])} | without = one sample; the oracle's own "
                             f"pick of the {technique[f'{key}/n']}: {percent(technique[f'{key}/oracle_pick'])} |")
    if summaries:
        lines += ["", "## The stages (from each stage's <stage>.json)", "", "| stage | seconds | figures |",
                  "| --- | ---: | --- |"]
        for stage, figures in summaries.items():
            shown = ", ".join(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                              for key, value in figures.items() if key != "seconds")
            seconds = figures.get("seconds")
            lines.append(f"| {stage} | {'–' if seconds is None else f'{seconds:.0f}'} | {shown} |")
    lines += ["", f"Report computed in {metrics['seconds']:.0f}s (wall clock; a busy machine is slower).", ""]
    return "\n".join(lines)


def report_plot(path, stages, families, metrics):
    """Grouped bars: per family, one bar per stage (greedy accuracy); then the techniques with/without."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = [(label, metrics.get(f"techniques/{without}"), metrics.get(f"techniques/{with_}"))
             for label, without, with_ in (("CoT", "cot/without", "cot/with"),
                                           ("calculator", "calculator/without", "calculator/with"),
                                           ("retrieval", "retrieval/without", "retrieval/tfidf/with"),
                                           ("JSON\nparses\n(T=1)", "json/temp1/without/parse_rate",
                                            "json/temp1/with/parse_rate"),
                                           ("best-of-N\nfacts\n(T=1)", "best_of/facts/one_sample",
                                            "best_of/facts/reward_pick"))
             if metrics.get(f"techniques/{with_}") is not None]
    # the techniques' panel gets room for five labels of up to three short lines each
    figure, axes = plt.subplots(1, 2 if pairs else 1, figsize=(14 if pairs else 8, 4.2),
                                gridspec_kw={"width_ratios": [2, 1.3]} if pairs else None, squeeze=False)
    axis = axes[0][0]
    width = 0.8 / len(stages)
    for k, stage in enumerate(stages):
        values = [metrics.get(f"{stage}/greedy/accuracy/{name}", 0.0) for name in families]
        axis.bar(np.arange(len(families)) + (k - (len(stages) - 1) / 2) * width, values, width, label=stage)
    axis.set_xticks(np.arange(len(families)), families)
    axis.set_ylim(0, 1)
    axis.set_ylabel("held-out accuracy (greedy)")
    axis.set_title("what each stage did")
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    if pairs:
        axis = axes[0][1]
        x = np.arange(len(pairs))
        axis.bar(x - 0.2, [p[1] or 0.0 for p in pairs], 0.4, label="without", color="lightgray")
        axis.bar(x + 0.2, [p[2] or 0.0 for p in pairs], 0.4, label="with", color="tab:green")
        axis.set_xticks(x, [p[0] for p in pairs])
        axis.set_ylim(0, 1)
        axis.set_title(f"techniques ({metrics.get('techniques/stage')})")
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)   # below: bars reach 1 anywhere
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


# -----------------------------------------------------------------------------------------------

def main(config: Config) -> dict:
    check_config(config)
    device = choose_device(config.device)
    torch.manual_seed(config.seed)
    if config.report:
        return report(config, device)
    if config.compare:
        retriever_for = lambda model, tokenizer, checkpoint: make_retriever(config, model, tokenizer, checkpoint)
        return {"answers": compare(config, device, retriever_for)}
    path = default_checkpoint(config)
    model, tokenizer, checkpoint = load_model(path, stages=GENERATING_STAGES, device=device)
    asked = [f"--{name}" for name in ("json", "cot", "retrieval", "docs") if getattr(config, name)]
    if checkpoint["stage"] == "pretrain" and asked:
        raise UsageError(f"{' and '.join(asked)} {'shapes' if len(asked) == 1 else 'shape'} an assistant's answer, "
                         f"and {path} is a base model, which "
                         f"completes documents: give an sft or rlhf checkpoint with --ckpt")
    retriever = make_retriever(config, model, tokenizer, checkpoint)
    if config.best_of:
        best, answers, rewards = best_of_n(config, model, tokenizer, checkpoint, path, device, retriever)
        return {"best": best, "answers": answers, "rewards": rewards}
    if config.prompt is not None:
        return {"answers": one_shot(config, model, tokenizer, checkpoint, retriever)}
    chat(config, model, tokenizer, checkpoint, path, retriever)
    return {}


if __name__ == "__main__":
    run_cli(main, Config, __doc__)
