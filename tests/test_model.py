"""model.py: the GPT against reference computations, generation with and without the KV cache,
checkpoints and their error paths, and reading GPT-2's files."""

import json
import math
import os
import re
import struct
import sys

import pytest
import torch
from torch.nn import functional as F

from model import (GPT, IGNORE_INDEX, GPTConfig, UsageError, atomic_path, check_options, draw_from, gpt2_state_dict,
                   import_gpt2, load_checkpoint, load_model, parse_config, read_safetensors, rotary_angles, rotate,
                   sample_next, save_checkpoint)

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16)


def lively_model(seed=0, **overrides):
    """A random GPT whose greedy choices vary from token to token. (An untrained GPT with tied
    embeddings mostly repeats its last token, which would make generation tests too easy.)"""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # strong positions make the choice move along the sequence: a learned table, or for rotary
            # positions, which act through the queries and keys, strong attention
            if parameter.dim() >= 2:
                rotary_attention = "c_attn" in name and model.config.positions == "rotary"
                parameter.normal_(0.0, 2.0 if "wpe" in name else 0.8 if rotary_attention else 0.4)
    return model.eval()


# --- the architecture ------------------------------------------------------------------------------

def reference_rotation(x, positions):
    """Rotary positions written another way: pair (i, i + D/2) of a head as the complex number
    x_i + j x_(i+D/2), multiplied by e^(j p theta_i) at position p. x (B, n_head, T, D)."""
    D = x.size(-1)
    theta = 10_000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(len(positions), D // 2, dtype=torch.float64), positions[:, None].double() * theta)
    pairs = torch.complex(x[..., :D // 2], x[..., D // 2:]) * turn
    return torch.cat([pairs.real, pairs.imag], dim=-1)


def reference_block(block, x, n_head, rotary=False):
    """One GPT-2 block written out in plain tensor operations, independent of the module's code
    (rotary=True: queries and keys turned by their positions 0..T-1 first)."""
    def layer_norm(h, norm):
        mean = h.mean(-1, keepdim=True)
        variance = ((h - mean) ** 2).mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(variance + 1e-5) * norm.weight + norm.bias

    def linear(h, layer):
        return h @ layer.weight.T + layer.bias

    B, T, C = x.shape
    D = C // n_head
    qkv = linear(layer_norm(x, block.ln_1), block.attn.c_attn)
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_head, D).permute(0, 2, 1, 3) for i in range(3))
    if rotary:
        q, k = reference_rotation(q, torch.arange(T)), reference_rotation(k, torch.arange(T))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    attended = (weights @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    x = x + linear(attended, block.attn.c_proj)
    hidden = linear(layer_norm(x, block.ln_2), block.mlp.c_fc)
    gelu = 0.5 * hidden * (1 + torch.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden ** 3)))
    return x + linear(gelu, block.mlp.c_proj)


def test_one_block_equals_a_reference_computation():
    model = lively_model().double()
    x = torch.randn(3, 7, TINY["n_embd"], dtype=torch.float64)
    block = model.transformer.h[0]
    assert torch.allclose(block(x), reference_block(block, x, TINY["n_head"]), atol=1e-10)
    rotary = rotary_angles(torch.arange(7), TINY["n_embd"] // TINY["n_head"])
    assert torch.allclose(block(x, rotary=rotary), reference_block(block, x, TINY["n_head"], rotary=True), atol=1e-6)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_whole_model_equals_reference_and_head_is_the_token_embedding(positions):
    model = lively_model(positions=positions).double()
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    x = model.transformer.wte.weight[idx]
    if positions == "learned":
        x = x + model.transformer.wpe.weight[:9]
    for block in model.transformer.h:
        x = reference_block(block, x, TINY["n_head"], rotary=positions == "rotary")
    x = F.layer_norm(x, (TINY["n_embd"],), model.transformer.ln_f.weight, model.transformer.ln_f.bias)
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 9, TINY["vocab_size"])
    tolerance = 1e-10 if positions == "learned" else 1e-6   # the rotary angles are float32
    assert torch.allclose(logits, x @ model.transformer.wte.weight.T, atol=tolerance)
    assert torch.allclose(model.hidden_states(idx), x, atol=tolerance)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_rotary_attention_sees_distances_not_places():
    """Turning a query at p and a key at s gives the same dot product as at p + d and s + d; so a whole
    rotary model computes the same states wherever the sequence starts, and a learned table does not."""
    q, k = torch.randn(2, 3, 1, 8, dtype=torch.float64).unbind(0)   # (T=3, heads=1, D=8)
    def score(p, s):
        cos, sin = rotary_angles(torch.tensor([p, s]), 8)
        return (rotate(q, cos[:1], sin[:1]) * rotate(k, cos[1:], sin[1:])).sum(-1)
    assert torch.allclose(score(7, 3), score(12, 8)) and not torch.allclose(score(7, 3), score(7, 4))
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    shifted = torch.arange(9) + 5
    rotary, learned = lively_model(), lively_model(positions="learned")
    assert torch.allclose(rotary._transform(idx, shifted), rotary._transform(idx), atol=1e-5)
    assert not torch.allclose(learned._transform(idx, shifted), learned._transform(idx), atol=1e-3)


