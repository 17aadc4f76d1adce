"""
The one GPT that every stage trains or runs, and the plumbing the stages share.

    python model.py import_gpt2 FOLDER     # OpenAI's GPT-2 weights -> out/pretrain.pt

Read it in this order: the configuration, the model (attention, MLP, block, GPT), generation with a
KV cache, real GPT-2 weights, then the shared plumbing (device, checkpoints, command lines, progress).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from bpe import MESSAGE_PREFIX, Tokenizer, UsageError, render_chat, response_text

IGNORE_INDEX = -1  # a target with this value contributes nothing to the loss

# -----------------------------------------------------------------------------------------------
# The model: GPT-2's architecture, so that OpenAI's weights load and give GPT-2's logits, with one
# choice: how the model knows where a token is (see "Positions" below). Tokens are embedded, pass
# through n_layer identical blocks (each: LayerNorm -> causal self-attention -> add; LayerNorm -> MLP
# -> add) and a final LayerNorm; the output head reuses the token embedding matrix.

@dataclass
class GPTConfig:
    vocab_size: int = 1024    # token ids 0..vocab_size-1 (the tokenizer's size)
    block_size: int = 256     # the context: the most tokens the model ever sees at once
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128         # the width of the residual stream; n_embd / n_head per attention head
    dropout: float = 0.0      # 0 for pretraining on small data in few steps; 0.1 helps long runs overfit less
    scalar_head: bool = False  # add a linear head that reads one number (a reward or a value) per position
    reward_logprob_weight: float = 0.0  # reward.py: the reward adds this x the mean log-probability of the response
    positions: str = "rotary"  # "rotary" (RoPE, as LLaMA: attention sees distances) or "learned" (GPT-2's table)

    def __post_init__(self):
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) < 1:
            raise UsageError(f"every size in the model configuration must be at least 1: {self}")
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head}): "
                             "each head gets an equal slice of the width")
        if self.positions not in ("rotary", "learned"):
            raise UsageError(f"positions={self.positions!r}: expected 'rotary' or 'learned'")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise UsageError(f"rotary positions turn pairs of numbers, so a head needs an even size; "
                             f"n_embd / n_head is {self.n_embd // self.n_head}")


# --- Positions ---------------------------------------------------------------------------------
# Attention by itself does not know where a token is: shuffle the keys and it computes the same thing.
# GPT-2 adds a learned vector for each absolute position (0, 1, ..., block_size - 1) to the token's
# embedding. Rotary position embedding (RoPE: Su et al. 2021, used by LLaMA and most models since)
# instead turns each query and key by an angle proportional to its position: the head's numbers are
# taken in pairs, and pair i at position p is rotated by p * theta_i, with theta_i falling from 1 radian
# per token (pair 0) toward 1/10,000 (the last pair), fast and slow hands of a clock. Rotating a query by
# angle a and a key by angle b changes their dot product only through a - b, so attention sees how
# far back a key is, not where the page began. That is what the tiny world's documents need: "the
# digit four tokens back" or "the country named in this sentence" mean the same anywhere on a page,
# and a learned table must learn each such pattern again at every one of the 256 positions. Measured
# (README, pretraining): 0.51 bits per byte in the default 5.5 minutes against 0.60-0.69 with the table.

def rotary_angles(positions, head_size, base=10_000.0):
    """cos and sin of position * theta_i for every pair i of a head (theta_i = base^(-2i / head_size)).
    positions (T,) or (B, T) -> two tensors of shape (T, 1, head_size / 2) or (B, T, 1, head_size / 2),
    the 1 lining up with the heads."""
    theta = base ** (-torch.arange(0, head_size, 2, device=positions.device, dtype=torch.float32) / head_size)
    angles = positions.float()[..., None] * theta
    return angles.cos()[..., None, :], angles.sin()[..., None, :]


def rotate(x, cos, sin):
    """Turn pairs of x (B, T, n_head, head_size) by their angles. The pairs are (i, i + head_size / 2):
    which numbers pair up does not matter, so long as queries and keys pair them the same way."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class KVCache:
    """The keys and values of one layer for every token seen so far, in tensors allocated once for
    the whole generation: each new token writes its key and value in place instead of concatenating
    (which would copy the whole cache at every step)."""

    def __init__(self, max_length):
        self.max_length = max_length
        self.length = 0
        self.keys = self.values = None

    def append(self, keys, values):
        """Add (B, n_head, T, head_size) keys/values; return all of them so far."""
        if self.keys is None:  # allocated on first use, in the dtype the layer computes in (bf16 under autocast)
            shape = (keys.size(0), keys.size(1), self.max_length, keys.size(3))
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        end = self.length + keys.size(2)
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def keep_rows(self, rows):
        """Keep only these rows of the batch (the sequences still generating)."""
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


