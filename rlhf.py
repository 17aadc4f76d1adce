"""
Reinforcement learning from human feedback: stage 4 of the talk. The SFT model answers prompts, the
frozen reward model scores each answer, and the language-modelling objective is weighted by that
score. In the talk's words: "the reward model said that this is a fairly high scoring completion, and
so all the tokens that we happened to sample on the first row are going to get reinforced and they're
going to get higher probabilities for the future. Conversely, ... the reward model really did not like
this completion, and so therefore every single token that we sampled in that second row is going to
get a slightly lower probability for the future." A KL penalty keeps the policy near the SFT model,
and the talk's warnings are measured here: outputs get less diverse ("mode collapse") and the reward
model, an imperfect copy of the labelers, can be fooled. Every update also trains on a few SFT
demonstrations (--sft_coef, after InstructGPT's "PPO-ptx"), because RL otherwise erodes what the reward
model cannot judge: here, the one-digit sums of chain of thought; --pretrain_mix adds pretraining text,
as InstructGPT did.

    python rlhf.py                     # REINFORCE with a leave-one-out baseline -> out/rlhf.pt
    python rlhf.py --algo ppo          # InstructGPT's recipe: PPO with a value head
    python rlhf.py --algo dpo          # Direct Preference Optimization from out/comparisons.jsonl
    python rlhf.py --reward oracle     # the labelers score the samples themselves: what the reward model costs

Reads out/sft.pt (the policy's start, and a frozen copy as the reference) and out/reward.pt (frozen).
Here the labelers are the tiny world's oracle (World.score): every step logs the reward model's mean
score AND the oracle's score of the same samples, so their gap (reward hacking) is a number, and the
held-out prompts are graded by the oracle before and after.

Reads top to bottom: config, sampling and log-probabilities, the three objectives, diversity,
evaluation, the training loops, save.
"""

import copy
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import (Progress, StopRequest, UsageError, answer_stops, autocast, by_length, check_options, check_out_dir,
                   check_same_tokenizer, choose_device, cut_prompt, load_checkpoint, load_model, plot_curves,
                   read_jsonl, render_chat, response_text, run_cli, save_checkpoint, set_seed, write_json)
from sample import Sampling, chat_answers, generate_answers, tasks_as_asked

# -----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    algo: str = field(default="reinforce", metadata={
        "help": "reinforce: the talk's reward-weighted LM objective; ppo: InstructGPT's; dpo: from comparisons",
        "choices": ["reinforce", "ppo", "dpo"]})
    out_dir: str = field(default="out", metadata={"help": "where rlhf.pt/.json/.png go (and the inputs are read)"})
    init_from: str = field(default="", metadata={"help": "the SFT checkpoint: policy start and reference "
                                                         "(default: <out_dir>/sft.pt)"})
    reward_model: str = field(default="", metadata={"help": "the frozen reward model (default: <out_dir>/reward.pt)"})
    reward: str = field(default="model", metadata={
        "help": "reinforce/ppo: what scores the samples: model (the reward model, RLHF) or oracle (the labelers "
                "themselves, the tiny world's grader: a verifiable reward, and the measure of what the reward "
                "model's mistakes cost)", "choices": ["model", "oracle"]})
    data: str = field(default="", metadata={"help": "reinforce/ppo: RL prompts as JSONL ({\"prompt\": ...} lines; "
                                                    "default: the tiny world's RL split); dpo: preference JSONL "
                                                    "(default: <out_dir>/comparisons.jsonl)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    seed: int = field(default=1337, metadata={"help": "seed of prompt order, sampling and evaluation"})
    max_iters: int = field(default=0, metadata={
        "help": "training steps: a batch of samples (reinforce: one update; ppo: ppo_epochs x ppo_minibatches "
                "updates) or of pairs (dpo); 0: the algorithm's default, 100 reinforce, 40 ppo, 100 dpo"})
    # sampling (reinforce, ppo)
    prompts_per_step: int = field(default=8, metadata={"help": "RL prompts per step"})
    samples_per_prompt: int = field(default=8, metadata={
        "help": "K: completions sampled per prompt (the leave-one-out baseline needs K >= 2; with 8, each "
                "sample is compared with 7 siblings; measured: 8 x 8 prompts removed 26% of the held-out "
                "error, 4 x 16 24%, in less time)"})
    # As long as the context allows: a worked 4-digit sum takes up to 186 tokens, and at 128 every long
    # scratchpad was cut and paid the truncation penalty, so RL taught the policy to stop before its
    # last line ("So 252 + 807 = 1059."): chain of thought 0.58 -> 0.44 greedy (README, RLHF's "Measured").
    max_new_tokens: int = field(default=256, metadata={"help": "longest completion, in tokens (training and "
                                                               "evaluation; the context ends it sooner)"})
    # the objective
    learning_rate: float = field(default=1e-5, metadata={
        "help": "AdamW learning rate (constant); RL steps are noisy: at 1e-4 the policy is 6 nats from SFT "
                "within 10 steps, fooling the reward model"})
    final_norm_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "AdamW learning rate of the final LayerNorm's gain and bias, which scale every logit: how sharply "
                "the policy samples (see make_optimizer); 0 = --learning_rate, like every other weight; "
                "default: the algorithm's, 0.3 for reinforce and ppo (measured with K = 8: 0.3 removed 28% of "
                "the held-out error, 0.1 26%), 0.03 for dpo (0.3 made it worse than SFT on one set of models)"})
    kl_coef: float = field(default=0.02, metadata={
        "help": "beta, weight of the KL(policy || SFT) penalty in the reward, per unit of reward spread; "
                "the field uses 0.02 (InstructGPT) to 0.05 (TRL) to 0.1 (DeepSpeed-Chat); 0 = no leash "
                "(measured in 100 steps with K = 4: 0.02 removed 24% of the held-out error, 0.1 18%)"})
    truncation_penalty: float = field(default=1.0, metadata={
        "help": "subtracted from the reward of a completion that never ended (no <|end|> or "
                "<|endoftext|>: TRL's missing_eos_penalty)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    sft_coef: float = field(default=1.0, metadata={
        "help": "reinforce/ppo: weight of a language-modelling loss on SFT demonstrations added to every update "
                "(InstructGPT's PPO-ptx mixed in pretraining text): holds on to what the reward model cannot "
                "judge (measured: chain of thought 48% without, 68% with; SFT 78%); 0 = off"})
    sft_batch_size: int = field(default=16, metadata={"help": "reinforce/ppo with --sft_coef: SFT conversations per step"})
    pretrain_mix: int = field(default=0, metadata={
        "help": "reinforce/ppo with --sft_coef: rows of the tiny world's pretraining corpus (64 tokens each) added "
                "to every update's demonstrations, as InstructGPT's PPO-ptx mixed in pretraining text; 0 = off (measured: "
                "16 rows kept greedy answers on held-out entities at 90% right, 77% without, but removed 12.9% "
                "of the held-out error at temperature 1, against 16.1%: they also hold the policy's temperature)"})
    micro_batch: int = field(default=16, metadata={"help": "sequences per forward pass or generation call, grouped "
                                                           "by length (less padding); larger is faster on a GPU"})
    # ppo
    ppo_epochs: int = field(default=4, metadata={"help": "ppo: passes over each batch of rollouts"})
    ppo_minibatches: int = field(default=2, metadata={"help": "ppo: minibatches per pass"})
    clip_range: float = field(default=0.2, metadata={"help": "ppo: epsilon of the clipped probability ratio"})
    gae_lambda: float = field(default=1.0, metadata={
        "help": "ppo: lambda of generalised advantage estimation (1: each token gets the whole return minus "
                "its value; InstructGPT/TRL use 0.95 with a value model that already knows something)"})
    value_coef: float = field(default=0.1, metadata={"help": "ppo: weight of the value head's loss"})
    # dpo
    dpo_beta: float = field(default=1.0, metadata={"help": "dpo: beta, the strength of the implicit KL leash (the "
                                                           "DPO paper and TRL use 0.1; measured here: 0.1 lost the "
                                                           "chain of thought, -11% of the error on the twentieth "
                                                           "run's models, 1.0 removed 7%)"})
    dpo_batch_size: int = field(default=32, metadata={"help": "dpo: preference pairs per step"})
    dpo_nll: float = field(default=0.0, metadata={"help": "dpo: weight of the chosen responses' language-"
                                                          "modelling loss added to DPO's (0 = plain DPO)"})
    # evaluation
    eval_tasks: int = field(default=0, metadata={"help": "evaluate on the first N held-out tasks (0: all)"})
    eval_samples: int = field(default=4, metadata={
        "help": "answers per held-out task at temperature 1: with one each, the mean score of 308 tasks "
                "is uncertain by about 0.014, and the change between two models by 0.02, as large as what "
                "RL changes; 4 halve that"})
    diversity_prompts: int = field(default=48, metadata={
        "help": "held-out prompts sampled K times before and after, for reward, KL and diversity"})
    resume: bool = field(default=False, metadata={"help": "continue from <out_dir>/rlhf.pt (after Ctrl-C, "
                                                          "or to train a finished run for more steps)"})


