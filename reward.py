"""
Reward modelling: stage 3 of the talk. "We're now going to shift our data collection to be of the
form of comparisons": for one prompt the SFT model writes several completions, a labeler ranks them,
and a transformer learns to predict a score that agrees with the ranking. Each completion is laid out
after its prompt, "a special reward readout token" is appended, and the transformer is supervised
only at that one token: the scalar it predicts there is the reward.

    python reward.py                                   # sample, rank, train -> out/reward.pt
    python reward.py --score "What is 2 + 3?" "2 + 3 = 5."   # the reward of one response

Here the labeler is the tiny world's oracle (World.score). The script reads out/sft.pt, samples K
completions for every prompt of the world's reward and SFT splits (to train on) and of its eval split
(held out, to measure on), ranks them with the oracle (equal scores are ties, and a tie gives no pair),
writes what the "labelers" saw to out/comparisons.jsonl, then trains the reward model: the SFT
transformer with a new scalar head (only the head and the top block train: --train_layers), loss
-log sigmoid(r_better - r_worse) over every ordered pair of a prompt's ranking. The reward is the head's
number plus the transformer's own mean log-probability of the response (--logprob_weight; rewards_of says why: a head alone learns little from this much data).
`--data FILE.jsonl` trains on given preferences instead: {"prompt", "chosen", "rejected"} lines or
{"prompt", "completions", "ranking"}.

Reads top to bottom: config, comparisons (sample and rank, or read), the reward model, the loss, the
training loop, evaluation, save.
"""

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from bpe import MESSAGE_PREFIX
from model import (GPT, GPTConfig, Progress, StopRequest, UsageError, atomic_path, autocast, by_length, check_options,
                   check_out_dir, choose_device, full_precision, load_checkpoint, load_model, read_jsonl,
                   render_chat, run_cli, save_checkpoint, set_seed, write_json)