class CausalSelfAttention(nn.Module):
    """Each position looks back at itself and every earlier position: n_head heads in parallel,
    each with its own queries, keys and values of size n_embd / n_head."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # queries, keys, values in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)      # the heads' outputs mixed back together
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache=None, rotary=None):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3 * self.n_head, C // self.n_head)  # the heads' queries, keys, values
        qk, v = qkv[:, :, :2 * self.n_head], qkv[:, :, 2 * self.n_head:]
        if rotary is not None:  # queries and keys turned together, in one pass
            qk = rotate(qk, *(table.to(qk.dtype) for table in rotary))
        q, k = qk.transpose(1, 2).split(self.n_head, dim=1)  # (B, n_head, T, head_size)
        v = v.transpose(1, 2)
        if cache is not None:  # keys are cached turned: each keeps the angle of its own position
            k, v = cache.append(k, v)  # now the keys/values of every token so far, not just these T
        # Without a mask: T == 1 (one new token) sees every key. T > 1 comes only with no keys before
        # these T (training, or the prompt at the start of generation), and is_causal lets query i see
        # keys 0..i, which counts from the first key: T new tokens after a filled cache would need an
        # explicit mask. With left-padded prompts, `attn_mask` (True = may attend) also hides the padding.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Per position: widen 4x, GELU, narrow back. GPT-2 used the tanh approximation of GELU, so
    its weights need it too."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm (GPT-2's change from the original transformer): normalise the input of each
    sublayer, never the residual stream itself, so the identity path runs clean from the embedding
    to the output; gradients reach early layers undiminished, and deep stacks train stably."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, rotary=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embedding
        if config.positions == "learned":  # GPT-2's position table (rotary positions have no weights)
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (as GPT-2): the output head is the token embedding matrix itself, so a token's
        # logit is the dot product of the final hidden state with that token's embedding. It saves
        # vocab_size x n_embd parameters (38 M of GPT-2 small's 124 M), and a token that is rare as
        # an input still learns from every step in which it is a possible output.
        self.transformer.wte.weight = self.lm_head.weight
        # The reward model and the RLHF value head are this same GPT with one more linear layer that
        # reads a single number from the final hidden state.
        self.scalar_head = nn.Linear(config.n_embd, 1) if config.scalar_head else None
        self.apply(self._init_weights)
        # GPT-2's scaled initialisation: every block *adds* its attention and MLP outputs to the
        # residual stream, so with 2 * n_layer additions of independent random terms the stream's
        # variance would grow with depth. Shrinking the std of the two projections that write into
        # the stream by 1/sqrt(2 * n_layer) keeps the stream's scale the same at any depth.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self):
        """Parameters counted once (the tied embedding/head matrix is one matrix)."""
        return sum(parameter.numel() for parameter in self.parameters())

    def _transform(self, idx, positions=None, attn_mask=None, caches=None):
        """Token ids (B, T) -> final hidden states (B, T, n_embd), after the last LayerNorm."""
        if idx.size(1) > self.config.block_size and positions is None:
            raise UsageError(f"a sequence of {idx.size(1)} tokens is longer than the model's context "
                             f"(block_size {self.config.block_size}); cut it first")
        if positions is None:
            positions = torch.arange(idx.size(1), device=idx.device)
        x, rotary = self.transformer.wte(idx), None
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            rotary = rotary_angles(positions, self.config.n_embd // self.config.n_head)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, None if caches is None else caches[layer], rotary)
        return self.transformer.ln_f(x)

    def hidden_states(self, idx):
        """The final hidden states (B, T, n_embd): what the output head and the scalar head read."""
        return self._transform(idx)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None). The loss is the mean
        cross-entropy over the targets that are not IGNORE_INDEX (SFT masks out everything but the
        assistant's tokens); a batch with every target masked gives a loss of 0, not NaN."""
        logits = self.lm_head(self._transform(idx))
        if targets is None:
            return logits, None
        total = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        # The mean divides by the number of targets that count; clamp so that none counting is 0/1.
        return logits, total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def scalar(self, idx, positions):
        """One number per sequence: the scalar head applied to the hidden state at positions[b] of
        sequence b (e.g. where its <|reward|> token is). Returns a (B,) tensor."""
        if self.scalar_head is None:
            raise UsageError("this model has no scalar head (build it with GPTConfig(scalar_head=True))")
        hidden = self.hidden_states(idx)
        positions = torch.as_tensor(positions, device=idx.device)
        rows = torch.arange(idx.size(0), device=idx.device)
        return self.scalar_head(hidden[rows, positions]).squeeze(-1)

    def configure_optimizer(self, learning_rate, weight_decay=0.1, betas=(0.9, 0.95), own_rates=None):
        """AdamW that decays matrices (matmul weights, embeddings) but not biases and LayerNorm
        gains: decay pulls weights toward 0, which regularises a matrix but would only fight the
        scale a gain or bias is there to set. Frozen parameters (requires_grad False) are left out.
        own_rates {name prefix: learning rate} puts the parameters whose names start with a prefix in
        a group of their own, at that rate and not decayed (rlhf.py: the final LayerNorm)."""
        own_rates = own_rates or {}
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        shared = [p for name, p in named if not name.startswith(tuple(own_rates))]
        groups = [{"params": [p for p in shared if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in shared if p.dim() < 2], "weight_decay": 0.0}]
        groups += [{"params": [p for name, p in named if name.startswith(prefix)], "lr": rate, "weight_decay": 0.0}
                   for prefix, rate in own_rates.items()]
        try:  # the fused kernel updates all parameters in one pass; torch < 2.4 has it on CUDA only
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
        except RuntimeError:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    # --- Generation ------------------------------------------------------------------------------
    # Prompts of different lengths are left-padded to one length, so that every sequence's next
    # token goes into the same column and one forward pass per step serves the whole batch. Each
    # sequence gets its own position ids (its first real token is position 0) and an attention mask
    # that hides its padding, so its tokens are exactly those it would get alone. The KV cache keeps
    # every layer's keys and values, so each step runs the model on one new token per sequence
    # instead of the whole sequence again.

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                 seed=None, logits_hook=None, on_token=None, use_cache=True):
        """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; returns one
        Generation per prompt, in order.

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to
        the top_k most likely tokens and/or the smallest set whose probability reaches top_p. A
        sequence ends at its first token in stop_tokens (kept in its tokens), after max_new_tokens,
        or when it fills the context (block_size). seed makes sampling repeatable without touching
        torch's global random state. logits_hook(step, new_tokens_so_far, logits) -> logits may edit
        the (B, vocab) logits before choosing (e.g. -inf for forbidden tokens); new_tokens_so_far[b]
        is the list of tokens sequence b has generated so far (read it, do not change it).
        on_token(b, token) is called for each token as it is generated (streaming).
        use_cache=False recomputes the whole sequence at every step (slow; for tests and benchmarks).
        """
        _check_sampling(prompts, self.config, max_new_tokens, temperature, top_k, top_p)
        device = self.lm_head.weight.device
        lengths = [len(prompt) for prompt in prompts]
        budgets = [min(max_new_tokens, self.config.block_size - length) for length in lengths]
        batch, longest, steps = len(prompts), max(lengths, default=0), max(budgets, default=0)
        if steps <= 0:
            return [Generation([], [], False) for _ in prompts]

        # The whole batch's token grid, left-padded (padding slots hold token 0 and are never attended to).
        width = longest + steps
        padding = torch.tensor([longest - length for length in lengths], device=device)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, dtype=torch.long)
        tokens = tokens.to(device)  # one copy to the device, not one per prompt
        slots = torch.arange(width, device=device)
        # Position ids: each sequence counts from its first real token. A sequence that has filled
        # the context is finished, but still rides along in the batch: clamp so it indexes nothing
        # past the position table (whatever it computes then is thrown away).
        positions = (slots[None, :] - padding[:, None]).clamp(0, self.config.block_size - 1)
        real = slots[None, :] >= padding[:, None]                      # (B, width) False on padding
        padded = bool((padding > 0).any())  # without padding, no mask: plain causal attention, faster

        caches = [KVCache(width) for _ in self.transformer.h] if use_cache else None
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        stop_set = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        so_far = [[] for _ in prompts] if logits_hook is not None else None
        # The working batch: row r computes sequence rows[r]. Finished sequences leave it (with their
        # rows of the cache) once they are a quarter of it: sampled answers differ in length (in an RL
        # batch most end within 20 tokens and a few ramble on to the limit), and otherwise every step
        # would go on computing all of them. A logits_hook may keep state per row of the logits it is
        # shown, so with one, the rows stay.
        rows = torch.arange(batch, device=device)
        budget = torch.tensor(budgets, device=device)
        new_tokens = torch.zeros(batch, steps, dtype=torch.long, device=device)
        new_logprobs = torch.zeros(batch, steps, device=device)
        produced = torch.zeros(batch, dtype=torch.long, device=device)  # tokens each row has made
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        done = budget <= 0
        results = [None] * batch  # each sequence's Generation, filed when its row leaves or at the end

        def file_results(leaving):   # leaving: indices into the working batch as it is at the call
            for sequence, chosen, logprobs, count, stop in zip(
                    rows[leaving].tolist(), new_tokens[leaving].tolist(), new_logprobs[leaving].tolist(),
                    produced[leaving].tolist(), stopped[leaving].tolist()):
                results[sequence] = Generation(chosen[:count], logprobs[:count], stop)

        was_training = self.training
        self.eval()  # no dropout while generating; restored below (RLHF generates mid-training)
        try:
            logits = self._next_logits(tokens, positions, real if padded else None, caches, 0, longest)
            for step in range(steps):
                raw = logits.float()
                chosen = raw if logits_hook is None else logits_hook(step, so_far, raw.clone())
                next_token = sample_next(chosen, temperature, top_k, top_p, generator)
                new_tokens[:, step] = next_token
                # The model's own log-probability of the token (before temperature, top-k/p, hook):
                # what RLHF's policy gradient and KL penalty need.
                new_logprobs[:, step] = raw.log_softmax(dim=-1).gather(1, next_token[:, None]).squeeze(1)
                active = ~done
                produced += active
                stopped |= active & torch.isin(next_token, stop_set)
                done = done | stopped | (produced >= budget)
                if on_token is not None or so_far is not None:
                    self._report_tokens(rows.tolist(), next_token.tolist(), active.tolist(), so_far, on_token)
                finished = int(done.sum())
                if finished == len(done):
                    break
                slot = longest + step
                tokens[:, slot] = next_token
                if logits_hook is None and 4 * finished >= len(done):
                    file_results(done.nonzero().squeeze(1))
                    keep = (~done).nonzero().squeeze(1)
                    rows, tokens, positions, real = rows[keep], tokens[keep], positions[keep], real[keep]
                    new_tokens, new_logprobs, budget = new_tokens[keep], new_logprobs[keep], budget[keep]
                    produced, stopped, done = produced[keep], stopped[keep], done[keep]
                    for cache in caches or ():
                        cache.keep_rows(keep)
                logits = self._next_logits(tokens, positions, real if padded else None, caches, slot, slot + 1)
        finally:
            self.train(was_training)
        file_results(torch.arange(len(rows), device=device))
        return results

    def _next_logits(self, tokens, positions, real, caches, start, end):
        """Logits (B, vocab) for the token after slot end-1. With caches, slots [start, end) are the
        ones not yet in the cache; without, the whole sequence [0, end) is run again."""
        if caches is None:
            start = 0
        mask = None
        if real is not None:  # some prompts are padded: hide padding from every query
            if end - start == 1:
                mask = real[:, None, None, :end]  # one new token: it may see every real slot so far
            else:
                mask = _prompt_mask(real, start, end)
        hidden = self._transform(tokens[:, start:end], positions[:, start:end], mask, caches)
        return self.lm_head(hidden[:, -1])

    @staticmethod
    def _report_tokens(row_list, token_list, active_list, so_far, on_token):
        for row, token, active in zip(row_list, token_list, active_list):
            if active:
                if so_far is not None:
                    so_far[row].append(token)
                if on_token is not None:
                    on_token(row, token)

    # --- Real GPT-2 weights ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder):
        """A Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) -> GPT
        with OpenAI's weights. Nothing is downloaded: the files must already be in the folder. The
        tokenizer comes separately, from bpe.Tokenizer.from_gpt2_files (see import_gpt2)."""
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise UsageError(f"{folder}: no config.json; put GPT-2's config.json and model.safetensors "
                             "(or pytorch_model.bin) from Hugging Face in that folder")
        try:
            with open(config_path, encoding="utf-8") as file:
                settings = json.load(file)
            if settings.get("model_type", "gpt2") != "gpt2":
                raise UsageError(f"{config_path}: model_type is {settings['model_type']!r}; only GPT-2 fits this model")
            config = GPTConfig(vocab_size=settings["vocab_size"], n_layer=settings["n_layer"],
                               n_head=settings["n_head"], n_embd=settings["n_embd"], positions="learned",
                               block_size=settings.get("n_positions", settings.get("n_ctx", 1024)))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UsageError(f"{config_path}: not a JSON object") from None
        except KeyError as error:
            raise UsageError(f"{config_path}: no {error.args[0]!r}; is this a GPT-2 config.json?") from None
        except TypeError:   # a size that is not a number
            raise UsageError(f"{config_path}: vocab_size, n_layer, n_head, n_embd and n_positions must be "
                             f"whole numbers") from None
        safetensors_path = os.path.join(folder, "model.safetensors")
        pickle_path = os.path.join(folder, "pytorch_model.bin")
        if os.path.isfile(safetensors_path):
            weights = read_safetensors(safetensors_path)
        elif os.path.isfile(pickle_path):
            try:  # weights_only: a .bin is a pickle, and we refuse to run whatever code it might hold
                weights = torch.load(pickle_path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise UsageError(f"{pickle_path} is damaged or not plain weights ({type(error).__name__})") from None
            if not isinstance(weights, dict):
                raise UsageError(f"{pickle_path} holds a {type(weights).__name__}, not a state dict of named tensors")
        else:
            raise UsageError(f"{folder}: no model.safetensors or pytorch_model.bin beside config.json")
        model = cls(config)
        try:
            model.load_state_dict(gpt2_state_dict(weights))
        except RuntimeError as error:
            reason = " ".join(str(error).split())[:200]
            raise UsageError(f"{folder}: the weights do not fit its config.json ({reason})") from None
        return model


@dataclass
class Generation:
    tokens: list       # the new tokens only; ends with the stop token if one ended it
    logprobs: list     # log_softmax(model's logits) of each new token, before temperature/top-k/top-p/hook
    stopped: bool      # True iff it ended on a stop token (False: max_new_tokens or the context ran out)


def _check_sampling(prompts, config, max_new_tokens, temperature, top_k, top_p):
    for number, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= config.block_size:
            raise UsageError(f"prompt {number} has {len(prompt)} tokens; it needs 1 to {config.block_size} (the context)")
        if not 0 <= min(prompt) <= max(prompt) < config.vocab_size:
            raise UsageError(f"prompt {number} has a token id outside the vocabulary (0 to {config.vocab_size - 1}); "
                             "was it encoded with this model's tokenizer?")
    if max_new_tokens < 0 or temperature < 0:
        raise UsageError("max_new_tokens and temperature must not be negative")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k={top_k}: keep at least 1 token (or None for all)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top_p={top_p}: expected a probability in (0, 1] (or None for all)")


def _prompt_mask(real, start, end):
    """Attention mask (B, 1, end-start, end) for query slots [start, end) over key slots [0, end):
    a query sees keys at or before it that are real tokens. A padding slot also sees itself, so no
    row of the softmax is all -inf (that would be NaN); nothing ever reads a padding slot's output."""
    queries = torch.arange(start, end, device=real.device)[:, None]
    keys = torch.arange(end, device=real.device)[None, :]
    allowed = ((keys <= queries)[None] & real[:, None, :end]) | (keys == queries)[None]
    return allowed[:, None]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """(B, vocab) logits -> (B,) chosen token ids: greedy at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling: keep the most likely tokens until their total reaches top_p; a token is
        # dropped when the tokens ranked above it already hold top_p (the most likely always stays).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_above >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return draw_from(probs, generator)


def draw_from(probs, generator=None):
    """(B, vocab) probabilities -> (B,) token ids, each drawn with its probability: one uniform number u
    per row, and the token whose interval of the running total holds u (inverse transform sampling).
    torch.multinomial does the same job but draws a random number for every token of the vocabulary
    (`python bench.py model` on a 2-core CPU: 0.6 ms for 16 rows of 1,024 tokens, a sixth of a
    decoding step of the default model; this takes 0.1 ms)."""
    totals = probs.cumsum(dim=-1)
    total = totals[:, -1:].contiguous()   # (B, 1): 1 up to rounding
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=totals.dtype) * total
    # right=True: the first token whose running total exceeds u, so a token of probability 0 (an empty
    # interval) is never chosen; the clamp catches u rounding up to the total, and keeps to the last
    # token with probability > 0 (where the running total first reaches the total)
    last = torch.searchsorted(totals, total)
    return torch.searchsorted(totals, u, right=True).clamp(max=last).squeeze(-1)


# -----------------------------------------------------------------------------------------------
# Reading GPT-2's files

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}. The format is simple enough to read by hand: 8 bytes
    (a little-endian unsigned integer) giving the header's length in bytes; the header, JSON that
    maps each tensor name to its dtype, shape and [begin, end) byte offsets into the data; then the
    data, raw little-endian numbers. Unlike a pickle, reading it never runs code."""
    if sys.byteorder != "little":
        raise UsageError(f"{path}: reading safetensors needs a little-endian machine")

    def damaged(why):
        return UsageError(f"{path} is damaged or not a safetensors file ({why})")

    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise damaged("shorter than 8 bytes")
        header_length = int.from_bytes(prefix, "little")
        if header_length > file_size - 8:
            raise damaged("its header would run past the end of the file")
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise damaged("its header is not JSON") from None
        if not isinstance(header, dict):
            raise damaged("its header is not a JSON object")
        data_start = 8 + header_length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":  # free-form strings (e.g. {"format": "pt"})
                continue
            try:
                dtype_name, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise damaged(f"tensor {name!r} has no dtype, shape and data_offsets") from None
            if dtype_name not in SAFETENSORS_DTYPES:
                raise UsageError(f"{path}: tensor {name!r} has dtype {dtype_name}, which this reader does not know")
            dtype = SAFETENSORS_DTYPES[dtype_name]
            expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if not (0 <= begin <= end and end - begin == expected and data_start + end <= file_size):
                raise damaged(f"tensor {name!r}: its offsets do not match its shape or the file's size")
            file.seek(data_start + begin)
            data = bytearray(expected)
            file.readinto(data)
            tensor = torch.frombuffer(data, dtype=dtype) if expected else torch.empty(0, dtype=dtype)
            tensors[name] = tensor.reshape(shape)
    return tensors


# GPT-2 was written with "Conv1D" layers, which are linear layers storing their weight as
# (in, out); nn.Linear stores (out, in), so these four are transposed on the way in.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_dict(weights):
    """Hugging Face GPT-2 tensor names and layouts -> this GPT's state dict (float32)."""
    state = {}
    for name, tensor in weights.items():
        name = name.removeprefix("transformer.")  # GPT2LMHeadModel's prefix; GPT2Model's files lack it
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # stored causal masks (SDPA makes its own), and the head, which is tied to wte
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state["transformer." + name] = tensor.float().contiguous()
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def grow_vocabulary(model, vocab_size):
    """Give the model embedding rows for token ids it has never seen (our special tokens, which
    come after GPT-2's 50,257). Each new row starts as the mean of the existing rows: a typical
    vector whose logit starts near the average token's, so the new tokens neither take over
    sampling nor start impossibly unlikely; SFT then teaches them their meaning."""
    old = model.transformer.wte.weight.data
    extra = vocab_size - old.size(0)
    if extra <= 0:
        return model
    grown = torch.cat([old, old.mean(dim=0, keepdim=True).expand(extra, -1)])
    model.transformer.wte = nn.Embedding(vocab_size, old.size(1))
    model.lm_head = nn.Linear(old.size(1), vocab_size, bias=False)
    model.lm_head.weight = nn.Parameter(grown)
    model.transformer.wte.weight = model.lm_head.weight  # still tied
    model.config.vocab_size = vocab_size
    return model


def import_gpt2(folder, out=os.path.join("out", "pretrain.pt")):
    """GPT-2's Hugging Face folder -> a pretrain-stage checkpoint (weights + tokenizer) that sft.py
    picks up like one pretrain.py wrote."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder; put GPT-2's files from Hugging Face (config.json, "
                         "model.safetensors, vocab.json, merges.txt) in a folder and name it")
    pairs = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]  # Hugging Face's names, OpenAI's
    found = [(os.path.join(folder, a), os.path.join(folder, b)) for a, b in pairs
             if os.path.isfile(os.path.join(folder, a)) and os.path.isfile(os.path.join(folder, b))]
    if not found:
        raise UsageError(f"{folder}: no tokenizer files; put GPT-2's vocab.json and merges.txt "
                         "(or encoder.json and vocab.bpe) beside config.json")
    tokenizer = Tokenizer.from_gpt2_files(*found[0])
    model = GPT.from_pretrained(folder)
    grow_vocabulary(model, tokenizer.vocab_size)
    metrics = {"parameters": model.num_parameters()}
    save_checkpoint(out, stage="pretrain", model=model, tokenizer=tokenizer,
                    parent={"path": os.path.abspath(folder), "stage": "gpt2"},
                    args={"command": "import_gpt2", "folder": folder, "out": out}, metrics=metrics)
    print(f"wrote {out}: GPT-2 with {metrics['parameters']:,} parameters, vocabulary {tokenizer.vocab_size}")
    return out



# -----------------------------------------------------------------------------------------------
# Plumbing shared by every stage: device, checkpoints, files, command lines, progress.

STAGE_SCRIPTS = {"pretrain": "pretrain.py", "sft": "sft.py", "reward": "reward.py", "rlhf": "rlhf.py"}
CHAT_TRAINED_STAGES = ("sft", "reward", "rlhf")   # the stages trained on rendered chats


def choose_device(name="auto"):
    """'auto' picks the fastest device present: a CUDA GPU, then Apple's MPS, then the CPU."""
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UsageError("--device mps: MPS is not available here; use --device cpu or auto")
        if name.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise UsageError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def native_bfloat16(device):
    """Whether the device multiplies bfloat16 matrices in hardware: a CUDA GPU, or a CPU with AVX-512 BF16
    or AMX (torch's own checks, which are private: any failure reads as no)."""
    device_type = str(device).split(":")[0]
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


def training_dtype(device, dtype="auto"):
    """The training scripts' --dtype: "auto" runs the matrix products in bfloat16 where the hardware does
    them natively (native_bfloat16) and in float32 elsewhere, where bf16 would be emulated and slower.
    Measured on the 2-core AMD EPYC (AVX-512 BF16) this was built on: pretraining's step 1.67x faster,
    SFT's 1.3x, the loss per step the same (README, "Speed")."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bfloat16(device) else "float32"


def autocast(device, dtype="auto"):
    """Mixed precision: matrix products in bfloat16 while weights and optimizer state stay fp32.
    "auto" turns it on on CUDA and off elsewhere. "bfloat16" turns it on on a CPU too, which pays
    where the CPU has bf16 matrix instructions (AVX-512 BF16, AMX: bench.py model measures 2.5x on
    the small model) and costs where it has none (bf16 is then emulated). "float32" turns it off.
    (The training scripts pass the dtype training_dtype resolved, whose "auto" also picks bf16 on a CPU
    with native bf16; generation and evaluation call autocast(device) with this narrower "auto".)"""
    device_type = str(device).split(":")[0]
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    if dtype == "float32" or device_type == "mps":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def full_precision(device):
    """Turn an enclosing autocast off: for the few small products whose exact values matter more than
    their speed (a reward model's rankings hang on differences bf16's 8-bit mantissa can blur)."""
    device_type = str(device).split(":")[0]
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def map_batches(model, answer_batch, count, batch_size):
    """Answers to `count` items in batches: answer_batch(start) generates with `model` for items start to
    start + batch_size - 1 and returns a list; the lists come back joined, in order. On a CPU the
    batches are computed side by side.

    A generation step of a small model is a few small matrix products: split over a CPU's cores, each
    gains little, since the cores mostly wait for one another. But torch lets go of Python's lock while
    it computes, so whole batches on threads of their own, one core each, do overlap. `python bench.py
    sampling` on the 2-core machine: 1.33x one thread's tokens/s with both cores sharing each product,
    1.85x with two batches side by side (reward.py's sampling: 126 s one thread at a time, 76 s side by
    side). Each batch must stand alone (its own seed, nothing shared that it writes), and then the
    answers are exactly those of one batch after another. At most 4 threads: past a few, the Python
    between the products (which runs one thread at a time) is the limit, and every thread holds a
    batch's KV cache. On a GPU, one batch after another: the GPU already computes a batch in parallel."""
    starts = range(0, count, batch_size)
    threads = torch.get_num_threads()
    workers = min(threads, 4, len(starts))
    if next(model.parameters()).device.type != "cpu" or workers < 2:
        return [answer for start in starts for answer in answer_batch(start)]

    def one_core(start):
        torch.set_num_threads(1)
        return answer_batch(start)
    was_training = model.training
    model.eval()   # once, for all threads: generate's own eval()/train() would race between them
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return [answer for batch in pool.map(one_core, starts) for answer in batch]
    finally:
        torch.set_num_threads(threads)   # (in case this torch's thread count is shared by all threads)
        model.train(was_training)


class StopRequest:
    """Ctrl-C asks training to stop after the current step (a step cut in half would leave the weights
    half-updated); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        except ValueError:  # not the main thread (a notebook worker, say): Ctrl-C behaves as usual
            self.previous = None
        return self

    def handle(self, number, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without saving) ...", file=sys.stderr)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def set_seed(seed):
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same folder as `path`; on success move it over `path` in one
    step (os.replace). A crash or Ctrl-C mid-write leaves the old file untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder: give a file name in it instead")
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as error:
        raise UsageError(f"cannot write to {folder}: {error.strerror}; choose another place") from None
    os.close(handle)
    try:
        yield temporary
        with open(temporary, "rb") as written:   # on disk before it takes the old file's place
            os.fsync(written.fileno())
        # mkstemp makes the file private (0600); give it the mode an ordinary new file would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def check_out_dir(out_dir):
    """Fail now, not after minutes of training, if the results could not be saved."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # a private file: processes of one run do not collide
            pass
    except OSError as error:
        raise UsageError(f"--out_dir {out_dir}: cannot write there ({error.strerror}); choose another") from None


def read_text(path):
    """A UTF-8 text file's contents; anything else (a checkpoint, a Latin-1 file) is a one-line error."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (bad byte at offset {error.start}); convert it to UTF-8 first") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None


def write_json(path, data):
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")


def read_jsonl(path):
    """Read a JSON-lines file into [(line_number, record), ...]; blank lines are skipped. A line that
    is not a JSON object is an error that names FILE:LINE."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    records = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path}:{number}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise UsageError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                records.append((number, record))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    if not records:
        raise UsageError(f"{path}: the file has no records")
    return records


# --- Checkpoints -------------------------------------------------------------------------------
# One file per stage, holding only tensors and plain Python containers, so that it can be loaded
# with weights_only=True: loading a checkpoint never runs code hidden inside it.

def save_checkpoint(path, *, stage, model, tokenizer, parent=None, args=None, metrics=None, extra=None):
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)     # unwrap DistributedDataParallel
    checkpoint = {
        "stage": stage,
        "model_config": dataclasses.asdict(model.config),
        "model": _cpu_state_dict(model),
        "tokenizer": tokenizer.to_dict(),
        "parent": parent,
        "args": _plain(args),
        "metrics": _plain(metrics),
        "message_prefix": MESSAGE_PREFIX,   # how render_chat rendered the chats it was trained on
    }
    checkpoint.update(extra or {})
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