# Steps per algorithm (reinforce: under 4 minutes on a slow 2-core CPU, where 200 steps took 6.5
# minutes and removed no more of the held-out error: 11.2% against 11.6% for 110 steps). A ppo step
# makes ppo_epochs x ppo_minibatches = 8 updates from its samples, and takes three reinforce steps' time;
# measured: at 80 steps ppo had optimised the reward model's flaws (its reward up, the oracle's score
# of held-out samples below SFT's), at 40 not yet. A dpo step samples nothing and is cheap.
DEFAULT_ITERS = {"reinforce": 100, "ppo": 40, "dpo": 100}

# The final LayerNorm's rate per algorithm. REINFORCE and PPO sharpen the policy towards the samples that
# scored well; DPO's loss pulls on the same two weights from fixed pairs, and at 0.3 it sharpened the
# policy past its own good answers (on the second 4-row base's models the greedy score fell 0.608 -> 0.478
# and DPO removed -1.6% of the error; at 0.03: 0.588 and 14.1%; README).
DEFAULT_FINAL_NORM_RATES = {"reinforce": 0.3, "ppo": 0.3, "dpo": 0.03}


# -----------------------------------------------------------------------------------------------
# Rollouts: sample K completions per prompt, and lay prompt + completion out as one token sequence.

@dataclass
class Rollout:
    """B = prompts x K sequences, the K samples of a prompt next to each other.
    idx[b] is prompt + completion, right-padded; mask[b, t] = 1 where target idx[b, t + 1] is a token
    the policy chose (its completion, less what the calculator wrote), so mask lines up with the
    log-probabilities of token_logprobs."""
    prompts: list        # the prompt text of each row
    responses: list      # the completion text (without its <|end|>)
    tokens: list         # the completion tokens (with the stop token if it stopped), the calculator's included
    stopped: list        # ended on <|end|> or <|endoftext|>, as evaluation's answers do (False: cut off at
                         # max_new_tokens or the context)
    sampled_logprobs: list  # the sampler's log-probability of each completion token the policy chose
    sequences: list      # prompt + completion token ids of each row
    idx: torch.Tensor    # [B, T] long
    mask: torch.Tensor   # [B, T - 1] float