def test_positions_option_is_checked():
    with pytest.raises(UsageError, match="'rotary' or 'learned'"):
        GPTConfig(positions="absolute")
    with pytest.raises(UsageError, match="even size"):
        GPTConfig(n_embd=12, n_head=4)
    GPTConfig(n_embd=12, n_head=4, positions="learned")   # a learned table has no pairs to turn


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_parameter_count_and_gpt2_scaled_init(positions):
    config = GPTConfig(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=64, positions=positions)
    torch.manual_seed(0)
    model = GPT(config)
    C, L = config.n_embd, config.n_layer
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    table = 16 * C if positions == "learned" else 0   # rotary positions have no weights
    assert model.num_parameters() == 100 * C + table + L * per_block + 2 * C  # tied head counted once
    projections = torch.cat([model.transformer.h[i].mlp.c_proj.weight.flatten() for i in range(L)])
    assert abs(projections.std().item() - 0.02 / math.sqrt(2 * L)) < 0.0005
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_sequence_longer_than_the_context_and_bad_sizes_are_clear_errors():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(UsageError, match="block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(UsageError, match="multiple of n_head"):
        GPTConfig(n_embd=30, n_head=4)


# --- the loss ------------------------------------------------------------------------------------

def test_loss_on_known_inputs():
    model = GPT(GPTConfig(**TINY))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # every logit 0: the loss is exactly log(vocab_size)
    idx = torch.randint(0, 64, (2, 5))
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(64), abs=1e-6)
    model = lively_model()
    logits, loss = model(idx, idx)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, 64), idx.view(-1)).item(), abs=1e-6)


def test_masking_ignores_exactly_the_masked_positions():
    model = lively_model()
    idx = torch.randint(0, 64, (2, 6))
    targets = torch.randint(0, 64, (2, 6))
    keep = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    masked = targets.masked_fill(~keep, IGNORE_INDEX)
    logits, loss = model(idx, masked)
    expected = -logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)[keep].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # whatever the masked targets were, nothing changes
    other = torch.where(keep, targets, (targets + 1) % 64)
    _, unaffected = model(idx, other.masked_fill(~keep, IGNORE_INDEX))
    assert unaffected.item() == loss.item()
    # and the masked positions' logits get no gradient
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.view(-1, 64), masked.view(-1), ignore_index=IGNORE_INDEX).backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(-1) > 0)