from sample import Sampling, chat_answers, tasks_as_asked

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    out_dir: str = field(default="out", metadata={"help": "where comparisons.jsonl, reward.pt/.json/.png go"})
    init_from: str = field(default="", metadata={"help": "the SFT checkpoint to start from "
                                                         "(default: <out_dir>/sft.pt)"})
    data: str = field(default="", metadata={"help": "preference JSONL to train on instead of sampling "
                                                    "(prompt/chosen/rejected or prompt/completions/ranking lines)"})
    score: list[str] = field(default_factory=list, metadata={"help": "PROMPT RESPONSE: print the reward "
                                                                     "<out_dir>/reward.pt gives this response, then exit"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "seed of the sampling, the held-out split and training"})
    # the comparisons
    samples_per_prompt: int = field(default=4, metadata={"help": "K: completions sampled per prompt "
                                                                 "(InstructGPT used 4 to 9)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature: high enough that the K "
                                                              "completions differ in quality"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest sampled completion, in tokens, as far "
                                                               "as the context allows (a worked 4-digit sum takes "
                                                               "up to 186; rlhf.py samples as long)"})
    max_prompts: int = field(default=0, metadata={"help": "use only the first N prompts of each split (0: all of them)"})
    sft_prompts: bool = field(default=True, metadata={"help": "also rank samples for the SFT split's prompts "
                                                              "(4x the comparisons; trained on, never held out)"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "with --data: share of prompts kept out of "
                                                                   "training to evaluate on (the world's held-out "
                                                                   "prompts are its eval split)"})
    # training
    max_iters: int = field(default=80, metadata={"help": "training steps (80 x 16 prompts: one to four passes over "
                                                         "the 340-1,150 training prompts that have pairs; more only "
                                                         "overfits them)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step; all K completions of a "
                                                                "prompt go in together"})
    # Low: the reward starts as the SFT model's own log-probability, already right on 73-92% of held-out
    # pairs (README), and what ~900 prompts of comparisons can add is small; at 1e-4 the top block drifted from that
    # judgement (0.8 points lower on average over six SFT models' held-out pairs: README).
    learning_rate: float = field(default=3e-5, metadata={"help": "peak learning rate (warmup, then cosine "
                                                                 "decay to a tenth)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on the matrices"})
    logprob_weight: float = field(default=1.0, metadata={"help": "the reward adds this times the model's own mean "
                                                                 "log-probability per token of the response to the "
                                                                 "head's scalar (0: the head alone, as in InstructGPT)"})
    train_layers: int = field(default=1, metadata={"help": "train the head and the top N transformer blocks; the "
                                                           "blocks below, the final LayerNorm and the embeddings "
                                                           "(also the LM head the log-probability comes from) keep "
                                                           "the SFT weights (-1: train everything)"})
    center_penalty: float = field(default=0.01, metadata={"help": "weight of (mean reward)^2 in the loss: "
                                                                  "keeps rewards centred on 0"})
    eval_interval: int = field(default=20, metadata={"help": "evaluate on the held-out prompts every N steps "
                                                             "(and after the last)"})
    examples: int = field(default=3, metadata={"help": "held-out prompts to print with their completions "
                                                       "ranked by reward"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from <out_dir>/reward.pt"})


# -----------------------------------------------------------------------------------------------
# Comparisons: one prompt, K completions, and the labeler's ranking of them.

@dataclass
class Comparison:
    """What one labeler saw and said. `ranking` lists completion indices, best first. `scores`, when
    known (the oracle's, or given in the file), define ties: completions with equal scores are tied,
    and a tie gives no training pair. Without scores every step of the ranking is a strict preference."""
    prompt: str
    completions: list[str]
    ranking: list[int]
    scores: list[float] | None = None
    reasons: list[str] | None = None

    def levels(self):
        """levels()[i] = how many distinct grades are better than completion i (0 = among the best)."""
        if self.scores is None:
            return [self.ranking.index(i) for i in range(len(self.completions))]
        distinct = sorted(set(self.scores), reverse=True)
        return [distinct.index(score) for score in self.scores]

    def pairs(self):
        """Every ordered (better, worse) pair of completion indices; tied completions make no pair."""
        levels = self.levels()
        return [(i, j) for i in range(len(levels)) for j in range(len(levels)) if levels[i] < levels[j]]

    def to_record(self):
        record = {"prompt": self.prompt, "completions": self.completions, "ranking": self.ranking}
        if self.scores is not None:
            record["scores"] = self.scores
        if self.reasons is not None:
            record["reasons"] = self.reasons
        return record


def rank_by_scores(prompt, completions, scores, reasons=None):
    """Best first; equal scores keep their sampling order in the ranking (and stay tied via scores)."""
    ranking = sorted(range(len(completions)), key=lambda i: -scores[i])
    return Comparison(prompt, list(completions), ranking, [float(s) for s in scores], reasons)


def sample_comparisons(model, tokenizer, world, prompts, samples_per_prompt, temperature,
                       max_new_tokens, seed):
    """The SFT model answers every prompt K times; the oracle scores each answer and so ranks them.
    All prompts x K go through the model in large batches (with the KV cache; on a CPU, batches side by
    side, model.map_batches). The calculator runs, as it does when the assistant is used: the labelers
    judge an answer with the tool's result in it."""
    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, tool=True)
    responses = chat_answers(model, tokenizer, repeated, sampling)
    comparisons = []
    for index, prompt in enumerate(prompts):
        completions = responses[index * samples_per_prompt:(index + 1) * samples_per_prompt]
        graded = [world.score(prompt, completion) for completion in completions]
        comparisons.append(rank_by_scores(prompt, completions, [s for s, _ in graded], [r for _, r in graded]))
    return comparisons


def write_comparisons(path, comparisons):
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            for comparison in comparisons:
                file.write(json.dumps(comparison.to_record(), ensure_ascii=False) + "\n")


def read_preferences(path):
    """Preference JSONL -> [Comparison]. Two shapes per line (TRL's conventions):
    {"prompt", "chosen", "rejected"} (a pair) or {"prompt", "completions", "ranking"[, "scores"]}.
    Bad lines raise UsageError("FILE:LINE: reason"); pairs whose two texts are identical are
    skipped, and counted. Returns (comparisons, number skipped)."""
    comparisons, skipped = [], 0
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UsageError(f"{where}: \"prompt\" must be a non-empty string")
        if "chosen" in record or "rejected" in record:
            chosen, rejected = record.get("chosen"), record.get("rejected")
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise UsageError(f"{where}: \"chosen\" and \"rejected\" must both be strings")
            # TRL's plain-text pairs are meant to be joined to the prompt (" blue."), but render_chat
            # puts a space before every message itself: the texts' own first space goes
            chosen, rejected = chosen.removeprefix(MESSAGE_PREFIX), rejected.removeprefix(MESSAGE_PREFIX)
            if chosen == rejected:
                skipped += 1
                continue
            comparisons.append(Comparison(prompt, [chosen, rejected], [0, 1]))
        elif "completions" in record:
            comparisons.append(_ranking_record(where, prompt, record))
        else:
            raise UsageError(f"{where}: expected \"chosen\" and \"rejected\", or \"completions\" and \"ranking\"")
    if not comparisons:
        raise UsageError(f"{path}: no usable preferences ({skipped} pairs had identical texts)")
    return comparisons, skipped


def _ranking_record(where, prompt, record):
    completions, ranking, scores = record.get("completions"), record.get("ranking"), record.get("scores")
    if not isinstance(completions, list) or len(completions) < 2 or not all(isinstance(c, str) for c in completions):
        raise UsageError(f"{where}: \"completions\" must be a list of at least two strings")
    if not isinstance(ranking, list) or sorted(ranking) != list(range(len(completions))) \
            or not all(type(i) is int for i in ranking):
        raise UsageError(f"{where}: \"ranking\" must list each completion index 0..{len(completions) - 1} once, best first")
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != len(completions) \
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise UsageError(f"{where}: \"scores\" must be one finite number per completion")
        ranked = [scores[i] for i in ranking]
        if any(a < b for a, b in zip(ranked, ranked[1:])):
            raise UsageError(f"{where}: \"ranking\" disagrees with \"scores\" (a lower score is ranked above a higher one)")
        scores = [float(s) for s in scores]
    reasons = record.get("reasons")
    reasons = reasons if isinstance(reasons, list) and len(reasons) == len(completions) else None
    return Comparison(prompt, completions, ranking, scores, reasons)


def split_by_prompt(comparisons, heldout_prompts):
    """The tiny world holds out a whole split of prompts: its eval split, which no stage trains on
    (rlhf.py grades the policy on the same prompts)."""
    train = [c for c in comparisons if c.prompt not in heldout_prompts]
    evaluate = [c for c in comparisons if c.prompt in heldout_prompts]
    return train, evaluate


def split_heldout(comparisons, fraction, seed):
    """Hold out whole prompts (not pairs, nor lines: a preference file often has several pairs of one
    prompt), so evaluation is on prompts the reward model never saw."""
    prompts = sorted({c.prompt for c in comparisons})
    random.Random(seed).shuffle(prompts)
    count = int(round(len(prompts) * fraction)) if len(prompts) > 1 else 0
    return split_by_prompt(comparisons, frozenset(prompts[:count]))


# -----------------------------------------------------------------------------------------------
# The reward model: the GPT with a scalar head, read at the <|reward|> token.

def reward_input_ids(tokenizer, prompt, response, block_size):
    """render_chat([user, assistant]) + [<|reward|>] -> (ids, mask); mask marks the response's tokens
    (the ones SFT trains on), which the log-probability part of the reward averages over. Too long
    for the context: keep the last block_size tokens, so the reward token (and the end of the
    response) always stay in view."""
    ids, mask = render_chat(tokenizer, [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": response}])
    ids, mask = ids + [tokenizer.special_tokens["<|reward|>"]], mask + [0]
    return ids[-block_size:], mask[-block_size:]


def pad_batch(sequences, device):
    """Right-pad to one length. Attention is causal, so padding after a sequence's reward token
    cannot change anything at or before it; `positions` says where each reward token is."""
    length = max(len(ids) for ids in sequences)
    idx = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        idx[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    positions = torch.tensor([len(ids) - 1 for ids in sequences], dtype=torch.long)
    return idx.to(device), positions.to(device)


def mean_response_logprob(model, hidden, idx, mask):
    """The model's own mean log-probability per token of each row's response: the position that
    predicts token t + 1 counts when mask[t + 1] is 1. hidden: the model's final hidden states."""
    logits = model.lm_head(hidden[:, :-1]).float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, idx[:, 1:, None])[..., 0]
    counted = mask[:, 1:].to(logprobs.dtype)
    return (logprobs * counted).sum(1) / counted.sum(1).clamp(min=1)


def rewards_of(model, idx, positions, mask):
    """The reward of each row of a right-padded batch: the scalar head read at the row's <|reward|>
    token, plus reward_logprob_weight x the transformer's mean log-probability of the response.

    Why the second part: a reward model starts from the SFT weights, and what those weights know
    about an answer shows up first as how likely they find it. A sampled wrong answer ("The capital
    of France is Warsaw.") is a token the model thought improbable, so its mean log-probability
    already orders most held-out pairs right before any training (76% on the twelfth default run,
    73-92% on later SFT models), while a freshly added head reads nothing at all: with a few thousand
    comparisons it learns to read little more than length and format (59% on the twelfth default run,
    against the log-probability's 76%). The sum starts
    from the model's own judgement and the pairwise loss trains both parts: the head, and the
    likelihood itself (this is SimPO's implicit reward, a length-normalised log-probability, added
    to the explicit head). reward_logprob_weight 0 is the plain head of InstructGPT."""
    head, logprob = reward_parts(model, idx, positions, mask)
    weight = model.config.reward_logprob_weight
    return head + weight * logprob if weight else head


def reward_parts(model, idx, positions, mask):
    """The two parts of rewards_of, from one forward pass: (the head's number at each row's <|reward|>
    token, the mean log-probability of each row's response; None when the reward does not use it)."""
    if model.scalar_head is None:
        raise UsageError("this model has no scalar head: load a reward checkpoint (reward.py writes one)")
    hidden = model.hidden_states(idx).float()
    rows = torch.arange(idx.size(0), device=idx.device)
    with full_precision(idx.device):   # the heads in fp32 even under autocast: small differences rank answers
        head = model.scalar_head(hidden[rows, positions]).squeeze(-1)
        logprob = mean_response_logprob(model, hidden, idx, mask) if model.config.reward_logprob_weight else None
    return head, logprob


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts, responses, batch_size=64):
    """The reward of each (prompt, response): a float tensor of shape [len(prompts)] on the model's
    device. Sequences are batched by length (less padding); each reward is read at that sequence's
    own <|reward|> token, so the result does not depend on what else is in the batch."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(reward_model.parameters()).device
    block_size = reward_model.config.block_size
    rows = [reward_input_ids(tokenizer, p, r, block_size) for p, r in zip(prompts, responses)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    rewards = torch.zeros(len(rows), device=device)
    was_training = reward_model.training
    reward_model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        idx, positions = pad_batch([rows[i][0] for i in chunk], device)
        mask, _ = pad_batch([rows[i][1] for i in chunk], device)
        with autocast(device):
            rewards[torch.tensor(chunk, device=device)] = rewards_of(reward_model, idx, positions, mask)
    reward_model.train(was_training)
    return rewards


def reward_model_from_sft(sft_model, logprob_weight=0.0):
    """The same transformer, initialised from the SFT weights, plus a new scalar head. The head
    starts at zero, so every reward starts as logprob_weight x the SFT model's mean log-probability
    of the response (and at exactly 0, a first loss of log 2, with logprob_weight 0)."""
    config = GPTConfig(**dict(dataclasses.asdict(sft_model.config), scalar_head=True,
                              reward_logprob_weight=logprob_weight))
    model = GPT(config)
    missing, unexpected = model.load_state_dict(sft_model.state_dict(), strict=False)
    new = [name for name in missing if "scalar_head" not in name]
    if new or unexpected:
        raise RuntimeError(f"SFT weights do not fit the reward model (missing {new}, unexpected {unexpected})")
    with torch.no_grad():
        for parameter in model.scalar_head.parameters():
            parameter.zero_()
    return model


def check_train_layers(train_layers, n_layer):
    if not -1 <= train_layers <= n_layer:
        raise UsageError(f"--train_layers {train_layers}: choose from 0 (the head alone) to {n_layer} (every "
                         f"block), or -1 to train all of it")


def freeze_lower_layers(model, train_layers):
    """Leave only the scalar head and the top train_layers blocks trainable: the final LayerNorm stays
    frozen too, so the log-probability part changes only through those blocks. -1 trains every weight.
    Why: ~1,000 prompts of comparisons are far too few to retrain a whole transformer, and most of
    what the reward needs (which facts are true, what the model expected at each token) is already in
    the SFT weights. Trained everywhere, the model fits its training pairs and loses some of that: on
    the held-out pairs of three SFT models it ended 1.2 and 3.6 points below the untrained
    log-probability it starts from on two of them (0.7 above on the third); with only the top block
    trained, 0.2 to 1.7 points above on all three (README, "Which layers to train"; the eval prompts
    asked bare, at --learning_rate 1e-4)."""
    check_train_layers(train_layers, model.config.n_layer)
    if train_layers == -1:
        return
    top = [f"transformer.h.{i}." for i in range(model.config.n_layer - train_layers, model.config.n_layer)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("scalar_head.") or name.startswith(tuple(top)))


# -----------------------------------------------------------------------------------------------
# The loss: all ordered pairs of each prompt's ranking, each prompt weighing the same.

def pairwise_loss(rewards, groups, levels):
    """rewards, groups, levels: one entry per completion in the batch (groups = which prompt it
    answers, levels = its grade within that prompt, 0 best). For every pair (i, j) of one prompt with
    level i < level j: -log sigmoid(r_i - r_j). A prompt's pairs are averaged first and the prompts
    then averaged, so a prompt with K = 9 weighs as much as one with K = 2. Tied completions (equal
    levels) make no pair. Returns (loss, pairwise accuracy, number of pairs)."""
    better = (groups[:, None] == groups[None, :]) & (levels[:, None] < levels[None, :])
    pairs_per_group = torch.zeros(int(groups.max()) + 1, device=rewards.device)
    pairs_per_group.index_add_(0, groups, better.sum(1).to(pairs_per_group.dtype))
    prompts_with_pairs = (pairs_per_group > 0).sum()
    weight = better / pairs_per_group.clamp(min=1)[groups][:, None]   # 1 / (pairs of that prompt)
    margin = rewards[:, None] - rewards[None, :]
    # logsigmoid, not log(sigmoid): stays finite when the margin is very negative
    loss = -(F.logsigmoid(margin) * weight).sum() / prompts_with_pairs.clamp(min=1)
    # a pair is right when the better completion gets the higher reward; equal rewards are a coin toss
    right = (margin > 0).float() + 0.5 * (margin == 0).float()
    return loss, (right * better).sum() / better.sum().clamp(min=1), int(better.sum())


def comparison_rows(comparisons, tokenizer, block_size):
    """Flatten some prompts' completions into rows: (token ids, response mask), and the group (which
    prompt) and level (grade within that prompt) of each row."""
    rows, groups, levels = [], [], []
    for group, comparison in enumerate(comparisons):
        for completion, level in zip(comparison.completions, comparison.levels()):
            rows.append(reward_input_ids(tokenizer, comparison.prompt, completion, block_size))
            groups.append(group)
            levels.append(level)
    return rows, groups, levels


def step_prompts(step, count, per_step, seed):
    """Which training prompts step `step` uses. The prompts are shuffled once per epoch (seeded by
    the epoch) and the epochs laid end to end, so any step's batch is known without replaying the
    steps before it: a resumed run sees exactly the batches the uninterrupted one would have."""
    first, last = step * per_step, (step + 1) * per_step
    orders = {}
    for epoch in range(first // count, (last - 1) // count + 1):
        orders[epoch] = list(range(count))
        random.Random(f"{seed}:{epoch}").shuffle(orders[epoch])
    return [orders[position // count][position % count] for position in range(first, last)]


def batch_loss(model, comparisons, tokenizer, config, device, rows_per_pass=16):
    """The loss of one step. All K completions of every prompt in the step are scored with the same
    weights and enter one loss (InstructGPT's all-pairs batching). They go through the model in
    passes of rows of similar length: a retrieval prompt of 200 tokens then pads only its own pass,
    not the whole step (this halves the work here). The loss does not care about row order, so the
    rows stay sorted."""
    rows, groups, levels = comparison_rows(comparisons, tokenizer, model.config.block_size)
    sequences = [ids for ids, _ in rows]
    passes = by_length(sequences, rows_per_pass)
    order = [i for chunk in passes for i in chunk]
    pieces = []
    for chunk in passes:
        idx, positions = pad_batch([sequences[i] for i in chunk], device)
        mask, _ = pad_batch([rows[i][1] for i in chunk], device)
        with autocast(device):
            pieces.append(rewards_of(model, idx, positions, mask))
    rewards = torch.cat(pieces)
    groups = torch.tensor([groups[i] for i in order], device=device)
    levels = torch.tensor([levels[i] for i in order], device=device)
    loss, accuracy, pairs = pairwise_loss(rewards, groups, levels)
    # the pairwise loss only sees differences, so all rewards could drift together; a small pull on
    # their mean keeps them centred on 0, which is what RL wants to see
    centred_loss = loss + config.center_penalty * rewards.mean() ** 2
    return centred_loss, loss, accuracy, sum(len(ids) for ids in sequences)


@torch.no_grad()
def centre_rewards(model, tokenizer, comparisons, sample=0, seed=0):
    """Shift the head's bias so the mean reward over the training completions is exactly 0 (with
    sample > 0, over that many of them drawn at random). The pairwise loss cannot see a constant added
    to every reward, so the reward's zero is arbitrary; RL wants it at "an average sample of the SFT
    model". Returns the offset removed."""
    pairs = [(c.prompt, text) for c in comparisons for text in c.completions]
    if 0 < sample < len(pairs):
        pairs = random.Random(seed).sample(pairs, sample)
    offset = reward_scores(model, tokenizer, [p for p, _ in pairs], [r for _, r in pairs]).mean().item()
    model.scalar_head.bias -= offset
    return offset


# -----------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, tokenizer, comparisons, batch_prompts=64):
    """Held-out pairwise accuracy and loss over all pairs with distinct grades, plus every sample's
    reward (for the correlation with the oracle and the examples)."""
    prompts = [c.prompt for c in comparisons for _ in c.completions]
    responses = [text for c in comparisons for text in c.completions]
    rewards = reward_scores(model, tokenizer, prompts, responses).float().cpu()
    groups = torch.tensor([g for g, c in enumerate(comparisons) for _ in c.completions])
    levels = torch.tensor([level for c in comparisons for level in c.levels()])
    loss, accuracy, pairs = pairwise_loss(rewards, groups, levels)
    return {"loss": loss.item(), "accuracy": accuracy.item(), "pairs": pairs, "rewards": rewards}


@torch.no_grad()
def sft_logprob_rewards(sft_model, tokenizer, comparisons, batch_size=64):
    """A reward with no training at all, to measure the trained one against: the SFT model's mean
    log-probability per token of each response (the tokens SFT trains on). A sampled wrong answer is
    usually a token the SFT model thought unlikely, so this already ranks many pairs right. It is the
    reward of the untrained reward model with logprob_weight 1 (its head starts at zero), which is
    where the default reward model starts; with --logprob_weight 0 the reward model has this knowledge
    inside it but must learn to read it out at the reward token."""
    prompts = [c.prompt for c in comparisons for _ in c.completions]
    responses = [text for c in comparisons for text in c.completions]
    untrained = reward_model_from_sft(sft_model, logprob_weight=1.0).to(next(sft_model.parameters()).device)
    return reward_scores(untrained, tokenizer, prompts, responses, batch_size).cpu()


def logprob_baseline(sft_model, tokenizer, comparisons):
    """Pairwise accuracy and Spearman correlation with the oracle of sft_logprob_rewards."""
    rewards = sft_logprob_rewards(sft_model, tokenizer, comparisons)
    groups = torch.tensor([g for g, c in enumerate(comparisons) for _ in c.completions])
    levels = torch.tensor([level for c in comparisons for level in c.levels()])
    _, accuracy, _ = pairwise_loss(rewards, groups, levels)
    return {"baseline/sft_logprob_pairwise_accuracy": accuracy.item(),
            "baseline/sft_logprob_spearman": spearman(rewards, [s for c in comparisons for s in c.scores])}


def clear_pair_accuracy(comparisons, rewards, gap=0.5):
    """Accuracy on the pairs whose oracle scores differ by at least `gap`: a right answer against
    a wrong one, rather than two kinds of wrong (partial credit). Returns (accuracy, pairs)."""
    right, count, offset = 0.0, 0, 0
    for comparison in comparisons:
        for better, worse in comparison.pairs():
            if comparison.scores[better] - comparison.scores[worse] >= gap:
                margin = rewards[offset + better] - rewards[offset + worse]
                right += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
                count += 1
        offset += len(comparison.completions)
    return (right / count if count else float("nan")), count


def spearman_within_prompts(comparisons, rewards):
    """The mean over prompts of Spearman(reward, oracle) among one prompt's completions (prompts
    whose completions all score the same are skipped). The pairwise loss fixes rewards only up to a
    constant per prompt, so this is what it trains; the pooled figure also needs rewards to be
    comparable across prompts."""
    values, offset = [], 0
    for comparison in comparisons:
        k = len(comparison.completions)
        chunk = rewards[offset:offset + k]
        offset += k
        if len(set(comparison.scores)) > 1:
            value = spearman(chunk, comparison.scores)
            values.append(0.0 if math.isnan(value) else value)   # all rewards equal: no order at all
    return sum(values) / len(values) if values else float("nan")


def spearman(xs, ys):
    """Spearman rank correlation: Pearson correlation of the ranks (ties get their average rank)."""
    def ranks(values):
        values = torch.as_tensor(values, dtype=torch.float64)
        order = torch.argsort(values)
        ranked = torch.empty_like(values)
        ranked[order] = torch.arange(len(values), dtype=torch.float64)
        for value in torch.unique(values):               # ties share the mean of their ranks
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked
    rx, ry = ranks(xs), ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return (rx @ ry).item() / denominator if denominator > 0 else float("nan")


def show_examples(comparisons, rewards, count):
    """A few held-out prompts, completions sorted by the reward model, with the oracle's view."""
    lines, shown, offset = [], 0, 0
    for comparison in comparisons:
        k = len(comparison.completions)
        chunk = rewards[offset:offset + k].tolist()
        offset += k
        if shown >= count or not comparison.pairs():   # an all-tied prompt shows nothing of interest
            continue
        shown += 1
        lines.append(f"prompt: {comparison.prompt!r}")
        for i in sorted(range(k), key=lambda i: -chunk[i]):
            judged = f"oracle {comparison.scores[i]:.2f}" if comparison.scores else f"rank {comparison.ranking.index(i) + 1}"
            lines.append(f"  reward {chunk[i]:+6.2f} | {judged} | {comparison.completions[i][:90]!r}")
    return lines


def save_plot(path, history, rewards, scores):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].plot(history["step"], history["train_loss"], label="train (pairs of the step)", alpha=0.6)
    axes[0].plot(history["eval_step"], history["eval_loss"], label="held-out", marker="o")
    axes[0].axhline(math.log(2), color="gray", linestyle=":", label="log 2 (chance)")
    axes[0].set_title("pairwise loss")
    axes[1].plot(history["eval_step"], history["eval_accuracy"], marker="o")
    axes[1].axhline(0.5, color="gray", linestyle=":")
    axes[1].set_title("held-out pairwise accuracy")
    for axis in axes[:2]:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend()
    if scores is not None:
        jitter = (torch.rand(len(scores)) - 0.5) * 0.02   # many scores are exactly 0 or 1
        axes[2].scatter(torch.tensor(scores) + jitter, rewards, s=6, alpha=0.5)
        axes[2].set_xlabel("oracle score")
        axes[2].set_ylabel("reward")
        axes[2].set_title("held-out samples: reward vs oracle")
        axes[2].grid(alpha=0.3)
    else:
        axes[2].set_axis_off()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