def prompt_ids(tokenizer, prompt, block_size, max_new_tokens):
    """The user turn + <|assistant|>. A prompt too long for the context keeps its last tokens (the question
    is at the end), leaving room for at least a quarter of the context of answer, where chat_responses
    leaves half (model.prompt_room): the RL split's longest retrieval prompts (139 tokens at context 256)
    then stay whole; the held-out ones are all shorter than 128. An answer that fills the context is cut
    off there (stopped = False)."""
    ids, _ = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return cut_prompt(ids, block_size - min(max_new_tokens, block_size // 4))


def pad_sequences(sequences, action_masks, device):
    """Right-pad token lists into idx [B, T]; action_masks mark, per token, whether the policy chose it.
    Attention is causal, so the padding after a sequence changes nothing before it."""
    length = max(len(ids) for ids in sequences)
    idx = torch.zeros((len(sequences), length), dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.float32)
    for row, (ids, chosen) in enumerate(zip(sequences, action_masks)):
        idx[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, :len(ids)] = torch.tensor(chosen, dtype=torch.float32)
    return idx.to(device), mask[:, 1:].to(device)   # target t + 1 is predicted at position t


@torch.no_grad()
def sample_rollout(policy, tokenizer, prompts, samples_per_prompt, max_new_tokens, seed, micro_batch=16, tool=True):
    """Plain temperature-1 sampling (no top-k, no top-p), so each sampled token's probability is exactly
    the policy's own: the KL estimate and the policy gradient below both rely on that. Generated in
    groups of prompts of similar length (one rambling sample holds up only its own group). (The groups
    run one after another: side by side on a CPU, model.map_batches, they took as long, since the group
    with the long worked sums sets the pace.)

    The calculator runs, as it does when the assistant is used (sample.py): when a sample asks it
    (<|calc|> 23 * 45 <|result|>) the tool writes the result and the policy goes on. Those tokens are in
    the sequence, for the policy to read, but it did not choose them: the action mask leaves them out
    of the policy gradient and of the KL, as render_chat's train mask leaves them out of SFT."""
    rendered = [prompt_ids(tokenizer, p, policy.config.block_size, max_new_tokens) for p in prompts]
    repeated = [ids for ids in rendered for _ in range(samples_per_prompt)]
    generations = [None] * len(repeated)
    for number, group in enumerate(by_length(repeated, micro_batch)):
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed * 1000 + number, tool=tool)
        details = []
        generate_answers(policy, tokenizer, [repeated[i] for i in group], sampling, answer_stops(tokenizer),
                         details=details)
        for i, generation in zip(group, details):
            generations[i] = generation
    tokens = [g.tokens for g in generations]
    responses = [response_text(tokenizer, t[:-1] if g.stopped else t) for t, g in zip(tokens, generations)]
    sequences = [p + t for p, t in zip(repeated, tokens)]
    action_masks = [[0] * len(p) + [int(logprob is not None) for logprob in g.logprobs]
                    for p, g in zip(repeated, generations)]
    idx, mask = pad_sequences(sequences, action_masks, next(policy.parameters()).device)
    return Rollout([p for p in prompts for _ in range(samples_per_prompt)], responses, tokens,
                   [g.stopped for g in generations],
                   [[logprob for logprob in g.logprobs if logprob is not None] for g in generations],
                   sequences, idx, mask)


def token_logprobs(model, idx):
    """log p(idx[:, t + 1] | idx[:, :t + 1]) for every t: [B, T - 1]. One forward pass; with grad
    unless the caller is under torch.no_grad()."""
    with autocast(idx.device.type):
        logits, _ = model(idx)
    return selected_logprobs(logits[:, :-1], idx[:, 1:])


def in_micro_batches(function, sequences, micro_batch, device):
    """Run function(idx) -> tuple of [b, t - 1] tensors over groups of sequences of similar length, and
    lay the results out as one [B, T - 1] grid (T = the longest sequence), matching pad_sequences: the
    same numbers as one big padded batch, for less work. Gradients flow through."""
    width = max(len(ids) for ids in sequences)
    outputs = None
    for group in by_length(sequences, micro_batch):
        length = max(len(sequences[i]) for i in group)
        idx = torch.zeros((len(group), length), dtype=torch.long)
        for row, i in enumerate(group):
            idx[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        results = function(idx.to(device))
        if outputs is None:
            outputs = [result.new_zeros((len(sequences), width - 1)) for result in results]
        rows = torch.tensor(group, device=device)
        for output, result in zip(outputs, results):
            output[rows, :length - 1] = result
    return outputs


def rollout_logprobs(model, sequences, micro_batch, device):
    return in_micro_batches(lambda idx: (token_logprobs(model, idx),), sequences, micro_batch, device)[0]


def selected_logprobs(logits, targets):
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_kl(policy_logprobs, reference_logprobs, mask):
    """KL(policy || reference) of each sampled completion, estimated from its own tokens:
    sum over its tokens of log pi(token) - log pi_ref(token). Since the tokens were sampled from the
    policy, the average over samples is an unbiased estimate of the true KL, which is >= 0; a single
    sample can be negative, a clearly negative mean cannot (it would mean the log-probabilities are
    not the sampler's: top-k, a temperature, a mismatched prompt...)."""
    return ((policy_logprobs - reference_logprobs) * mask).sum(-1)


def check_kl(kl, step):
    """Warn when the mean KL estimate is negative by more than sampling noise (3 standard errors)."""
    if len(kl) < 2:
        return False
    mean, error = kl.mean().item(), kl.std().item() / math.sqrt(len(kl))
    if mean < -3 * error - 1e-4:
        print(f"\nwarning: step {step}: mean KL estimate {mean:.4f} < 0 beyond noise ({error:.4f}); "
              f"the policy's log-probabilities do not match its samples (a bug)", file=sys.stderr)
        return True
    return False


# -----------------------------------------------------------------------------------------------
# REINFORCE: the talk's reward-weighted language-modelling objective.

def leave_one_out_advantages(rewards):
    """rewards [P, K]: K samples of each of P prompts -> advantage = reward - mean of the OTHER K - 1.

    Why a baseline: the gradient of E[R] is E[R * grad log p(sample)], and subtracting any b that does
    not depend on the sample keeps it unbiased (E[grad log p] = 0) while removing most of its variance:
    without it every sample of a prompt whose answers are all good gets pushed up, the good ones barely
    more than the bad. Why the OTHER samples: a sample's own reward in its baseline would correlate
    the two and bias the gradient; the mean of the other K - 1 is independent of it. (Ahmadian et al.
    2024, "Back to Basics", RLOO.)"""
    P, K = rewards.shape
    if K < 2:
        raise UsageError("--samples_per_prompt must be at least 2 for the leave-one-out baseline")
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)
    return rewards - baseline


def reinforce_loss(logprobs, mask, advantages):
    """-(advantage x log-probability of the whole completion), averaged over completions: gradient
    descent on it raises every token of a better-than-its-siblings completion and lowers the rest."""
    return -(advantages.detach() * (logprobs * mask).sum(-1)).mean()


# -----------------------------------------------------------------------------------------------
# PPO: what InstructGPT did. Per-token rewards (the KL penalty at every token, the reward model's
# score at the last), advantages from a learned value (GAE), and a clipped surrogate objective that
# lets each batch of samples be used for several gradient steps without moving the policy too far.

class ValueHead(nn.Module):
    """V(state): the expected future reward from a position. One linear layer on the policy's own final
    hidden states (the same GPT, as TRL does), starting at zero."""

    def __init__(self, n_embd):
        super().__init__()
        self.linear = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden):
        return self.linear(hidden.float()).squeeze(-1)