def _cpu_state_dict(model):
    """The weights on the CPU. Tensors shared in the model (the tied embedding and output head) stay
    shared, so the file holds them once."""
    copies = {}
    return {name: copies.setdefault(tensor.data_ptr(), tensor.detach().cpu())
            for name, tensor in model.state_dict().items()}


def _plain(value):
    """Configs may be dataclasses; checkpoints keep plain dicts."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def check_resume_options(path, checkpoint, config, names):
    """A resumed run must take the options that decide its steps as the run it continues did: refuse,
    naming the first that differs, any of `names` that the checkpoint's args hold with another value."""
    saved = checkpoint.get("args") or {}
    for name in names:
        if name in saved and saved[name] != getattr(config, name):
            shown = " ".join(map(str, saved[name])) if isinstance(saved[name], list) else saved[name]
            raise UsageError(f"{path} was trained with --{name} {shown}; resume with the same option "
                             f"(or start afresh without --resume)")


def load_checkpoint(path, stages=None):
    """Load and check a checkpoint. `stages` is the stage (or tuple of stages) the caller accepts."""
    stages = (stages,) if isinstance(stages, str) else stages
    if os.path.isdir(path):
        example = os.path.join(path, f"{stages[-1]}.pt" if stages else "sft.pt")
        raise UsageError(f"{path} is a folder: pass a checkpoint file, such as {example}")
    if not os.path.isfile(path):
        if stages:
            script = STAGE_SCRIPTS.get(stages[0], "the previous stage")
            raise UsageError(f"{path} not found: run `python {script}` first (or pass the right path)")
        raise UsageError(f"{path} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds here: a zip error, an unpickling error, EOF
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise UsageError(f"{path} is damaged or not a checkpoint ({reason}); delete it and run its stage again") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path} is not a checkpoint of this project (it holds a {type(checkpoint).__name__})")
    missing = [key for key in ("stage", "model_config", "model", "tokenizer") if key not in checkpoint]
    if missing:
        raise UsageError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)})")
    if stages and checkpoint["stage"] not in stages:
        raise UsageError(f"{path} is a '{checkpoint['stage']}' checkpoint, but this needs "
                         f"{' or '.join(repr(s) for s in stages)}")
    if checkpoint["stage"] in CHAT_TRAINED_STAGES and checkpoint.get("message_prefix") != MESSAGE_PREFIX:
        print(f"warning: {path} was trained on chats rendered without the space that render_chat now puts "
              f"before every message; its answers will be worse: run sft.py and the later stages again",
              file=sys.stderr)
    # Checkpoints from before the choice of positions existed all have GPT-2's learned table.
    checkpoint["model_config"].setdefault("positions", "learned")
    vocab_size = checkpoint["model_config"].get("vocab_size")
    tokenizer_size = _tokenizer_size(checkpoint["tokenizer"])
    if tokenizer_size is not None and vocab_size is not None and tokenizer_size > vocab_size:
        raise UsageError(f"{path}: its tokenizer has {tokenizer_size} tokens but its model only "
                         f"{vocab_size}; the checkpoint mixes a model and a tokenizer that do not belong together")
    return checkpoint