# -----------------------------------------------------------------------------------------------
# --score: one reward, for a person to probe the model

def score_one(config):
    if len(config.score) != 2:
        raise UsageError(f"--score takes two texts, PROMPT and RESPONSE (got {len(config.score)})")
    path = os.path.join(config.out_dir, "reward.pt")
    device = choose_device(config.device)
    model, tokenizer, _ = load_model(path, stages="reward", device=device)
    ids, mask = reward_input_ids(tokenizer, config.score[0], config.score[1], model.config.block_size)
    # one forward pass for both parts of the reward, so a learner sees which one decided
    with torch.no_grad(), autocast(device):
        head, logprob = reward_parts(model, torch.tensor([ids], device=device),
                                     torch.tensor([len(ids) - 1], device=device), torch.tensor([mask], device=device))
    weight = model.config.reward_logprob_weight
    if not weight:
        reward = head.item()
        print(f"{reward:+.4f}")
        return {"reward": reward}
    head, logprob = head.item(), logprob.item()
    reward = head + weight * logprob
    print(f"{reward:+.4f}  (head {head:+.4f}, plus {weight:g} x the mean log-probability per token of the "
          f"response, {logprob:.4f})")
    return {"reward": reward, "head": head, "logprob": logprob}


# -----------------------------------------------------------------------------------------------
# The stage