def logprobs_and_values(policy, value_head, idx):
    """One forward pass for both: the log-probability of each next token, and the value of each
    position (the state before that token is chosen). Both [B, T - 1]."""
    with autocast(idx.device.type):
        hidden = policy.hidden_states(idx)
        logits = policy.lm_head(hidden)
    return selected_logprobs(logits[:, :-1], idx[:, 1:]), value_head(hidden[:, :-1])


def per_token_rewards(scores, policy_logprobs, reference_logprobs, mask, kl_coef):
    """InstructGPT's reward: -beta * (log pi - log pi_ref) at every completion token, plus the reward
    model's score at the completion's last token."""
    rewards = -kl_coef * (policy_logprobs - reference_logprobs) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)   # the last chosen token
    return rewards + last.float() * scores[:, None]


def gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised advantage estimation (Schulman et al. 2016), going backwards over the completion:
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1}; V after the end is 0.
    lambda = 1 is the plain Monte-Carlo return minus V (unbiased, noisy); lower trusts V more. Measured
    here: with a value head that starts at zero, lambda = 0.95 lays a bad completion's blame on its last
    tokens, its <|end|> above all, and the policy learns to ramble instead; hence 1 here and in --gae_lambda.
    Returns (advantages, returns = advantages + values), zero outside the mask."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # A token the policy did not choose is not a step: the chain passes over it. So the padding after
        # a completion keeps the zeros it started from, and the call before a calculator result still
        # gets the score of the answer the result leads to.
        chosen = mask[:, t] > 0
        next_value = torch.where(chosen, values[:, t], next_value)
        next_advantage = torch.where(chosen, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values, mask):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """The clipped surrogate (Schulman et al. 2017): per token, with ratio = pi / pi_old,
    loss = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A). Once the ratio has moved eps in the
    direction the advantage wants, the gradient stops: many steps on one batch cannot run away.
    Returns (loss averaged over chosen tokens, fraction of tokens clipped)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)   # where the clipped term wins
    return loss, clip_fraction


# -----------------------------------------------------------------------------------------------
# DPO (Rafailov et al. 2023): the KL-regularised RLHF objective has a closed-form optimum,
# pi*(y|x) proportional to pi_ref(y|x) exp(r(x, y) / beta). Turned around, a policy defines an implicit
# reward beta log(pi / pi_ref), and the reward model's pairwise loss can train the policy directly:
# no sampling, no reward model.

def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """Log-probabilities of whole responses [N] -> (loss, implicit rewards of chosen and rejected).
    loss = -log sigmoid(beta [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)]);
    it is log 2 while policy = reference."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def preference_pairs(comparisons):
    """Every (prompt, better, worse) of each ranking; tied completions make no pair (reward.py's rule)."""
    return [(c.prompt, c.completions[i], c.completions[j]) for c in comparisons for i, j in c.pairs()]


def pair_sequences(tokenizer, pairs, block_size):
    """Chosen responses in rows 0..N-1, rejected in N..2N-1, with render_chat's train mask marking the
    response tokens (and its <|end|>) whose log-probabilities are summed."""
    sequences, masks = [], []
    for column in (1, 2):
        for pair in pairs:
            ids, train_mask = render_chat(tokenizer, [{"role": "user", "content": pair[0]},
                                                      {"role": "assistant", "content": pair[column]}])
            sequences.append(ids[-block_size:])
            masks.append(train_mask[-block_size:])
    return sequences, masks


# -----------------------------------------------------------------------------------------------
# Diversity: the talk warns RLHF models "lose some entropy"; these count it.

def diversity(token_lists, samples_per_prompt):
    """(mean fraction of distinct completions among the K of a prompt,
        mean fraction of distinct token 2-grams among all 2-grams of the K completions of a prompt)."""
    distinct, distinct_2 = [], []
    for start in range(0, len(token_lists), samples_per_prompt):
        group = [tuple(tokens) for tokens in token_lists[start:start + samples_per_prompt]]
        distinct.append(len(set(group)) / len(group))
        bigrams = [pair for tokens in group for pair in zip(tokens, tokens[1:])]
        if bigrams:
            distinct_2.append(len(set(bigrams)) / len(bigrams))
    return sum(distinct) / len(distinct), (sum(distinct_2) / len(distinct_2) if distinct_2 else 0.0)


# -----------------------------------------------------------------------------------------------
# Evaluation

def heldout_prompts(world):
    """Every held-out prompt, bare and as asked (after its passages or "Let's think step by step.")."""
    tasks = world.tasks("eval")
    return frozenset([task.prompt for task in tasks] + [task.prompt for task in tasks_as_asked(world, tasks)])


def oracle_scores(world, prompts, responses):
    return [world.score(prompt, response)[0] for prompt, response in zip(prompts, responses)]


def evaluate_heldout(model, tokenizer, world, tasks, max_new_tokens, seed, samples=1):
    """The oracle's grades of the held-out tasks, with the calculator running as it does in use: greedy
    (one answer per task), and `samples` answers per task at temperature 1, whose mean is the figure RL
    is judged by. With samples >= 2 also its sampling error ("temp1/score_error/all"): the standard
    deviation of that mean over fresh draws of the answers, the tasks staying the same, from the spread of
    each task's own answers. A change between two models smaller than about twice that is not measured."""
    metrics = {}
    for name, temperature, copies in (("greedy", 0.0, 1), ("temp1", 1.0, samples)):
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, tool=True)
        asked = [task for task in tasks for _ in range(copies)]
        graded, responses = world.evaluate(lambda prompts: chat_answers(model, tokenizer, prompts, sampling), asked)
        metrics.update({f"{name}/{key}": value for key, value in graded.items()})
    if samples >= 2:   # asked and responses are the temperature-1 pass's, the loop's last
        scores = torch.tensor(oracle_scores(world, [task.prompt for task in asked], responses), dtype=torch.float64)
        # the variance of the mean over all tasks: the sum of each task's own sample variance / samples
        variance_of_mean = (scores.view(len(tasks), samples).var(dim=1) / samples).sum().item()
        metrics["temp1/score_error/all"] = math.sqrt(variance_of_mean) / len(tasks)
    return metrics