def test_all_masked_batch_gives_zero_loss_with_a_gradient_not_nan():
    model = lively_model().train()
    idx = torch.randint(0, 64, (2, 6))
    _, loss = model(idx, torch.full((2, 6), IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(torch.all(p.grad == 0) for p in model.parameters() if p.grad is not None)


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    optimizer = model.configure_optimizer(learning_rate=1e-2, weight_decay=0.0)
    data = torch.randint(0, 64, (4, 17))
    for _ in range(150):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1  # from about log(64) = 4.16


def test_optimizer_decays_matrices_only_and_skips_frozen_parameters():
    model = GPT(GPTConfig(**TINY, scalar_head=True, positions="learned"))
    model.transformer.wpe.weight.requires_grad_(False)
    optimizer = model.configure_optimizer(learning_rate=1e-3, weight_decay=0.1)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert any(p is model.transformer.wte.weight for p in decayed["params"])
    everything = decayed["params"] + plain["params"]
    assert not any(p is model.transformer.wpe.weight for p in everything)
    assert len(everything) == len([p for p in model.parameters() if p.requires_grad])


def test_scalar_head_reads_the_given_positions():
    model = lively_model(scalar_head=True)
    idx = torch.randint(0, 64, (3, 8))
    positions = [7, 2, 4]
    hidden = model.hidden_states(idx)
    expected = torch.stack([model.scalar_head(hidden[b, p]) for b, p in enumerate(positions)]).squeeze(-1)
    assert torch.allclose(model.scalar(idx, positions), expected, atol=1e-6)
    assert model.scalar(idx, torch.tensor(positions)).shape == (3,)
    with pytest.raises(UsageError, match="scalar head"):
        lively_model().scalar(idx, positions)


# --- generation ----------------------------------------------------------------------------------

PROMPTS = [[1, 2, 3], [7], [9, 8, 7, 6, 5, 4, 3], [5, 5]]


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_cached_greedy_equals_uncached_and_batched_equals_alone(positions):
    model = lively_model(positions=positions)
    cached = model.generate(PROMPTS, 12, temperature=0)
    uncached = model.generate(PROMPTS, 12, temperature=0, use_cache=False)
    for prompt, with_cache, without in zip(PROMPTS, cached, uncached):
        alone = model.generate([prompt], 12, temperature=0)[0]
        assert with_cache.tokens == without.tokens == alone.tokens
        assert len(with_cache.tokens) == 12 and not with_cache.stopped
        assert len(set(with_cache.tokens)) > 3  # a real test: the choices vary
        assert with_cache.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert with_cache.logprobs == pytest.approx(without.logprobs, abs=1e-4)


def test_generation_with_bfloat16_weights_uses_the_cache_the_same_way():
    # bench.py measures batch-1 decoding with the weights held in bf16 (half the bytes to read per
    # token): the cache must then still give exactly what recomputing gives
    model = lively_model().to(torch.bfloat16)
    cached = model.generate(PROMPTS[:1], 12, temperature=0)[0]
    uncached = model.generate(PROMPTS[:1], 12, temperature=0, use_cache=False)[0]
    assert cached.tokens == uncached.tokens and len(set(cached.tokens)) > 3


def test_each_sequence_stops_at_its_own_stop_token():
    model = lively_model()
    free = model.generate(PROMPTS, 12, temperature=0)
    stop = free[0].tokens[4]  # first reached at step <= 4 by sequence 0; maybe elsewhere by others
    stopped = model.generate(PROMPTS, 12, temperature=0, stop_tokens=(stop, 63))
    for unconstrained, generation in zip(free, stopped):
        hits = [i for i, token in enumerate(unconstrained.tokens) if token in (stop, 63)]
        expected = unconstrained.tokens[:hits[0] + 1] if hits else unconstrained.tokens
        assert generation.tokens == expected and generation.stopped == bool(hits)
    assert stopped[0].stopped and stopped[0].tokens[-1] == stop


def test_generation_never_passes_the_context_and_rejects_bad_prompts():
    model = lively_model()  # block_size 32
    generations = model.generate([[1] * 30, [2] * 32, [3]], 5, temperature=0)
    assert [len(g.tokens) for g in generations] == [2, 0, 5]
    assert not any(g.stopped for g in generations)
    with pytest.raises(UsageError, match="prompt 1"):
        model.generate([[1], [2] * 33], 5)
    with pytest.raises(UsageError, match="prompt 0"):
        model.generate([[]], 5)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        model.generate([[1], [64]], 5)
    with pytest.raises(UsageError, match="top_p"):
        model.generate([[1]], 5, top_p=0)


def test_logprobs_of_sampled_tokens_equal_a_fresh_forward_pass():
    model = lively_model()
    generations = model.generate(PROMPTS, 10, temperature=0.7, top_k=20, seed=3)
    for prompt, generation in zip(PROMPTS, generations):
        sequence = torch.tensor([prompt + generation.tokens])
        logits, _ = model(sequence)
        logprobs = logits[0, len(prompt) - 1:-1].log_softmax(-1)
        expected = logprobs.gather(-1, torch.tensor(generation.tokens)[:, None]).squeeze(-1)
        assert generation.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others():
    # generate drops finished sequences from its working batch (and their rows of the KV cache) once
    # they are a quarter of it: the sequences left must go on exactly as if nothing had left
    model = lively_model()
    prompts = [[1 + row % 7, 2 + row % 5] * (1 + row % 3) for row in range(12)]
    free = model.generate(prompts, 16, temperature=0)

    def lengths_if_stopping_at(token):
        return [g.tokens.index(token) + 1 if token in g.tokens else 16 for g in free]

    # a stop token that ends a quarter of the rows within 3 steps and leaves others to run to the end
    stop = next(token for token in range(64) if sum(n <= 3 for n in lengths_if_stopping_at(token)) >= 3
                and lengths_if_stopping_at(token).count(16) >= 3)
    stops = (stop,)
    stopped = model.generate(prompts, 16, temperature=0, stop_tokens=stops)
    assert [len(generation.tokens) for generation in stopped] == lengths_if_stopping_at(stop)
    for prompt, generation in zip(prompts, stopped):
        alone = model.generate([prompt], 16, temperature=0, stop_tokens=stops)[0]
        assert generation.tokens == alone.tokens
        assert generation.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    # sampled: each row's log-probabilities are those of a fresh forward pass over its own tokens, and
    # streaming names each token's own sequence after others have left
    streamed = {}
    sampled = model.generate(prompts, 16, temperature=1.0, seed=5, stop_tokens=stops,
                             on_token=lambda row, token: streamed.setdefault(row, []).append(token))
    assert len({len(generation.tokens) for generation in sampled}) > 2
    assert [streamed.get(row, []) for row in range(len(prompts))] == [generation.tokens for generation in sampled]
    for prompt, generation in zip(prompts, sampled):
        logits, _ = model(torch.tensor([prompt + generation.tokens]))
        logprobs = logits[0, len(prompt) - 1:-1].log_softmax(-1)
        expected = logprobs.gather(-1, torch.tensor(generation.tokens)[:, None]).squeeze(-1)
        assert generation.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_draw_from_draws_each_token_with_its_probability():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.0, 0.3, 0.6, 0.0])
    draws = draw_from(probs.repeat(100_000, 1), generator)
    frequencies = torch.bincount(draws, minlength=6).float() / len(draws)
    assert frequencies[[0, 2, 5]].sum() == 0   # a token of probability 0 never comes up
    standard_error = (probs * (1 - probs) / len(draws)).sqrt()
    assert ((frequencies - probs).abs() <= 5 * standard_error + 1e-9).all()
    # a row whose mass is all on one token, wherever it is
    certain = torch.eye(5)
    assert draw_from(certain, generator).tolist() == [0, 1, 2, 3, 4]