def main(config: Config) -> dict:
    if config.score:
        return score_one(config)
    start = time.time()
    if not 2 <= config.samples_per_prompt:
        raise UsageError("--samples_per_prompt must be at least 2 (a ranking needs two completions)")
    check_options(config, positive=("temperature", "max_new_tokens", "max_iters", "prompts_per_step", "learning_rate",
                                    "eval_interval"),
                  not_negative=("max_prompts", "weight_decay", "center_penalty", "examples"),
                  fractions=("heldout_fraction",))
    check_out_dir(config.out_dir)
    set_seed(config.seed)
    device = choose_device(config.device)
    sft_path = config.init_from or os.path.join(config.out_dir, "sft.pt")
    reward_path = os.path.join(config.out_dir, "reward.pt")
    comparisons_path = os.path.join(config.out_dir, "comparisons.jsonl")

    # --- comparisons: sampled from the SFT model and ranked by the oracle, or read from --data
    sft_model, tokenizer, _ = load_model(sft_path, stages="sft", device=device)
    check_train_layers(config.train_layers, sft_model.config.n_layer)   # before minutes of sampling
    resumed = load_checkpoint(reward_path, stages="reward") if config.resume else None
    if resumed:   # the same settings, checked before minutes of sampling
        if "resume" not in resumed:
            raise UsageError(f"{reward_path} finished training; there is nothing to resume")
        weight = resumed["model_config"].get("reward_logprob_weight", 0.0)
        if weight != config.logprob_weight:
            raise UsageError(f"{reward_path} was started with --logprob_weight {weight}; resume with the same")
        trained = resumed["args"].get("train_layers", -1)
        if trained != config.train_layers:
            raise UsageError(f"{reward_path} was started with --train_layers {trained}; resume with the same")
        if "uncentred_bias" not in resumed["resume"]:
            raise UsageError(f"{reward_path} was interrupted by an older reward.py; start afresh without --resume")
    sampling_seconds, skipped = 0.0, 0
    # The world's prompts: its reward split, its SFT split (--sft_prompts; SFT trained on those answers,
    # so their samples are trained on, never held out) and its eval split, held out to evaluate on. The
    # eval split stores its prompts bare; they are asked here as the other splits ask theirs and as the
    # assistant is used: retrieval questions after their passages, long sums after "Let's think step by
    # step." (Asked bare, a question about a country known only from a passage has no right answer to
    # sample, and the held-out pairs would measure how well a reward model ranks two failures.)
    world, prompts, heldout_prompts = None, [], frozenset()
    if not config.data:
        from data.tinyworld import World
        world = World()

        def first_prompts(tasks):
            found = [task.prompt for task in tasks]
            return found[:config.max_prompts] if config.max_prompts > 0 else found
        eval_prompts = first_prompts(tasks_as_asked(world, world.tasks("eval")))
        heldout_prompts = frozenset(eval_prompts)
        prompts = (first_prompts(world.tasks("reward")) + (first_prompts(world.tasks("sft")) if config.sft_prompts else [])
                   + eval_prompts)
    if config.data:
        comparisons, skipped = read_preferences(config.data)
        print(f"read {len(comparisons)} comparisons from {config.data}"
              + (f" (skipped {skipped} pairs with identical texts)" if skipped else ""))
    elif config.resume and os.path.isfile(comparisons_path):
        comparisons, _ = read_preferences(comparisons_path)   # the very comparisons the run started with
        print(f"resume: read {len(comparisons)} comparisons from {comparisons_path}")
    else:
        print(f"sampling {config.samples_per_prompt} completions for each of {len(prompts)} prompts "
              f"at temperature {config.temperature} ...")
        comparisons = sample_comparisons(sft_model, tokenizer, world, prompts, config.samples_per_prompt,
                                         config.temperature, config.max_new_tokens, config.seed)
        sampling_seconds = time.time() - start
        write_comparisons(comparisons_path, comparisons)
        print(f"wrote {comparisons_path} in {sampling_seconds:.0f}s")
    if heldout_prompts:
        train_set, heldout_set = split_by_prompt(comparisons, heldout_prompts)
    else:
        train_set, heldout_set = split_heldout(comparisons, config.heldout_fraction, config.seed)
    train_set = [c for c in train_set if c.pairs()]   # all tied: nothing to learn from
    tied = sum(1 for c in comparisons if not c.pairs())
    if not train_set:
        raise UsageError("no training prompt has completions of different quality (all tied): raise "
                         "--temperature, or check that the SFT model is trained")
    heldout_pairs = sum(len(c.pairs()) for c in heldout_set)
    # A prompt whose completions all tie has no pair, so it cannot move the held-out loss or accuracy;
    # the evaluations during training skip it (about half the held-out prompts, and half their time).
    heldout_ranked = [c for c in heldout_set if c.pairs()]
    print(f"{len(comparisons)} prompts ({tied} all tied); training on {len(train_set)}, "
          f"{sum(len(c.pairs()) for c in train_set)} ordered pairs; held out {len(heldout_set)} prompts, "
          f"{heldout_pairs} pairs")

    # --- the baseline to beat: the SFT model's own log-probability of each held-out response
    baseline = {}
    if heldout_pairs and all(c.scores is not None for c in heldout_set):
        baseline = logprob_baseline(sft_model, tokenizer, heldout_set)
        print(f"baseline, no training: the SFT model's mean log-probability of a response orders "
              f"{baseline['baseline/sft_logprob_pairwise_accuracy']:.1%} of the held-out pairs right "
              f"(Spearman with the oracle {baseline['baseline/sft_logprob_spearman']:.2f})")

    # --- the reward model
    model = reward_model_from_sft(sft_model, config.logprob_weight).to(device)
    del sft_model
    freeze_lower_layers(model, config.train_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
          f"(--train_layers {config.train_layers})")
    if config.logprob_weight and not config.resume:
        # Start centred. With the log-probability in it, every reward starts near weight x (a mean
        # log-probability), not at 0, and the centring penalty below would spend its pull on raising the
        # likelihood of every sample, wrong ones too. Moving the head's bias does it instead. A start
        # needs only to be near 0: in the thirtieth default run the mean over 512 random training
        # samples was within 0.025 of the mean over all 4,596 (five seeds; the rewards' spread is 0.27
        # before training), and scoring all of them took 17 s of the stage's 3 minutes.
        centre_rewards(model, tokenizer, train_set, sample=512, seed=config.seed)
    optimizer = model.configure_optimizer(config.learning_rate, config.weight_decay)
    first_step = 0
    history = {"step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "eval_accuracy": []}
    if resumed:   # read and checked above, before sampling
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["resume"]["optimizer"])
        first_step, history = resumed["resume"]["step"], resumed["resume"]["history"]
        with torch.no_grad():   # the saved model was centred; training continues from the bias before that
            model.scalar_head.bias.copy_(resumed["resume"]["uncentred_bias"])
        print(f"resuming at step {first_step}")

    def learning_rate(step):
        warmup = max(config.max_iters // 20, 1)
        if step < warmup:
            return config.learning_rate * (step + 1) / warmup
        progress = (step - warmup) / max(config.max_iters - warmup, 1)
        return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    # --- training: each step takes some prompts and puts all their completions through together
    # Ctrl-C (StopRequest) lets the current step finish, then the loop ends and the model is saved
    # with what --resume needs; a step is never cut in half.
    progress = Progress(config.max_iters, prefix="reward ")
    step = first_step
    with StopRequest() as stop:
        while step < config.max_iters and not stop.requested:
            batch = [train_set[i] for i in step_prompts(step, len(train_set), config.prompts_per_step, config.seed)]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            model.train()
            total, loss, accuracy, tokens = batch_loss(model, batch, tokenizer, config, device)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            history["step"].append(step)
            history["train_loss"].append(loss.item())
            if heldout_pairs and (step % config.eval_interval == 0 or step == config.max_iters - 1):
                result = evaluate(model, tokenizer, heldout_ranked)
                history["eval_step"].append(step)
                history["eval_loss"].append(result["loss"])
                history["eval_accuracy"].append(result["accuracy"])
            step += 1
            progress.update(step, tokens=tokens, loss=loss.item(), acc=accuracy.item(),
                            heldout_acc=history["eval_accuracy"][-1] if history["eval_accuracy"] else float("nan"))
    progress.close()
    interrupted = step < config.max_iters
    if interrupted:
        print(f"interrupted at step {step}: saving {reward_path}; continue with --resume")

    uncentred_bias = model.scalar_head.bias.detach().clone()   # what --resume continues from

    # --- centring, and evaluation on the held-out prompts (a Ctrl-C here still saves the trained model)
    offset, result = float("nan"), None
    try:
        # The reward's zero: the mean over 1,024 random training samples is within about 0.01 of the mean
        # over all (the rewards' spread is about 0.3) for a quarter of the scoring; rlhf.py subtracts its
        # first batch's mean (RewardNormalizer) anyway, so a constant left in the reward changes no step.
        offset = centre_rewards(model, tokenizer, train_set, sample=1024, seed=config.seed + 1)
        if heldout_set:
            result = evaluate(model, tokenizer, heldout_set)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted after training: saving {reward_path} without its figures; `--resume` "
              f"centres and evaluates it")
    metrics = {"comparisons/prompts": len(comparisons), "comparisons/tied_prompts": tied,
               "comparisons/train_prompts": len(train_set), "comparisons/heldout_prompts": len(heldout_set),
               "comparisons/heldout_pairs": heldout_pairs, "comparisons/skipped": skipped,
               "steps": step, "interrupted": int(interrupted), "reward/offset_removed": offset,
               "train/loss": history["train_loss"][-1] if history["train_loss"] else float("nan")}
    scores = None
    if result is not None:
        rewards = result["rewards"]
        metrics.update({"heldout/loss": result["loss"], "heldout/pairwise_accuracy": result["accuracy"],
                        "reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()})
        if all(c.scores is not None for c in heldout_set):
            scores = [s for c in heldout_set for s in c.scores]
            metrics["heldout/spearman"] = spearman(rewards, scores)
            metrics["heldout/spearman_within_prompt"] = spearman_within_prompts(heldout_set, rewards)
            accuracy, count = clear_pair_accuracy(heldout_set, rewards)
            metrics.update({"heldout/pairwise_accuracy_clear": accuracy, "comparisons/heldout_clear_pairs": count})
        print("\n".join(show_examples(heldout_set, rewards, config.examples)))
        save_plot(os.path.join(config.out_dir, "reward.png"), history, rewards, scores)
    metrics.update(baseline)
    metrics.update({"sampling_seconds": round(sampling_seconds, 1), "seconds": round(time.time() - start, 1)})

    # --- save
    extra = {}
    if interrupted:
        extra["resume"] = {"optimizer": optimizer.state_dict(), "step": step, "history": history,
                           "uncentred_bias": uncentred_bias}
    save_checkpoint(reward_path, stage="reward", model=model, tokenizer=tokenizer,
                    parent={"path": sft_path, "stage": "sft"}, args=dataclasses.asdict(config),
                    metrics=metrics, extra=extra)
    write_json(os.path.join(config.out_dir, "reward.json"), metrics)
    if "heldout/pairwise_accuracy" in metrics:
        print(f"held out: pairwise accuracy {metrics['heldout/pairwise_accuracy']:.1%} on {heldout_pairs} pairs"
              + (f" ({metrics['heldout/pairwise_accuracy_clear']:.1%} on the {metrics['comparisons/heldout_clear_pairs']} "
                 f"clear ones, right vs wrong) | Spearman(reward, oracle) {metrics['heldout/spearman']:.2f}, "
                 f"within a prompt {metrics['heldout/spearman_within_prompt']:.2f}"
                 if "heldout/spearman" in metrics else "")
              + f" | reward mean {metrics['reward/mean']:+.2f}, std {metrics['reward/std']:.2f}")
    print(f"saved {reward_path} ({step} steps, {metrics['seconds']:.0f}s)")
    return metrics


if __name__ == "__main__":
    run_cli(main, Config, __doc__)