@torch.no_grad()
def sample_report(policy, reference, tokenizer, reward_fn, world, prompts, config, seed):
    """K samples of each of some held-out prompts: reward, oracle score, KL to the reference, length,
    diversity. The same seed before and after training, so only the model differs."""
    rollout = sample_rollout(policy, tokenizer, prompts, config.samples_per_prompt, config.max_new_tokens, seed,
                             config.micro_batch)
    device = rollout.mask.device
    kl = sequence_kl(rollout_logprobs(policy, rollout.sequences, config.micro_batch, device),
                     rollout_logprobs(reference, rollout.sequences, config.micro_batch, device), rollout.mask)
    distinct, distinct_2 = diversity(rollout.tokens, config.samples_per_prompt)
    report = {"kl": kl.mean().item(), "length": sum(map(len, rollout.tokens)) / len(rollout.tokens),
              "stopped": sum(rollout.stopped) / len(rollout.stopped),
              "distinct": distinct, "distinct_2": distinct_2,
              "oracle": sum(oracle_scores(world, rollout.prompts, rollout.responses)) / len(rollout.prompts)}
    if reward_fn is not None:
        report["reward"] = reward_fn(rollout.prompts, rollout.responses).float().mean().item()
    return report


# -----------------------------------------------------------------------------------------------
# The training steps

class RewardNormalizer:
    """The reward model's scale is arbitrary (only differences were trained), so rewards are measured
    in units of the spread of the SFT model's own samples, taken from the first batch and then fixed:
    kl_coef then means the same thing whatever reward model is used."""

    def __init__(self, mean=None, std=None):
        self.mean, self.std = mean, std

    def __call__(self, scores):
        if self.mean is None:
            self.mean = scores.mean().item()
            std = scores.std().item() if len(scores) > 1 else 0.0
            self.std = std if std > 1e-6 else 1.0
        return (scores - self.mean) / self.std


def shaped_rewards(scores, stopped, normalizer, truncation_penalty):
    """What RL maximises for each completion: its score in units of the SFT samples' spread, less
    truncation_penalty if it never ended (cut off by max_new_tokens or the context), so that rambling
    until the cut is never the way to a score (TRL's missing_eos_penalty)."""
    return normalizer(scores) - truncation_penalty * (1.0 - stopped)


def rollout_step(policy, reference, value_head, optimizer, tokenizer, prompts, reward_fn, normalizer,
                 config, step, world=None, demonstrations=None):
    """One step of reinforce or ppo: sample, score, then update. Returns the step's log line.
    demonstrations (with --sft_coef): this step's batches of SFT conversations and pretraining text, each
    padded (inputs, targets)."""
    device = next(policy.parameters()).device
    rollout = sample_rollout(policy, tokenizer, prompts, config.samples_per_prompt, config.max_new_tokens,
                             seed=config.seed * 100_003 + step, micro_batch=config.micro_batch)
    scores = reward_fn(rollout.prompts, rollout.responses).float().to(device)
    stopped = torch.tensor(rollout.stopped, dtype=torch.float32, device=device)
    rewards = shaped_rewards(scores, stopped, normalizer, config.truncation_penalty)
    with torch.no_grad():
        reference_logprobs = rollout_logprobs(reference, rollout.sequences, config.micro_batch, device)
    mask = rollout.mask
    if config.algo == "reinforce":
        logprobs = rollout_logprobs(policy, rollout.sequences, config.micro_batch, device)
        kl = sequence_kl(logprobs.detach(), reference_logprobs, mask)
        # the KL penalty goes into the reward (as InstructGPT did), so the estimator is the gradient of
        # E[reward] - beta KL; the baseline then compares each sample with its siblings
        total = (rewards - config.kl_coef * kl).view(-1, config.samples_per_prompt)
        advantages = leave_one_out_advantages(total).view(-1)
        loss = reinforce_loss(logprobs, mask, advantages)
        extra = {"loss": loss.item()}
        if demonstrations is not None:
            sft_loss = demonstration_loss(policy, demonstrations, device)
            loss = loss + config.sft_coef * sft_loss
            extra["sft_loss"] = sft_loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(policy, value_head, config.grad_clip)
        optimizer.step()
    else:
        extra, kl = ppo_update(policy, value_head, optimizer, rollout, rewards, reference_logprobs, config, step,
                               demonstrations)
    distinct, distinct_2 = diversity(rollout.tokens, config.samples_per_prompt)
    line = {"reward": scores.mean().item(), "kl": kl.mean().item(), "kl_warning": int(check_kl(kl, step)),
            "length": sum(map(len, rollout.tokens)) / len(rollout.tokens),
            "distinct": distinct, "distinct_2": distinct_2, "tokens": int(mask.sum().item())}
    if world is not None:
        line["oracle"] = sum(oracle_scores(world, rollout.prompts, rollout.responses)) / len(rollout.prompts)
    line.update(extra)
    return line