def test_seed_repeats_sampling_and_leaves_the_global_generator_alone():
    model = lively_model()
    state = torch.random.get_rng_state()
    first = model.generate(PROMPTS, 10, temperature=1.0, seed=11)
    assert torch.equal(state, torch.random.get_rng_state())
    again = model.generate(PROMPTS, 10, temperature=1.0, seed=11)
    other = model.generate(PROMPTS, 10, temperature=1.0, seed=12)
    assert [g.tokens for g in first] == [g.tokens for g in again] != [g.tokens for g in other]


def test_top_k_and_top_p_never_sample_outside_their_set():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    samples = set(sample_next(logits, 1.0, top_k=5, generator=generator).tolist())
    assert samples <= top5 and len(samples) == 5
    probs, order = logits[0].softmax(-1).sort(descending=True)
    nucleus = set(order[:int((probs.cumsum(-1) < 0.6).sum()) + 1].tolist())  # smallest set reaching 0.6
    samples = set(sample_next(logits, 1.0, top_p=0.6, generator=generator).tolist())
    assert samples <= nucleus and len(samples) == len(nucleus)
    assert set(sample_next(logits, 0.5, top_k=5, top_p=0.6, generator=generator).tolist()) <= top5 & nucleus

    # and inside generate, at every step (the hook sees each step's logits and changes nothing)
    model = lively_model()
    seen = []
    generations = model.generate(PROMPTS, 10, temperature=1.5, top_k=3, seed=0,
                                 logits_hook=lambda step, so_far, logits: seen.append(logits.clone()) or logits)
    for row, generation in enumerate(generations):
        for step, token in enumerate(generation.tokens):
            assert token in torch.topk(seen[step][row], 3).indices.tolist()