def _tokenizer_size(tokenizer_dict):
    try:
        return Tokenizer.from_dict(tokenizer_dict).vocab_size
    except Exception:
        return None


def load_model(path, stages=None, device="cpu"):
    """Checkpoint -> (GPT in eval mode on `device`, Tokenizer, the checkpoint dict)."""
    checkpoint = load_checkpoint(path, stages)
    try:
        tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
        config = GPTConfig(**checkpoint["model_config"])
        model = GPT(config)
        model.load_state_dict(checkpoint["model"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:160]
        raise UsageError(f"{path}: the weights do not fit the model it describes ({reason})") from None
    model.to(device).eval()
    return model, tokenizer, checkpoint


def check_same_tokenizer(path_a, tokenizer_a, path_b, tokenizer_b):
    """Two checkpoints that exchange token ids (policy and reward model) must share one tokenizer."""
    if tokenizer_a.to_dict() != tokenizer_b.to_dict():
        raise UsageError(f"{path_a} and {path_b} use different tokenizers: retrain {path_b} from {path_a}'s lineage")


# --- Command lines -----------------------------------------------------------------------------
# Each stage describes its options once, as a dataclass `Config`: a notebook builds Config(...) and
# calls main(config); the command line is generated from the same fields, so both always agree.

def _parse_bool(text):
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def check_options(config, positive=(), not_negative=(), fractions=()):
    """A value no run could use stops the stage at once, in one line naming the option, instead of a
    traceback from deep inside torch after minutes of work. fractions: in [0, 1)."""
    for name in positive:
        if getattr(config, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(config, name)}")
    for name in not_negative:
        if getattr(config, name) < 0:
            raise UsageError(f"--{name} must not be negative, got {getattr(config, name)}")
    for name in fractions:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise UsageError(f"--{name} must be at least 0 and below 1, got {getattr(config, name)}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistyped option or value is one line that says where the options are listed,
    not twenty lines of usage with the error last."""

    def error(self, message):
        command = self.prog if self.prog.startswith("python") else f"python {self.prog}"
        self.exit(2, f"error: {message} (`{command} --help` lists the options)\n")


def build_parser(config_class, description=""):
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        if "(default" not in help_text:
            help_text = f"{help_text} (default: {default})"
        # argparse %-formats help strings: a literal % must be doubled
        options = dict(default=default, help=help_text.replace("%", "%%"), choices=field.metadata.get("choices"))
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if kind is bool:
            parser.add_argument(f"--{field.name}", type=_parse_bool, nargs="?", const=True, metavar="BOOL", **options)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parser.add_argument(f"--{field.name}", type=item, nargs="*", **options)
        else:
            parser.add_argument(f"--{field.name}", type=kind, **options)
    return parser


def parse_config(config_class, argv=None, description=""):
    arguments = build_parser(config_class, description).parse_args(argv)
    return config_class(**vars(arguments))


def run_cli(main, config_class, description=""):
    """The command-line entry of a stage: options -> Config -> main(config). A UsageError is printed
    as one line (no traceback) and exits with status 2."""
    config = parse_config(config_class, description=description)
    try:
        main(config)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# --- Progress ----------------------------------------------------------------------------------

class Progress:
    """One status line that rewrites itself: step, loss, tokens/s and time left. Time left comes
    from whichever budget ends first: the steps (max_iters) or the wall clock (max_seconds)."""

    def __init__(self, total_steps, max_seconds=None, prefix=""):
        self.total_steps, self.max_seconds, self.prefix = total_steps, max_seconds, prefix
        self.start = time.time()
        self.tokens = 0
        self.last_print = 0.0
        self.interactive = sys.stderr.isatty()

    def update(self, step, tokens=0, force=False, **values):
        self.tokens += tokens
        now = time.time()
        if not force and now - self.last_print < (0.2 if self.interactive else 10.0):
            return
        self.last_print = now
        elapsed = now - self.start
        done = max(step, 1) / max(self.total_steps, 1)
        left = elapsed / done - elapsed
        if self.max_seconds:
            left = min(left, max(self.max_seconds - elapsed, 0.0))
        shown = " | ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                           for key, value in values.items())
        line = (f"{self.prefix}step {step}/{self.total_steps} | {shown} | "
                f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s | {elapsed:.0f}s, ~{left:.0f}s left")
        end = "\r" if self.interactive else "\n"
        print(line.ljust(100) if self.interactive else line, end=end, file=sys.stderr, flush=True)

    def close(self):
        if self.interactive:
            print(file=sys.stderr)


def plot_curves(path, panels):
    """Save line plots side by side. panels: [(title, {label: (xs, ys)}), ...]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels):
        for label, (xs, ys) in lines.items():
            axis.plot(xs, ys, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend()
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


# --- Chat -------------------------------------------------------------------------------------

def answer_stops(tokenizer):
    """The tokens that end an assistant's answer: <|end|>, and <|endoftext|> from a model that drifts
    back into writing documents."""
    return (tokenizer.special_tokens["<|end|>"], tokenizer.special_tokens["<|endoftext|>"])


def by_length(sequences, rows):
    """Groups of at most `rows` indices of sequences of similar length: a batch is as long as its longest
    row, so grouping long with long and short with short wastes less work on padding."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [order[start:start + rows] for start in range(0, len(order), rows)]


def prompt_room(block_size, max_new_tokens):
    """How many tokens of prompt to keep: the context less room for the answer, but never less than half
    the context (an answer allowed to run to the end of the context, as a worked addition may, must still
    see its question). Generation stops at the end of the context anyway."""
    return max(block_size - min(max_new_tokens, block_size // 2), 1)


def cut_prompt(ids, room):
    """A rendered prompt of at most `room` tokens: its end (where the question is), behind its first
    token, the <|user|> that opens the turn, so a cut prompt still reads as a turn."""
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]


def chat_responses(model, tokenizer, prompts, temperature=0.0, max_new_tokens=128, seed=None,
                   batch_size=64, top_k=None, top_p=None):
    """Answer each prompt as a one-turn chat; returns the assistant's text (up to its answer_stops).
    Prompts too long for the context keep their last tokens (the question is at the end)."""
    stops = answer_stops(tokenizer)
    keep = prompt_room(model.config.block_size, max_new_tokens)
    rendered = []
    for prompt in prompts:
        ids, _ = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        rendered.append(cut_prompt(ids, keep))

    def answer(start):   # one batch, seeded by where it starts: the same answers however batches are run
        generations = model.generate(rendered[start:start + batch_size], max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, stop_tokens=stops,
                                     seed=None if seed is None else seed + start)
        return [response_text(tokenizer, g.tokens[:-1] if g.stopped else g.tokens) for g in generations]
    return map_batches(model, answer, len(rendered), batch_size)


# --- This file's own command line ----------------------------------------------------------------

def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import_gpt2", help="Hugging Face GPT-2 folder -> pretrain-stage checkpoint")
    importer.add_argument("folder", help="folder with config.json, model.safetensors (or pytorch_model.bin), "
                                         "vocab.json and merges.txt (or encoder.json and vocab.bpe)")
    importer.add_argument("--out", default=os.path.join("out", "pretrain.pt"), help="checkpoint to write")
    args = parser.parse_args(argv)
    try:
        import_gpt2(args.folder, args.out)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