def ppo_update(policy, value_head, optimizer, rollout, rewards, reference_logprobs, config, step,
               demonstrations=None):
    mask, device = rollout.mask, rollout.mask.device

    def forward(rows):   # log-probabilities and values of some rows, on the rollout's [B, T - 1] grid
        sequences = [rollout.sequences[i] for i in rows]
        logprobs, values = in_micro_batches(lambda idx: logprobs_and_values(policy, value_head, idx),
                                            sequences, config.micro_batch, device)
        width = mask.shape[1]   # the rows' own grid may be narrower than the whole rollout's
        return F.pad(logprobs, (0, width - logprobs.shape[1])), F.pad(values, (0, width - values.shape[1]))

    with torch.no_grad():
        old_logprobs, old_values = forward(list(range(len(rollout.sequences))))
        kl = sequence_kl(old_logprobs, reference_logprobs, mask)
        token_rewards = per_token_rewards(rewards, old_logprobs, reference_logprobs, mask, config.kl_coef)
        advantages, returns = gae_advantages(token_rewards, old_values, mask, gamma=1.0, lam=config.gae_lambda)
        advantages = whiten(advantages, mask)   # one scale for every batch: a steadier step size
    rows = len(rollout.sequences)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)   # minibatch order, per step
    losses, value_losses, clip_fractions = [], [], []
    for _ in range(config.ppo_epochs):
        order = torch.randperm(rows, generator=generator).to(device)
        for chosen in torch.tensor_split(order, config.ppo_minibatches):   # sizes differ by one at most
            if len(chosen) == 0:
                continue
            logprobs, values = forward(chosen.tolist())
            policy_loss, clip_fraction = ppo_policy_loss(logprobs, old_logprobs[chosen], advantages[chosen],
                                                         mask[chosen], config.clip_range)
            value_loss = 0.5 * masked_mean((values - returns[chosen]) ** 2, mask[chosen])
            loss = policy_loss + config.value_coef * value_loss
            if demonstrations is not None:
                loss = loss + config.sft_coef * demonstration_loss(policy, demonstrations, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(policy, value_head, config.grad_clip)
            optimizer.step()
            losses.append(policy_loss.item())
            value_losses.append(value_loss.item())
            clip_fractions.append(clip_fraction.item())
    return ({"loss": sum(losses) / len(losses), "value_loss": sum(value_losses) / len(value_losses),
             "clip_fraction": sum(clip_fractions) / len(clip_fractions)}, kl)


def dpo_step(policy, reference, optimizer, tokenizer, pairs, config):
    device = next(policy.parameters()).device
    sequences, masks = pair_sequences(tokenizer, pairs, policy.config.block_size)
    _, mask = pad_sequences(sequences, masks, device)
    with torch.no_grad():
        reference_logprobs = (rollout_logprobs(reference, sequences, config.micro_batch, device) * mask).sum(-1)
    policy_logprobs = (rollout_logprobs(policy, sequences, config.micro_batch, device) * mask).sum(-1)
    n = len(pairs)
    loss, chosen, rejected = dpo_loss(policy_logprobs[:n], policy_logprobs[n:],
                                      reference_logprobs[:n], reference_logprobs[n:], config.dpo_beta)
    if config.dpo_nll > 0:
        # DPO only asks that chosen rise relative to rejected, and often gets there by pushing both
        # down; the chosen responses' own likelihood keeps them up (Pang et al. 2024)
        loss = loss - config.dpo_nll * policy_logprobs[:n].sum() / mask[:n].sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(policy, None, config.grad_clip)
    optimizer.step()
    # a tie counts half, as in reward.py: at the first step policy = reference and every pair ties
    accuracy = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
    return {"loss": loss.item(), "accuracy": accuracy,
            "margin": (chosen - rejected).mean().item(), "tokens": int(mask.sum().item())}


def clip_gradients(policy, value_head, grad_clip):
    if grad_clip > 0:
        parameters = list(policy.parameters()) + (list(value_head.parameters()) if value_head else [])
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)


def final_norm_rate_of(config):
    """--final_norm_learning_rate, or the algorithm's default."""
    if config.final_norm_learning_rate is not None:
        return config.final_norm_learning_rate
    return DEFAULT_FINAL_NORM_RATES[config.algo]


def make_optimizer(policy, value_head, config):
    """AdamW without weight decay (it would pull the weights towards zero, not towards the reference),
    and with the final LayerNorm on a learning rate of its own.

    Why its own rate: Adam moves each weight by about the learning rate per step, whatever the weight's
    size. At 1e-5 a matrix entry (about 0.02 in size) can move by a twentieth of a percent of itself
    in a step, the final LayerNorm's gain (about 2) by a hundredth of that, so in 100 steps the gain
    could change by 0.05% at most. Yet the gain and bias set the scale of every logit: scaled together
    by c, the policy samples at temperature 1 / c (a test checks it). And at this size what RL carries
    to prompts it never practised on is mostly that (measured: see README): sampling more like the
    answer it would give greedily, where that answer is the better one, the entropy RLHF models lose in
    the talk. The matrices' rate would keep it from learning it; a rate 30,000 times larger (0.3) for
    the 2 x n_embd weights of the final norm lets it, in the few steps a CPU has time for. (nanochat
    likewise gives its embedding and unembedding rates of their own.)"""
    final_norm_rate = final_norm_rate_of(config) or config.learning_rate
    optimizer = policy.configure_optimizer(config.learning_rate, weight_decay=0.0,
                                           own_rates={"transformer.ln_f.": final_norm_rate})
    if value_head is not None:
        optimizer.add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0})
    return optimizer


def freeze(model):
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def demonstration_loss(policy, demonstrations, device):
    """The language-modelling loss of this step's demonstrations: a list of padded (inputs, targets)
    batches, SFT conversations (cross-entropy on the assistant's tokens) and, with --pretrain_mix, rows
    of pretraining text; the losses of the batches add up. InstructGPT found that RL against a reward
    model costs skills the reward model does not look at (the "alignment tax") and added a pretraining
    loss to PPO's ("PPO-ptx"); here RL costs chain of thought, whose one-digit sums the reward model
    cannot check, and the demonstrations of SFT hold them in place."""
    return sum(policy(inputs.to(device), targets.to(device))[1] for inputs, targets in demonstrations)


def read_prompts(path):
    """RL prompts in TRL's shape, {"prompt": "..."} per line (other fields are ignored)."""
    prompts = []
    for line, record in read_jsonl(path):
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UsageError(f"{path}:{line}: expected a \"prompt\" field holding a non-empty string")
        prompts.append(record["prompt"])
    return prompts