def test_logits_hook_constrains_and_on_token_streams():
    model = lively_model()
    calls, streamed = [], {}

    def only_even_tokens(step, so_far, logits):
        calls.append((step, [list(tokens) for tokens in so_far]))
        logits[:, 1::2] = float("-inf")
        return logits

    generations = model.generate(PROMPTS, 6, temperature=1.0, seed=0, stop_tokens=(10,), logits_hook=only_even_tokens,
                                 on_token=lambda row, token: streamed.setdefault(row, []).append(token))
    for row, generation in enumerate(generations):
        assert all(token % 2 == 0 for token in generation.tokens)
        assert streamed[row] == generation.tokens
    # the hook sees each sequence's new tokens so far
    for step, so_far in calls:
        assert so_far == [generation.tokens[:step] for generation in generations]


def test_generate_restores_training_mode():
    model = lively_model().train()
    model.generate([[1]], 2)
    assert model.training


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          scalar_head=True))
    path = tmp_path / "reward.pt"
    save_checkpoint(str(path), stage="reward", model=model, tokenizer=tiny_tokenizer, metrics={"loss": 1.5})
    loaded, tokenizer, checkpoint = load_model(str(path), stages="reward")
    idx = torch.randint(0, tiny_tokenizer.vocab_size, (2, 16))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert torch.equal(loaded.scalar(idx, [3, 15]), model.scalar(idx, [3, 15]))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    assert tokenizer.to_dict() == tiny_tokenizer.to_dict() and checkpoint["metrics"] == {"loss": 1.5}