def batch_of(items, step, size, seed):
    """Batch `step` of an endless stream of seeded shuffles of items: a function of the step alone, so
    a resumed run sees exactly the batches an uninterrupted one would."""
    size = min(size, len(items))
    start = step * size
    batch = []
    while len(batch) < size:
        epoch, offset = divmod(start + len(batch), len(items))
        order = list(range(len(items)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        batch.extend(items[i] for i in order[offset:offset + size - len(batch)])
    return batch


# -----------------------------------------------------------------------------------------------
# The stage

def main(config: Config) -> dict:
    start = time.time()
    set_seed(config.seed)
    device = choose_device(config.device)
    check_config(config)
    check_out_dir(config.out_dir)
    sft_path = config.init_from or os.path.join(config.out_dir, "sft.pt")
    reward_path = config.reward_model or os.path.join(config.out_dir, "reward.pt")
    rlhf_path = os.path.join(config.out_dir, "rlhf.pt")

    # --- the models: the policy and a frozen reference, both from SFT; the frozen reward model
    reference, tokenizer, _ = load_model(sft_path, stages="sft", device=device)
    freeze(reference)
    policy = copy.deepcopy(reference)
    for parameter in policy.parameters():
        parameter.requires_grad_(True)
    from data.tinyworld import World
    world = World()
    reward_model, reward_fn = None, None
    if config.reward == "oracle":
        def reward_fn(prompts, responses):
            return torch.tensor(oracle_scores(world, prompts, responses))
    elif config.algo != "dpo" or os.path.isfile(reward_path):   # dpo uses it only to report rewards
        reward_model, reward_tokenizer, _ = load_model(reward_path, stages="reward", device=device)
        check_same_tokenizer(sft_path, tokenizer, reward_path, reward_tokenizer)
        freeze(reward_model)
        from reward import reward_scores

        def reward_fn(prompts, responses):
            return reward_scores(reward_model, tokenizer, prompts, responses, batch_size=config.micro_batch)

    # --- data: the RL prompts (the world's, or --data's), or the comparisons for dpo; the held-out tasks
    if config.data and config.algo != "dpo":
        prompts = read_prompts(config.data)
        print(f"{config.algo}: {len(prompts)} RL prompts from {config.data}")
    else:
        prompts = [task.prompt for task in world.tasks("rl")]
    pairs = None
    if config.algo == "dpo":
        from reward import read_preferences
        data_path = config.data or os.path.join(config.out_dir, "comparisons.jsonl")
        if not os.path.isfile(data_path):
            raise UsageError(f"{data_path} not found: run `python reward.py` first (it writes the comparisons), "
                             f"or pass --data FILE.jsonl")
        comparisons, _ = read_preferences(data_path)
        # reward.py ranks answers to the held-out prompts too, to measure its reward model on them; DPO
        # learns from rankings directly, so those must stay out or it would train on the test it is graded by
        heldout = heldout_prompts(world)
        training = [c for c in comparisons if c.prompt not in heldout]
        pairs = preference_pairs(training)
        if not pairs:
            raise UsageError(f"{data_path}: no ranking of a training prompt has a preference to learn from "
                             f"(ties make no pair; held-out prompts are left out)")
        print(f"dpo: {len(pairs)} preference pairs from {len(training)} rankings in {data_path} "
              f"({len(comparisons) - len(training)} rankings of held-out prompts left out)")
    demonstrations = None   # --sft_coef: the SFT conversations, and the batch of them each step trains on
    if config.sft_coef > 0 and config.algo != "dpo":
        # the tiny world's SFT conversations; with --pretrain_mix, rows of its pretraining corpus too, cut
        # and sampled as SFT's own mix is (sft.Config's defaults)
        import sft
        examples, _, _ = sft.encode_all(tokenizer, sft.world_conversations(world), policy.config.block_size)
        mix = sft.Config()
        stream = None
        if config.pretrain_mix > 0:
            stream = sft.pretraining_tokens(tokenizer, world.documents(), mix.pretrain_mix_tokens,
                                            random.Random(config.seed))

        def demonstrations(step):
            batches = [sft.pad_batch(batch_of(examples, step, config.sft_batch_size, config.seed))]
            if stream is not None:
                batches.append(sft.pretraining_batch(stream, config.pretrain_mix, mix.pretrain_mix_length,
                                                     config.seed, step))
            return batches
    # The held-out prompts, asked as the RL split asks its own and as the assistant is used (retrieval
    # questions after their passages, long sums after "Let's think step by step."): the eval split stores them bare.
    tasks = world.tasks("eval")
    tasks = tasks_as_asked(world, tasks[:config.eval_tasks] if config.eval_tasks > 0 else tasks)
    report_prompts = [task.prompt for task in tasks[:config.diversity_prompts]]

    # --- the optimizer, and where we start: fresh, or --resume
    value_head = ValueHead(policy.config.n_embd).to(device) if config.algo == "ppo" else None
    optimizer = make_optimizer(policy, value_head, config)
    history, first_step, normalizer, before = {}, 0, RewardNormalizer(), None
    if config.resume:
        checkpoint = load_checkpoint(rlhf_path, stages="rlhf")
        state = checkpoint.get("resume")
        if not state:
            raise UsageError(f"{rlhf_path} holds no training state to resume")
        if state["algo"] != config.algo:
            raise UsageError(f"{rlhf_path} was trained with --algo {state['algo']}; resume with that")
        if state.get("reward", "model") != config.reward:
            raise UsageError(f"{rlhf_path} was trained with --reward {state.get('reward', 'model')}; resume with that")
        if state.get("data", "") != config.data:   # other prompts or pairs would be another run's batches
            raise UsageError(f"{rlhf_path} was trained with --data {state.get('data', '')!r}; resume with that")
        policy.load_state_dict(checkpoint["model"])
        rates = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])   # (this restores the saved rates too)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate   # the rates of this command's options, which may extend a run differently
        if value_head is not None:
            value_head.load_state_dict(state["value_head"])
        history, first_step, before = state["history"], state["step"], state["before"]
        normalizer = RewardNormalizer(state["reward_mean"], state["reward_std"])
        print(f"resuming {config.algo} at step {first_step}")

    # --- before: the SFT model on the held-out tasks
    if before is None:
        print(f"evaluating the SFT model on {len(tasks)} held-out tasks ...")
        before = evaluate_heldout(reference, tokenizer, world, tasks, config.max_new_tokens, config.seed,
                                  config.eval_samples)
        before.update(sample_report(reference, reference, tokenizer, reward_fn, world, report_prompts, config,
                                    config.seed))

    # --- training
    max_iters = config.max_iters or DEFAULT_ITERS[config.algo]
    train_start = time.time()
    progress = Progress(max_iters, prefix=f"rlhf {config.algo} ")
    completed = first_step
    policy.eval()   # eval mode = no dropout: the log-probabilities must be the sampler's
    # Ctrl-C (StopRequest) lets the current step finish, so a PPO step's updates are never cut in half
    # and --resume starts from a whole step; then the model is saved
    with StopRequest() as stop:
        for step in range(first_step, max_iters):
            if stop.requested:
                break
            if config.algo == "dpo":
                line = dpo_step(policy, reference, optimizer, tokenizer,
                                batch_of(pairs, step, config.dpo_batch_size, config.seed), config)
            else:
                line = rollout_step(policy, reference, value_head, optimizer, tokenizer,
                                    batch_of(prompts, step, config.prompts_per_step, config.seed),
                                    reward_fn, normalizer, config, step,
                                    None if config.data else world,   # the oracle grades only its own prompts
                                    demonstrations(step) if demonstrations else None)
            for key, value in line.items():
                history.setdefault(key, []).append(value)
            shown = {key: line[key] for key in ("reward", "oracle", "kl", "loss", "accuracy") if key in line}
            completed = step + 1
            progress.update(completed, tokens=line["tokens"], **shown)
    progress.close()
    interrupted = completed < max_iters
    if interrupted:
        print(f"interrupted after step {completed}: saving {rlhf_path}; continue with --resume")
    train_seconds = time.time() - train_start

    # --- after: the same evaluation
    metrics = {"algo": config.algo, "reward": config.reward, "steps": completed, "kl_coef": config.kl_coef}
    metrics.update({f"sft/{key}": value for key, value in before.items()})
    after = None
    if not interrupted:
        try:
            after = evaluate_heldout(policy, tokenizer, world, tasks, config.max_new_tokens, config.seed,
                                     config.eval_samples)
            after.update(sample_report(policy, reference, tokenizer, reward_fn, world, report_prompts, config,
                                       config.seed))
        except KeyboardInterrupt:
            interrupted = True
            print(f"\ninterrupted during evaluation: saving {rlhf_path} without its figures; "
                  f"`--resume` evaluates it", file=sys.stderr)
    metrics["interrupted"] = int(interrupted)
    if after is not None:
        metrics.update({f"rlhf/{key}": value for key, value in after.items()})
        for mode in ("greedy", "temp1"):
            old, new = before[f"{mode}/score/all"], after[f"{mode}/score/all"]
            metrics[f"error_removed/{mode}"] = (new - old) / (1.0 - old) if old < 1.0 else 0.0
        if "temp1/score_error/all" in before and before["temp1/score/all"] < 1.0:
            # the two means come from independent samples, so their errors add in quadrature
            error = math.hypot(before["temp1/score_error/all"], after["temp1/score_error/all"])
            metrics["error_removed/temp1_error"] = error / (1.0 - before["temp1/score/all"])
    last = max(1, min(10, len(history.get("tokens", [])) // 4))
    metrics.update({f"train/{key}": sum(values[-last:]) / len(values[-last:])
                    for key, values in history.items() if key not in ("tokens", "kl_warning") and values})
    if "kl_warning" in history:
        metrics["train/kl_warnings"] = sum(history["kl_warning"])   # steps whose mean KL was < 0 beyond noise
    metrics.update({"seconds/train": round(train_seconds, 1), "seconds": round(time.time() - start, 1)})

    # --- save (with the training state, so --resume can continue or extend the run)
    state = {"algo": config.algo, "reward": config.reward, "data": config.data, "step": completed,
             "optimizer": optimizer.state_dict(),
             "history": history, "before": before, "reward_mean": normalizer.mean, "reward_std": normalizer.std,
             "value_head": value_head.state_dict() if value_head is not None else None}
    save_checkpoint(rlhf_path, stage="rlhf", model=policy, tokenizer=tokenizer,
                    parent={"path": sft_path, "stage": "sft"}, args=dataclasses.asdict(config),
                    metrics=metrics, extra={"resume": state})
    write_json(os.path.join(config.out_dir, "rlhf.json"), metrics)
    save_plot(os.path.join(config.out_dir, "rlhf.png"), history, config.algo, config.reward)
    print(summary(metrics))
    return metrics


def check_config(config):
    if config.algo not in ("reinforce", "ppo", "dpo"):
        raise UsageError(f"--algo {config.algo}: expected reinforce, ppo or dpo")
    if config.reward not in ("model", "oracle"):
        raise UsageError(f"--reward {config.reward}: expected model or oracle")
    if config.data and config.reward == "oracle" and config.algo != "dpo":
        raise UsageError("--reward oracle grades only the tiny world's own prompts; with --data prompts use the "
                         "reward model")
    if config.algo == "dpo" and config.reward == "oracle":
        raise UsageError("--reward oracle scores samples, and dpo samples nothing: use it with reinforce or ppo")
    if config.algo == "reinforce" and config.samples_per_prompt < 2:
        raise UsageError("--samples_per_prompt must be at least 2: the leave-one-out baseline compares siblings")
    if config.max_iters < 0:
        raise UsageError("--max_iters must be positive (or 0 for the algorithm's default)")
    check_options(config, positive=("prompts_per_step", "samples_per_prompt", "max_new_tokens", "dpo_batch_size",
                                    "ppo_epochs", "ppo_minibatches", "micro_batch", "sft_batch_size", "eval_samples",
                                    "learning_rate", "dpo_beta"),
                  not_negative=("kl_coef", "sft_coef", "pretrain_mix", "truncation_penalty", "grad_clip", "clip_range",
                                "value_coef", "dpo_nll", "eval_tasks", "diversity_prompts"))
    if config.final_norm_learning_rate is not None and config.final_norm_learning_rate < 0:
        raise UsageError("--final_norm_learning_rate must be >= 0 (0 = the same as --learning_rate)")
    if not 0.0 <= config.gae_lambda <= 1.0:
        raise UsageError(f"--gae_lambda must lie between 0 and 1, got {config.gae_lambda}")
    if config.pretrain_mix > 0 and (config.sft_coef == 0 or config.algo == "dpo"):
        raise UsageError("--pretrain_mix adds rows to the demonstrations of reinforce and ppo: give it --sft_coef > 0")


def summary(metrics):
    keys = ["steps", "seconds", "sft/temp1/score/all", "rlhf/temp1/score/all", "error_removed/temp1",
            "error_removed/temp1_error",
            "sft/greedy/score/all", "rlhf/greedy/score/all", "rlhf/kl", "sft/distinct", "rlhf/distinct",
            "sft/reward", "rlhf/reward", "sft/oracle", "rlhf/oracle"]
    return " | ".join(f"{k} {metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                      for k in keys if k in metrics)


def save_plot(path, history, algo, reward="model"):
    steps = list(range(1, len(history.get("tokens", [])) + 1))
    if not steps:
        return
    def curve(key):
        return (steps, history[key])
    if algo == "dpo":
        panels = [("DPO loss", {"loss": curve("loss")}),
                  ("pairs ranked right by the implicit reward", {"accuracy": curve("accuracy")}),
                  ("implicit reward margin (chosen - rejected)", {"margin": curve("margin")})]
    else:
        label = "reward model (mean of samples)" if reward == "model" else "the oracle as reward (mean of samples)"
        scores = {label: curve("reward")}
        if "oracle" in history:
            scores["oracle score (the labelers' view)"] = curve("oracle")
        panels = [("reward vs oracle: the gap is reward hacking", scores),
                  ("KL(policy || SFT), nats per completion", {"KL": curve("kl")}),
                  ("diversity of the K samples of a prompt", {"distinct completions": curve("distinct"),
                                                              "distinct 2-grams": curve("distinct_2")})]
    plot_curves(path, panels)


if __name__ == "__main__":
    run_cli(main, Config, __doc__)