def test_a_checkpoint_from_before_rotary_positions_loads_with_its_table(tmp_path, tiny_tokenizer):
    """Checkpoints saved before GPTConfig.positions existed have no such key, and a position table."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          positions="learned"))
    path = tmp_path / "pretrain.pt"
    save_checkpoint(str(path), stage="pretrain", model=model, tokenizer=tiny_tokenizer)
    old = torch.load(path, weights_only=True)
    del old["model_config"]["positions"]
    torch.save(old, path)
    loaded, _, _ = load_model(str(path), stages="pretrain")
    idx = torch.randint(0, tiny_tokenizer.vocab_size, (2, 16))
    assert loaded.config.positions == "learned" and torch.equal(loaded(idx)[0], model(idx)[0])


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, tiny_tokenizer):
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path / "pretrain.pt"
    save_checkpoint(str(path), stage="pretrain", model=model, tokenizer=tiny_tokenizer)
    before = path.read_bytes()
    with pytest.raises(Exception):  # a lambda cannot be pickled: torch.save fails half-way through
        save_checkpoint(str(path), stage="pretrain", model=model, tokenizer=tiny_tokenizer, metrics={"bad": lambda: 0})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["pretrain.pt"]


def test_checkpoint_error_paths(tmp_path, make_checkpoint, tiny_tokenizer):
    with pytest.raises(UsageError, match="python sft.py"):
        load_checkpoint(str(tmp_path / "sft.pt"), stages="sft")
    path = make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    with pytest.raises(UsageError, match="'pretrain' checkpoint"):
        load_checkpoint(path, stages=("sft", "rlhf"))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(open(path, "rb").read()[:500])
    with pytest.raises(UsageError, match="damaged"):
        load_checkpoint(str(damaged))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(UsageError, match="damaged"):
        load_checkpoint(str(tmp_path / "text.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")   # a loadable file that is not a checkpoint
    with pytest.raises(UsageError, match="not a checkpoint of this project"):
        load_checkpoint(str(tmp_path / "tensor.pt"))
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(UsageError, match="missing stage, model_config, tokenizer"):
        load_checkpoint(str(tmp_path / "partial.pt"))
    small = make_checkpoint(tmp_path / "small.pt", "pretrain", vocab_size=tiny_tokenizer.vocab_size - 10)
    with pytest.raises(UsageError, match="do not belong together"):
        load_checkpoint(small)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"]["n_embd"] = 64
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    with pytest.raises(UsageError, match="do not fit"):
        load_model(str(tmp_path / "mismatch.pt"))


def test_a_folder_where_a_file_belongs_is_a_one_line_error(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(UsageError, match=f"{folder} is a folder: pass a checkpoint file, such as {folder}/sft.pt"):
        load_checkpoint(str(folder), stages="sft")
    with pytest.raises(UsageError, match="is a folder: give a file name in it instead"):
        with atomic_path(str(folder)):   # its temporary file would go beside the folder, in tmp_path
            pass
    assert os.listdir(tmp_path) == ["out"] and os.listdir(folder) == []   # nothing left behind


def test_option_values_no_run_could_use_are_one_line_errors_naming_the_option(capsys):
    from pretrain import Config
    with pytest.raises(SystemExit) as exit_info:   # argparse's own: one line and where the options are
        parse_config(Config, ["--max_iters", "abc"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith("error: argument --max_iters: invalid int value: 'abc' (`python ")
    assert error.endswith(" --help` lists the options)\n")
    for values, message in [({"learning_rate": -1.0}, "--learning_rate must be positive, got -1.0"),
                            ({"weight_decay": -0.5}, "--weight_decay must not be negative, got -0.5"),
                            ({"dropout": 1.5}, "--dropout must be at least 0 and below 1, got 1.5")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            check_options(Config(**values), positive=["learning_rate"], not_negative=["weight_decay"],
                          fractions=["dropout"])
    check_options(Config(dropout=0.0, weight_decay=0.0), positive=["learning_rate"], not_negative=["weight_decay"],
                  fractions=["dropout"])   # the edges that are allowed


def test_a_chat_checkpoint_from_before_the_message_space_warns(tmp_path, make_checkpoint, capsys):
    for stage in ("pretrain", "sft"):
        path = make_checkpoint(tmp_path / f"{stage}.pt", stage)
        load_checkpoint(path)
        assert capsys.readouterr().err == ""                  # saved today: no warning
        old = torch.load(path, weights_only=True)
        del old["message_prefix"]                              # as saved before render_chat's space
        torch.save(old, tmp_path / f"old-{stage}.pt")
        load_model(str(tmp_path / f"old-{stage}.pt"))          # still loads and runs ...
        warned = capsys.readouterr().err
        assert ("run sft.py and the later stages again" in warned) == (stage == "sft")   # ... a chat model warns


# --- GPT-2's files -------------------------------------------------------------------------------

def write_safetensors(path, tensors):
    """The safetensors layout, written out: u64 header length, JSON header, raw little-endian data."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text + data)


def raw_bytes(tensor):
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def test_safetensors_reader_on_a_file_written_by_hand(tmp_path):
    bf16 = [struct.unpack("<I", struct.pack("<f", x))[0] >> 16 for x in (1.0, -2.5, 0.15625)]  # top half of f32
    write_safetensors(tmp_path / "t.safetensors", {
        "f32": ("F32", [2, 2], struct.pack("<4f", 1.5, -2.0, 0.25, 3.0)),
        "f16": ("F16", [3], struct.pack("<3e", 0.5, -1.0, 65504.0)),
        "bf16": ("BF16", [3], struct.pack("<3H", *bf16)),
        "i64": ("I64", [2], struct.pack("<2q", -(2 ** 40), 7)),
        "u8": ("U8", [1, 3], bytes([0, 128, 255])),
        "bool": ("BOOL", [2], bytes([1, 0])),
        "empty": ("F32", [0, 4], b""),
    })
    tensors = read_safetensors(str(tmp_path / "t.safetensors"))
    assert torch.equal(tensors["f32"], torch.tensor([[1.5, -2.0], [0.25, 3.0]]))
    assert tensors["f16"].dtype == torch.float16 and tensors["f16"].tolist() == [0.5, -1.0, 65504.0]
    assert tensors["bf16"].dtype == torch.bfloat16 and tensors["bf16"].tolist() == [1.0, -2.5, 0.15625]
    assert tensors["i64"].tolist() == [-(2 ** 40), 7] and tensors["u8"].tolist() == [[0, 128, 255]]
    assert tensors["bool"].tolist() == [True, False] and tensors["empty"].shape == (0, 4)

    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-3])
    with pytest.raises(UsageError, match="damaged"):
        read_safetensors(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(UsageError, match="damaged"):
        read_safetensors(str(tmp_path / "junk.safetensors"))


def hugging_face_tensors(model, prefix="transformer."):
    """Our GPT's weights under GPT-2's names and layouts, as Hugging Face stores them."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        short = name.removeprefix("transformer.")
        if short.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # Conv1D stores (in, out)
        tensors[prefix + short] = tensor.contiguous()
    for layer in range(model.config.n_layer):  # the stored causal masks of older files
        tensors[f"{prefix}h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    if prefix:
        tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return tensors


def gpt2_folder(folder, model, fmt="safetensors", prefix="transformer."):
    folder.mkdir()
    c = model.config
    config = {"model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
              "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "activation_function": "gelu_new"}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = hugging_face_tensors(model, prefix)
    if fmt == "safetensors":
        write_safetensors(folder / "model.safetensors", {name: ("F32", list(t.shape), raw_bytes(t)) for name, t in tensors.items()})
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("safetensors", "transformer."), ("bin", "transformer.")])
def test_from_pretrained_maps_names_and_transposes_conv1d(tmp_path, fmt, prefix):
    model = lively_model(positions="learned")
    folder = gpt2_folder(tmp_path / "gpt2", model, fmt, prefix)
    loaded = GPT.from_pretrained(str(folder))
    assert loaded.config == model.config
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(loaded.eval()(idx)[0], model(idx)[0])


def test_from_pretrained_error_paths(tmp_path):
    with pytest.raises(UsageError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    folder = gpt2_folder(tmp_path / "gpt2", lively_model(positions="learned"))
    os.remove(folder / "model.safetensors")
    with pytest.raises(UsageError, match="model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(str(folder))
    wrong = lively_model(n_embd=32)
    write_safetensors(folder / "model.safetensors",
                      {name: ("F32", list(t.shape), raw_bytes(t)) for name, t in hugging_face_tensors(wrong).items()})
    with pytest.raises(UsageError, match="do not fit its config.json"):
        GPT.from_pretrained(str(folder))
    os.remove(folder / "model.safetensors")
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")   # loads, but holds no named weights
    with pytest.raises(UsageError, match="pytorch_model.bin holds a list, not a state dict"):
        GPT.from_pretrained(str(folder))
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "n_layer": "two"}))
    with pytest.raises(UsageError, match="must be whole numbers"):
        GPT.from_pretrained(str(folder))


def test_gpt2_state_dict_upcasts_half_precision():
    state = gpt2_state_dict({"h.0.mlp.c_fc.weight": torch.ones(2, 3, dtype=torch.float16)})
    assert state["transformer.h.0.mlp.c_fc.weight"].dtype == torch.float32
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (3, 2)


def test_import_gpt2_writes_a_pretrain_checkpoint_with_mean_rows_for_new_specials(tmp_path):
    from bpe import gpt2_bytes_to_unicode
    model = lively_model(vocab_size=258, positions="learned")
    folder = gpt2_folder(tmp_path / "gpt2", model)
    characters = gpt2_bytes_to_unicode()
    encoder = {characters[byte]: byte for byte in range(256)}
    encoder.update({characters[ord("h")] + characters[ord("e")]: 256, "<|endoftext|>": 257})
    (folder / "vocab.json").write_text(json.dumps(encoder))
    (folder / "merges.txt").write_text("#version: 0.2\nh e\n")
    out = import_gpt2(str(folder), str(tmp_path / "out" / "pretrain.pt"))
    loaded, tokenizer, checkpoint = load_model(out, stages="pretrain")
    assert checkpoint["parent"]["stage"] == "gpt2"
    assert tokenizer.special_tokens["<|endoftext|>"] == 257 and tokenizer.vocab_size == 265
    assert loaded.config.vocab_size == 265
    embedding = loaded.transformer.wte.weight.detach()
    assert torch.equal(embedding[:258], model.transformer.wte.weight)
    assert torch.allclose(embedding[258:], model.transformer.wte.weight.mean(0).expand(7, -1))
    idx = torch.tensor([tokenizer.encode("he said")])
    assert torch.allclose(loaded(idx)[0][..., :258], model(idx)[0], atol=1e-6)


def test_import_gpt2_command_line_reports_missing_tokenizer_files(tmp_path):
    import subprocess
    folder = gpt2_folder(tmp_path / "gpt2", lively_model(positions="learned"))
    result = subprocess.run([sys.executable, "model.py", "import_gpt2", str(folder), "--out", str(tmp_path / "x.pt")],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "vocab.json and merges.txt" in result.stderr
    assert not (tmp_path / "x.pt").exists()


def test_logits_match_hugging_face_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(str(tmp_path / "gpt2"))
    model = GPT.from_pretrained(str(tmp_path / "gpt2")).eval()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], reference(idx).logits, atol=1e-5)


def test_autocast_chooses_the_precision_of_matrix_products():
    from model import autocast
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    for device, dtype, expected in [("cpu", "auto", torch.float32), ("cpu", "float32", torch.float32),
                                    ("cpu", "bfloat16", torch.bfloat16)]:
        with autocast(device, dtype):
            assert (x @ w).dtype == expected, (device, dtype)


def test_training_dtype_is_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    from model import native_bfloat16, training_dtype
    assert training_dtype("cpu", "float32") == "float32" and training_dtype("cpu", "bfloat16") == "bfloat16"
    assert training_dtype("cuda:0") == "bfloat16" and training_dtype("mps") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert training_dtype("cpu") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert training_dtype("cpu") == "float32"

    def gone():   # the checks are private to torch: one that a torch version lacks reads as no
        raise AttributeError("no such check")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", gone)
    assert not native_bfloat16("cpu") and training_dtype("cpu") == "float32"



def test_batches_side_by_side_give_the_answers_of_one_batch_after_another(tmp_path, make_checkpoint):
    """map_batches: on a CPU with two threads, batches of answers are sampled on threads of their own.
    Each batch is seeded by where it starts, so the answers are exactly those one thread writes, in
    order; the tool statistics add up the same; the model's mode and the thread count come back."""
    from model import chat_responses
    from sample import Sampling, chat_answers
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    model.train()
    prompts = [f"question {k}" for k in range(10)]
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            stats = {}
            answers = chat_answers(model, tokenizer, prompts, Sampling(max_new_tokens=12, temperature=1.0, seed=5),
                                   batch_size=3, stats=stats)
            runs.append((chat_responses(model, tokenizer, prompts, temperature=1.0, max_new_tokens=12, seed=5,
                                        batch_size=3), answers, stats))
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(threads)
    assert runs[1] == runs[0]
    assert len(set(runs[0][0])) > 5 and runs[0][2]["tokens"] > 0   # really sampled, and counted
    assert model.training


def test_chat_responses_keeps_the_question_when_the_answer_may_fill_the_context(tmp_path, make_checkpoint, monkeypatch):
    from bpe import render_chat
    from model import chat_responses, load_model
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    seen, original = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, batch, *args, **kwargs: seen.extend(batch) or original(self, batch, *args, **kwargs))
    chat_responses(model, tokenizer, ["What is 2 + 2?"], max_new_tokens=model.config.block_size)
    ids, _ = render_chat(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
    assert seen[0] == ids
