"""rlhf.py: the pieces against hand-computed cases, the KL and log-probability plumbing against fresh
forward passes, and each algorithm raising a simple known reward on a tiny model."""

import copy
import json
import math
import os
import random
import signal

import pytest
import torch

import rlhf
from bpe import TOOL_RESULT_PREFIX
from conftest import CALCULATOR_QUESTION, teach
from model import UsageError, load_model, save_checkpoint
from sample import calculator_result

PROMPTS = ["What is the capital of Peru?", "What is 2 + 3?", "How many legs does a cat have?",
           "Write a story."]


def tiny_config(tmp_path, **overrides):
    settings = dict(out_dir=str(tmp_path), device="cpu", max_iters=2, prompts_per_step=2,
                    samples_per_prompt=2, max_new_tokens=6, eval_tasks=4, diversity_prompts=2,
                    learning_rate=1e-3, dpo_batch_size=4)
    settings.update(overrides)
    return rlhf.Config(**settings)


@pytest.fixture
def policy_and_tokenizer(tmp_path, make_checkpoint):
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"), stages="sft")
    return model, tokenizer


# --- log-probabilities and KL ---------------------------------------------------------------------

def test_sampled_logprobs_equal_a_fresh_forward_pass(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    # without the calculator, so every token is the policy's (its tokens are tested below)
    rollout = rlhf.sample_rollout(policy, tokenizer, PROMPTS, samples_per_prompt=3, max_new_tokens=10, seed=0,
                                  tool=False)
    with torch.no_grad():
        logprobs = rlhf.token_logprobs(policy, rollout.idx)
    for row, sampled in enumerate(rollout.sampled_logprobs):
        recomputed = logprobs[row][rollout.mask[row] > 0]
        assert len(recomputed) == len(sampled) == len(rollout.tokens[row]) > 0
        torch.testing.assert_close(recomputed, torch.tensor(sampled), atol=1e-5, rtol=0)
    # grouped by length in micro-batches: the same numbers as one padded batch, where the mask is on
    chunked = rlhf.rollout_logprobs(policy, rollout.sequences, micro_batch=5, device="cpu")
    torch.testing.assert_close(chunked * rollout.mask, logprobs * rollout.mask, atol=1e-5, rtol=0)
    # the mask picks exactly the completion tokens, as targets
    for row, tokens in enumerate(rollout.tokens):
        assert rollout.idx[row, 1:][rollout.mask[row] > 0].tolist() == tokens


def test_the_calculator_runs_in_rollouts_and_its_tokens_are_not_the_policys(calculator_user):
    """A policy that learned to ask the calculator (conftest's calculator_user) gets the tool's result in
    its rollouts, as in use; those tokens are in the sequence but out of the action mask, and the
    log-probabilities of the tokens it did choose still match a fresh forward pass."""
    policy, tokenizer = calculator_user
    specials = tokenizer.special_tokens
    rollout = rlhf.sample_rollout(policy, tokenizer, [CALCULATOR_QUESTION], samples_per_prompt=4, max_new_tokens=24,
                                  seed=0)
    result, end_result = specials["<|result|>"], specials["<|/result|>"]
    called = [row for row, tokens in enumerate(rollout.tokens) if result in tokens]
    assert any("<|calc|>12 * 7<|result|> 84<|/result|>" in rollout.responses[row] for row in called), rollout.responses
    with torch.no_grad():
        logprobs = rlhf.token_logprobs(policy, rollout.idx)
    for row in called:
        tokens = rollout.tokens[row]
        start, stop = tokens.index(result) + 1, tokens.index(end_result) + 1
        # the tool's value of the expression the policy wrote, whatever digits the policy would have guessed
        expression = tokenizer.decode(tokens[tokens.index(specials["<|calc|>"]) + 1:start - 1])
        assert tokenizer.decode(tokens[start:stop - 1]) == TOOL_RESULT_PREFIX + calculator_result(expression)
        prompt_length = len(rollout.sequences[row]) - len(tokens)
        chosen = rollout.mask[row, prompt_length - 1:prompt_length - 1 + len(tokens)].tolist()
        assert chosen == [0.0 if start <= t < stop else 1.0 for t in range(len(tokens))]
    for row, sampled in enumerate(rollout.sampled_logprobs):
        recomputed = logprobs[row][rollout.mask[row] > 0]
        torch.testing.assert_close(recomputed, torch.tensor(sampled), atol=1e-5, rtol=0)
    # without the tool, the policy writes the result itself and chooses every token of its answer
    plain = rlhf.sample_rollout(policy, tokenizer, [CALCULATOR_QUESTION], 4, 24, seed=0, tool=False)
    assert [int(m.sum()) for m in plain.mask] == [len(tokens) for tokens in plain.tokens]


def test_a_rollout_stops_on_endoftext_as_evaluation_does(policy_and_tokenizer):
    """A policy that drifts back into writing documents ends with <|endoftext|>, not <|end|>: that ends
    its answer too (it is the policy's own last token, so it counts in the mask), not max_new_tokens."""
    policy, tokenizer = policy_and_tokenizer
    end_of_text = tokenizer.special_tokens["<|endoftext|>"]
    with torch.no_grad():   # make every position predict <|endoftext|>: the final norm outputs its bias
        direction = torch.zeros(policy.config.n_embd)
        direction[0] = 1.0
        policy.transformer.wte.weight[end_of_text] = 100.0 * direction   # tied: the output row too
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.copy_(direction)
    rollout = rlhf.sample_rollout(policy, tokenizer, PROMPTS, samples_per_prompt=2, max_new_tokens=10, seed=0,
                                  tool=False)
    assert rollout.tokens == [[end_of_text]] * len(rollout.tokens)
    assert all(rollout.stopped) and rollout.responses == [""] * len(rollout.tokens)
    assert rollout.mask.sum(dim=1).tolist() == [1.0] * len(rollout.tokens)


def test_kl_is_zero_when_policy_equals_reference(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    reference = copy.deepcopy(policy)
    rollout = rlhf.sample_rollout(policy, tokenizer, PROMPTS, samples_per_prompt=2, max_new_tokens=8, seed=1)
    with torch.no_grad():
        kl = rlhf.sequence_kl(rlhf.token_logprobs(policy, rollout.idx),
                              rlhf.token_logprobs(reference, rollout.idx), rollout.mask)
    assert kl.abs().max().item() < 1e-5
    assert not rlhf.check_kl(torch.tensor([0.1, -0.1, 0.05, -0.05]), step=0)   # noise around 0: fine
    assert rlhf.check_kl(torch.tensor([-1.0, -1.1, -0.9, -1.0]), step=0)       # clearly negative: a bug


# --- the objectives against hand-computed cases ---------------------------------------------------

def test_leave_one_out_baseline_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    advantages = rlhf.leave_one_out_advantages(rewards)
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3],
                             [0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0]])
    torch.testing.assert_close(advantages, expected)
    # a prompt whose K samples all score the same teaches nothing
    assert rlhf.leave_one_out_advantages(torch.full((1, 3), 5.0)).abs().max() == 0
    with pytest.raises(UsageError):
        rlhf.leave_one_out_advantages(torch.ones(2, 1))


def test_rewards_are_in_units_of_the_first_batchs_spread_and_a_cut_off_answer_pays_the_penalty():
    normalizer = rlhf.RewardNormalizer()
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])   # mean 3, sample std 2.16...
    stopped = torch.tensor([1.0, 1.0, 0.0, 1.0])  # the third never ended
    rewards = rlhf.shaped_rewards(scores, stopped, normalizer, truncation_penalty=0.5)
    spread = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)
    torch.testing.assert_close(rewards, torch.tensor([-2 / spread, -1 / spread, 0 - 0.5, 3 / spread]))
    # the first batch fixes the scale: a later batch is measured in the same units
    torch.testing.assert_close(rlhf.shaped_rewards(torch.tensor([3.0, 5.0]), torch.ones(2), normalizer, 0.5),
                               torch.tensor([0.0, 2 / spread]))


def test_ppo_clipped_objective_hand_computed():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1 and clip 0.2; the fifth token is masked
    old = torch.zeros(1, 5)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 9.0]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, clip_fraction = rlhf.ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # per token -min(r A, clip(r) A): -min(1.5, 1.2), -min(0.5, 0.8), -min(-1.5, -1.2), -min(-0.5, -0.8)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert clip_fraction.item() == pytest.approx(0.5)   # tokens 1 and 4: the clipped term wins
    # at ratio 1 the surrogate's gradient is the policy gradient: d/d logprob = -A
    at_one = torch.zeros(1, 3, requires_grad=True)
    rlhf.ppo_policy_loss(at_one, torch.zeros(1, 3), torch.tensor([[2.0, -1.0, 0.5]]), torch.ones(1, 3), 0.2)[0].backward()
    torch.testing.assert_close(at_one.grad, torch.tensor([[-2.0, 1.0, -0.5]]) / 3)


def test_gae_hand_computed():
    # a prompt token (mask 0), three completion tokens, a padding slot; reward 1 at the last token
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.5, 0.5, 9.0]])
    advantages, returns = rlhf.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.0]]))  # return 1 - V
    torch.testing.assert_close(returns, torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]]))
    advantages, _ = rlhf.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas 0, 0, 0.5 -> A = 0.125, 0.25, 0.5
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.125, 0.25, 0.5, 0.0]]))
    # the default is lambda = 1, as --gae_lambda's: the whole return minus the value
    torch.testing.assert_close(rlhf.gae_advantages(rewards, values, mask)[0], torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.0]]))
    assert rlhf.Config().gae_lambda == 1.0
    # tokens the calculator wrote (mask 0 inside the completion) are passed over: the same advantages for
    # the policy's tokens as without them, so the call before the result is credited with the final score
    gap = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    advantages, _ = rlhf.gae_advantages(torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.0, 1.0, 0.0]]),
                                        torch.tensor([[9.0, 0.5, 7.0, 7.0, 0.5, 0.5, 9.0]]), gap, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, 0.125, 0.0, 0.0, 0.25, 0.5, 0.0]]))
    token_rewards = rlhf.per_token_rewards(torch.tensor([2.0]), torch.tensor([[0.0, 0.3, 0.2, 0.1, 0.0]]),
                                           torch.zeros(1, 5), mask, kl_coef=0.1)
    torch.testing.assert_close(token_rewards, torch.tensor([[0.0, -0.03, -0.02, 2.0 - 0.01, 0.0]]))


def test_dpo_loss_hand_computed():
    loss, chosen, rejected = rlhf.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]),
                                           torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    # implicit rewards 0.5 * (+1) and 0.5 * (-1); loss = -log sigmoid(1) = log(1 + e^-1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)


def test_dpo_loss_is_log_2_at_the_start(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    optimizer = rlhf.make_optimizer(policy, None, rlhf.Config(learning_rate=1e-3))
    pairs = [(p, "Lima is the capital.", "I do not know.") for p in PROMPTS]
    line = rlhf.dpo_step(policy, reference, optimizer, tokenizer, pairs, rlhf.Config(dpo_beta=0.1))
    assert line["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_nll_adds_the_chosen_responses_mean_token_loss(policy_and_tokenizer):
    from model import render_chat
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    optimizer = rlhf.make_optimizer(policy, None, rlhf.Config(learning_rate=0.0, final_norm_learning_rate=0.0))
    # (learning rate 0: nothing moves)
    pairs = [(p, "Lima is the capital.", "I do not know.") for p in PROMPTS]
    line = rlhf.dpo_step(policy, reference, optimizer, tokenizer, pairs, rlhf.Config(dpo_beta=0.1, dpo_nll=0.5))
    # by hand: the chosen responses' log-probabilities, token by token, over the tokens SFT trains on
    total, count = 0.0, 0
    for prompt, chosen, _ in pairs:
        ids, mask = render_chat(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}])
        with torch.no_grad():
            logits, _ = policy(torch.tensor([ids]))
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        total += sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])
        count += sum(mask[1:])
    assert line["loss"] == pytest.approx(math.log(2) - 0.5 * total / count, abs=1e-4)


def test_diversity_counts():
    distinct, distinct_2 = rlhf.diversity([[1, 2, 3], [1, 2, 3], [4, 5], [6, 7]], samples_per_prompt=2)
    # prompt 1: one distinct of two, 2-grams (1,2),(2,3) twice -> 2/4; prompt 2: 2/2 and 2/2
    assert distinct == pytest.approx((0.5 + 1.0) / 2)
    assert distinct_2 == pytest.approx((0.5 + 1.0) / 2)


def test_batches_are_a_function_of_the_step():
    items = list(range(10))
    assert rlhf.batch_of(items, 3, 4, seed=1) == rlhf.batch_of(items, 3, 4, seed=1)
    first_epoch = [x for step in range(5) for x in rlhf.batch_of(items, step, 2, seed=1)]
    assert sorted(first_epoch) == items   # every item once per pass


# --- each algorithm raises a simple known reward ---------------------------------------------------

def digit_reward(prompts, responses):
    """A reward anyone can check: the share of the response's characters that are digits."""
    return torch.tensor([sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses])


def mean_reward(policy, tokenizer, seed=123):
    rollout = rlhf.sample_rollout(policy, tokenizer, PROMPTS * 8, 4, 8, seed=seed)
    return digit_reward(rollout.prompts, rollout.responses).mean().item()


def test_ppo_makes_exactly_epochs_times_minibatches_updates_when_rows_do_not_divide(policy_and_tokenizer):
    """3 prompts x 3 samples = 9 rows in 2 minibatches: 5 + 4 rows, two updates a pass (cutting 4-row
    slices would make a third update of one row)."""
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    config = rlhf.Config(algo="ppo", samples_per_prompt=3, max_new_tokens=6, ppo_epochs=2, ppo_minibatches=2)
    value_head = rlhf.ValueHead(policy.config.n_embd)
    optimizer = rlhf.make_optimizer(policy, value_head, config)
    rlhf.rollout_step(policy, reference, value_head, optimizer, tokenizer, PROMPTS[:3], digit_reward,
                      rlhf.RewardNormalizer(), config, step=0)
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {config.ppo_epochs * config.ppo_minibatches}


@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_rl_raises_a_known_reward_and_keeps_reference_and_reward_model_frozen(
        algo, tmp_path, make_checkpoint, policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    reward_model, _, _ = load_model(make_checkpoint(tmp_path / "reward.pt", "reward", seed=1), stages="reward")
    rlhf.freeze(reward_model)
    frozen = {name: copy.deepcopy(model.state_dict()) for name, model in
              (("reference", reference), ("reward", reward_model))}
    from reward import reward_scores

    def reward_fn(prompts, responses):   # the known reward, plus (with weight 0) the real reward model
        return digit_reward(prompts, responses) + 0.0 * reward_scores(reward_model, tokenizer, prompts, responses)

    config = rlhf.Config(algo=algo, learning_rate=1e-2, samples_per_prompt=4, max_new_tokens=8, kl_coef=0.01,
                         truncation_penalty=0.0, ppo_epochs=2)
    value_head = rlhf.ValueHead(policy.config.n_embd) if algo == "ppo" else None
    optimizer = rlhf.make_optimizer(policy, value_head, config)
    normalizer = rlhf.RewardNormalizer()
    before = mean_reward(policy, tokenizer)
    for step in range(15):
        line = rlhf.rollout_step(policy, reference, value_head, optimizer, tokenizer, PROMPTS, reward_fn,
                                 normalizer, config, step)
        assert line["kl_warning"] == 0   # the mean KL estimate is never negative beyond noise
    after = mean_reward(policy, tokenizer)
    assert after > before + 0.05, (before, after)
    for name, model in (("reference", reference), ("reward", reward_model)):
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, frozen[name][key]), f"{name} changed: {key}"


def test_the_final_layernorm_has_a_learning_rate_of_its_own(policy_and_tokenizer):
    policy, _ = policy_and_tokenizer
    optimizer = rlhf.make_optimizer(policy, None, rlhf.Config(learning_rate=1e-5, final_norm_learning_rate=1e-2))
    rate = {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
    for name, parameter in policy.named_parameters():
        assert rate[id(parameter)] == (1e-2 if name.startswith("transformer.ln_f.") else 1e-5), name
    assert len(rate) == len(list(policy.parameters()))   # every weight is trained, each once
    same = rlhf.make_optimizer(policy, None, rlhf.Config(learning_rate=1e-5, final_norm_learning_rate=0.0))
    assert {group["lr"] for group in same.param_groups} == {1e-5}   # 0: the rate of every other weight
    for algo, expected in (("reinforce", 0.3), ("ppo", 0.3), ("dpo", 0.03)):   # not given: the algorithm's own
        rates = {group["lr"] for group in rlhf.make_optimizer(policy, None, rlhf.Config(algo=algo)).param_groups}
        assert rates == {1e-5, expected}, algo


def test_the_final_layernorm_is_the_policys_temperature(policy_and_tokenizer):
    """Why it gets a rate of its own: scaling its gain and bias by c scales every logit by c (the output
    layer has no bias), which is sampling at temperature 1 / c."""
    policy, _ = policy_and_tokenizer
    idx = torch.randint(0, policy.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits, _ = policy(idx)
        policy.transformer.ln_f.weight.mul_(2.0)
        policy.transformer.ln_f.bias.mul_(2.0)
        sharper, _ = policy(idx)
    assert torch.allclose(sharper, 2.0 * logits, atol=1e-5)


def test_with_the_other_rates_at_zero_a_step_moves_only_the_final_layernorm(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    start = copy.deepcopy(policy.state_dict())
    config = rlhf.Config(learning_rate=0.0, final_norm_learning_rate=1e-2, samples_per_prompt=4, max_new_tokens=8)
    optimizer = rlhf.make_optimizer(policy, None, config)
    rlhf.rollout_step(policy, reference, None, optimizer, tokenizer, PROMPTS, digit_reward, rlhf.RewardNormalizer(),
                      config, step=0)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, start[name]) != name.startswith("transformer.ln_f."), name


def test_dpo_raises_a_known_reward(policy_and_tokenizer):
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    frozen = copy.deepcopy(reference.state_dict())
    rng = random.Random(0)
    words = "the cat is of a sea dog and on it".split()
    pairs = [(prompt, "".join(rng.choice("0123456789") for _ in range(6)), " ".join(rng.choice(words) for _ in range(3)))
             for prompt in PROMPTS for _ in range(8)]   # digits preferred to words
    config = rlhf.Config(learning_rate=1e-2, dpo_beta=0.1)
    optimizer = rlhf.make_optimizer(policy, None, config)
    before = mean_reward(policy, tokenizer)
    losses = [rlhf.dpo_step(policy, reference, optimizer, tokenizer, pairs, config)["loss"] for _ in range(15)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < 0.3
    assert mean_reward(policy, tokenizer) > before + 0.05
    assert all(torch.equal(t, frozen[k]) for k, t in reference.state_dict().items())


def test_heldout_temperature_1_score_averages_several_samples_per_task(policy_and_tokenizer, world):
    """evaluate_heldout's temperature-1 score is the mean over `samples` answers per task, and its
    sampling error comes from the spread of each task's own answers: both against a computation by hand,
    on a policy half-taught the tasks' answers, so that its samples are sometimes right and sometimes not."""
    from sample import Sampling, chat_answers
    policy, tokenizer = policy_and_tokenizer
    tasks = world.tasks("eval")[:5]
    teach(policy, tokenizer, [(task.prompt, task.answer) for task in tasks], steps=40)
    metrics = rlhf.evaluate_heldout(policy, tokenizer, world, tasks, max_new_tokens=24, seed=3, samples=3)
    sampling = Sampling(max_new_tokens=24, temperature=1.0, seed=3, tool=True)
    prompts = [task.prompt for task in tasks for _ in range(3)]
    scores = [world.score(prompt, answer)[0] for prompt, answer in
              zip(prompts, chat_answers(policy, tokenizer, prompts, sampling))]
    assert any(len(set(scores[3 * i:3 * i + 3])) > 1 for i in range(len(tasks)))   # a spread to measure
    assert metrics["temp1/score/all"] == pytest.approx(sum(scores) / len(scores))
    variance = 0.0   # of the mean: each task's three answers vary; the tasks do not
    for i in range(len(tasks)):
        own = scores[3 * i:3 * i + 3]
        variance += sum((x - sum(own) / 3) ** 2 for x in own) / 2 / 3
    assert metrics["temp1/score_error/all"] == pytest.approx(math.sqrt(variance) / len(tasks))
    assert "greedy/score/all" in metrics


# --- the whole stage ---------------------------------------------------------------------------------

def test_stage_writes_its_outputs_and_ctrl_c_then_resume_equals_uninterrupted(tmp_path, make_checkpoint, monkeypatch):
    for folder in ("straight", "resumed"):
        make_checkpoint(tmp_path / folder / "sft.pt", "sft")
        make_checkpoint(tmp_path / folder / "reward.pt", "reward", seed=1)
    metrics = rlhf.main(tiny_config(tmp_path / "straight", max_iters=2))
    for name in ("rlhf.pt", "rlhf.json", "rlhf.png"):
        assert os.path.isfile(tmp_path / "straight" / name)
    with open(tmp_path / "straight" / "rlhf.json") as file:
        saved = json.load(file)
    assert saved["steps"] == 2 and saved["algo"] == "reinforce"
    for key in ("sft/temp1/score/all", "rlhf/temp1/score/all", "rlhf/greedy/score/all", "rlhf/kl",
                "sft/distinct", "rlhf/distinct_2", "sft/reward", "rlhf/oracle", "train/reward", "train/oracle", "seconds"):
        assert key in saved, key
    assert all(not isinstance(value, (dict, list)) for value in saved.values())   # flat
    assert metrics["steps"] == 2
    straight, _, checkpoint = load_model(str(tmp_path / "straight" / "rlhf.pt"), stages="rlhf")
    assert checkpoint["parent"]["stage"] == "sft"

    # Ctrl-C during the first step: that step finishes and is saved, and --resume does the second
    real_step = rlhf.rollout_step

    def interrupted_step(*args, **kwargs):
        if kwargs.get("step", args[9] if len(args) > 9 else None) == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    handler_before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(rlhf, "rollout_step", interrupted_step)
    partial = rlhf.main(tiny_config(tmp_path / "resumed", max_iters=2))
    assert partial["steps"] == 1 and partial["interrupted"] == 1 and "rlhf/temp1/score/all" not in partial
    assert signal.getsignal(signal.SIGINT) is handler_before   # Ctrl-C is ordinary again
    monkeypatch.setattr(rlhf, "rollout_step", real_step)

    # Ctrl-C while the trained policy is evaluated: the model is saved all the same, without the figures
    real_evaluate = rlhf.evaluate_heldout

    def interrupted_evaluation(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf, "evaluate_heldout", interrupted_evaluation)
    trained = rlhf.main(tiny_config(tmp_path / "resumed", max_iters=2, resume=True))
    assert trained["steps"] == 2 and trained["interrupted"] == 1 and "rlhf/temp1/score/all" not in trained
    monkeypatch.setattr(rlhf, "evaluate_heldout", real_evaluate)
    finished = rlhf.main(tiny_config(tmp_path / "resumed", max_iters=2, resume=True))   # evaluates it
    assert finished["steps"] == 2 and finished["interrupted"] == 0 and "rlhf/temp1/score/all" in finished
    resumed, _, _ = load_model(str(tmp_path / "resumed" / "rlhf.pt"), stages="rlhf")
    for key, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], tensor, atol=1e-6, rtol=0)


def test_ppo_and_dpo_stages_run(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path / "sft.pt", "sft")
    make_checkpoint(tmp_path / "reward.pt", "reward", seed=1)
    metrics = rlhf.main(tiny_config(tmp_path, algo="ppo", max_iters=1, ppo_epochs=1))
    assert "train/value_loss" in metrics and "train/clip_fraction" in metrics
    with open(tmp_path / "comparisons.jsonl", "w") as file:
        file.write(json.dumps({"prompt": "What is 2 + 3?", "completions": ["5", "6", "5"], "ranking": [0, 2, 1],
                               "scores": [1.0, 0.0, 1.0]}) + "\n")
    metrics = rlhf.main(tiny_config(tmp_path, algo="dpo", max_iters=1))
    assert metrics["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_dpo_never_trains_on_the_heldout_prompts_it_is_graded_on(tmp_path, make_checkpoint, world, monkeypatch):
    """reward.py ranks answers to the held-out prompts too (to measure its reward model there); DPO,
    which learns from the rankings themselves, must leave those out."""
    make_checkpoint(tmp_path / "sft.pt", "sft")
    heldout = rlhf.tasks_as_asked(world, world.tasks("eval"))[0].prompt
    with open(tmp_path / "comparisons.jsonl", "w") as file:
        file.write(json.dumps({"prompt": heldout, "completions": ["right", "wrong"], "ranking": [0, 1]}) + "\n")
    with pytest.raises(UsageError, match="held-out prompts are left out"):
        rlhf.main(tiny_config(tmp_path, algo="dpo", max_iters=1))
    training = world.tasks("rl")[0].prompt
    with open(tmp_path / "comparisons.jsonl", "a") as file:
        file.write(json.dumps({"prompt": training, "completions": ["right", "wrong"], "ranking": [0, 1]}) + "\n")
    seen = []
    real_step = rlhf.dpo_step

    def watched_step(policy, reference, optimizer, tokenizer, pairs, config):
        seen.extend(pairs)
        return real_step(policy, reference, optimizer, tokenizer, pairs, config)

    monkeypatch.setattr(rlhf, "dpo_step", watched_step)
    rlhf.main(tiny_config(tmp_path, algo="dpo", max_iters=1))
    assert seen and {prompt for prompt, _, _ in seen} == {training}


def test_reinforce_practises_on_the_prompts_of_data(tmp_path, make_checkpoint, monkeypatch):
    """--data with reinforce or ppo: RL prompts in TRL's {"prompt": ...} shape, practised on instead of the
    tiny world's (which the oracle can grade, so the log has no oracle column for them)."""
    make_checkpoint(tmp_path / "sft.pt", "sft")
    make_checkpoint(tmp_path / "reward.pt", "reward", seed=1)
    mine = ["Tell me a joke.", "Name a colour.", "Say hello."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(mine)))
    practised, real_step = [], rlhf.rollout_step

    def recording(policy, reference, value_head, optimizer, tokenizer, prompts, *args, **kwargs):
        practised.extend(prompts)
        return real_step(policy, reference, value_head, optimizer, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(rlhf, "rollout_step", recording)
    rlhf.main(tiny_config(tmp_path, data=str(tmp_path / "prompts.jsonl"), max_iters=3))
    assert sorted(set(practised)) == sorted(mine) and len(practised) == 3 * 2
    history = torch.load(tmp_path / "rlhf.pt", weights_only=True)["resume"]["history"]
    assert "oracle" not in history and len(history["reward"]) == 3
    with pytest.raises(UsageError, match="was trained with --data"):   # other prompts are another run
        rlhf.main(tiny_config(tmp_path, max_iters=4, resume=True))


def test_the_oracle_can_be_the_reward_and_needs_no_reward_model(tmp_path, make_checkpoint, world):
    """--reward oracle: the tiny world's grader scores the samples (there is no reward.pt to read), so the
    reward RL logs is the oracle's score of the same samples, step by step. The SFT model has learnt the
    answer to the facts question among the two steps' prompts, so those scores are not all zero."""
    policy, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    config = tiny_config(tmp_path, reward="oracle", max_iters=2, max_new_tokens=24)
    tasks = world.tasks("rl")
    asked = [task for step in range(2) for task in rlhf.batch_of(tasks, step, config.prompts_per_step, config.seed)]
    teach(policy, tokenizer, [(task.prompt, task.answer) for task in asked if task.family == "facts"], steps=80)
    save_checkpoint(str(tmp_path / "sft.pt"), stage="sft", model=policy, tokenizer=tokenizer, parent=None,
                    args={}, metrics={})
    metrics = rlhf.main(config)
    assert metrics["reward"] == "oracle"
    history = torch.load(tmp_path / "rlhf.pt", weights_only=True)["resume"]["history"]
    assert max(history["oracle"]) > 0 and history["reward"] == pytest.approx(history["oracle"])
    with pytest.raises(UsageError, match="--reward oracle scores samples"):
        rlhf.main(tiny_config(tmp_path, reward="oracle", algo="dpo"))
    make_checkpoint(tmp_path / "reward.pt", "reward", seed=1)
    with pytest.raises(UsageError, match="trained with --reward oracle"):
        rlhf.main(tiny_config(tmp_path, max_iters=3, resume=True))


# --- clear errors ----------------------------------------------------------------------------------

def test_missing_inputs_give_clear_errors(tmp_path, make_checkpoint, tiny_tokenizer):
    with pytest.raises(UsageError, match="sft.pt not found: run `python sft.py` first"):
        rlhf.main(tiny_config(tmp_path))
    make_checkpoint(tmp_path / "sft.pt", "sft")
    with pytest.raises(UsageError, match="reward.pt not found: run `python reward.py` first"):
        rlhf.main(tiny_config(tmp_path))
    with pytest.raises(UsageError, match="comparisons.jsonl not found: run `python reward.py` first"):
        rlhf.main(tiny_config(tmp_path, algo="dpo"))
    make_checkpoint(tmp_path / "reward.pt", "sft")   # the wrong stage
    with pytest.raises(UsageError, match="'sft' checkpoint"):
        rlhf.main(tiny_config(tmp_path))
    make_checkpoint(tmp_path / "reward.pt", "reward")
    with pytest.raises(UsageError, match="rlhf.pt not found"):
        rlhf.main(tiny_config(tmp_path, resume=True))
    with pytest.raises(UsageError, match="samples_per_prompt"):
        rlhf.main(tiny_config(tmp_path, samples_per_prompt=1))
    with pytest.raises(UsageError, match="--pretrain_mix adds rows .* --sft_coef > 0"):
        rlhf.main(tiny_config(tmp_path, sft_coef=0.0, pretrain_mix=4))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hello?"}\n{"question": "no prompt field"}\n')
    with pytest.raises(UsageError, match=r"prompts.jsonl:2: expected a \"prompt\" field"):
        rlhf.main(tiny_config(tmp_path, data=str(tmp_path / "prompts.jsonl")))
    with pytest.raises(UsageError, match="--reward oracle grades only the tiny world's own prompts"):
        rlhf.main(tiny_config(tmp_path, data=str(tmp_path / "prompts.jsonl"), reward="oracle"))
    with pytest.raises(UsageError, match="dpo samples nothing"):   # dpo's --data is pairs: the real reason
        rlhf.main(tiny_config(tmp_path, data=str(tmp_path / "prompts.jsonl"), reward="oracle", algo="dpo"))


def test_reward_model_with_another_tokenizer_is_refused(tmp_path, make_checkpoint, world):
    from bpe import Tokenizer
    from model import GPT, GPTConfig, save_checkpoint
    make_checkpoint(tmp_path / "sft.pt", "sft")
    other = Tokenizer.train(world.documents()[:50], vocab_size=300)
    model = GPT(GPTConfig(vocab_size=other.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=128,
                          scalar_head=True))
    save_checkpoint(str(tmp_path / "reward.pt"), stage="reward", model=model, tokenizer=other)
    with pytest.raises(UsageError, match="different tokenizers"):
        rlhf.main(tiny_config(tmp_path))


def test_sft_coef_trains_on_the_demonstrations_alongside_the_reward(policy_and_tokenizer):
    """With a reward that is the same for every sample and no KL leash, REINFORCE's advantages are all 0:
    the policy moves only through --sft_coef's loss on the demonstrations, and that loss falls."""
    from sft import encode_conversation, pad_batch
    policy, tokenizer = policy_and_tokenizer
    reference = rlhf.freeze(copy.deepcopy(policy))
    conversations = [[{"role": "user", "content": f"What is {n} + 1?"}, {"role": "assistant", "content": f"{n + 1}."}]
                     for n in range(8)]
    demonstrations = [pad_batch([encode_conversation(tokenizer, messages, policy.config.block_size)[:2]
                                 for messages in conversations])]

    def flat_reward(prompts, responses):
        return torch.zeros(len(responses))

    def run(sft_coef, steps=6):
        model = copy.deepcopy(policy)
        config = rlhf.Config(learning_rate=1e-2, samples_per_prompt=2, max_new_tokens=6, kl_coef=0.0,
                             truncation_penalty=0.0, sft_coef=sft_coef)
        optimizer = rlhf.make_optimizer(model, None, config)
        lines = [rlhf.rollout_step(model, reference, None, optimizer, tokenizer, PROMPTS, flat_reward,
                                   rlhf.RewardNormalizer(), config, step, demonstrations=demonstrations if sft_coef else None)
                 for step in range(steps)]
        return model, lines

    unmoved, _ = run(0.0)
    for key, tensor in unmoved.state_dict().items():
        assert torch.equal(tensor, policy.state_dict()[key]), key   # zero advantages: no update at all
    _, lines = run(1.0)
    assert lines[-1]["sft_loss"] < lines[0]["sft_loss"] - 0.5


def test_the_demonstrations_losses_add_up(policy_and_tokenizer, world):
    """SFT conversations and rows of pretraining text (--pretrain_mix) are separate batches; the supervised
    loss of a step is the sum of their mean losses, each computed as a plain forward pass would."""
    from sft import encode_conversation, pad_batch, pretraining_batch, pretraining_tokens
    policy, tokenizer = policy_and_tokenizer
    conversations = [[{"role": "user", "content": f"What is {n} + 2?"}, {"role": "assistant", "content": f"{n + 2}."}]
                     for n in range(4)]
    chats = pad_batch([encode_conversation(tokenizer, messages, policy.config.block_size)[:2]
                       for messages in conversations])
    stream = pretraining_tokens(tokenizer, world.documents()[:20], 2_000, random.Random(0))
    text = pretraining_batch(stream, rows=3, length=16, seed=0, step=0)
    expected = policy(*chats)[1] + policy(*text)[1]
    assert torch.allclose(rlhf.demonstration_loss(policy, [chats, text], "cpu"), expected)
    assert torch.allclose(rlhf.demonstration_loss(policy, [chats], "cpu"), policy(*chats)[1])


def test_the_stage_runs_with_sft_coef_and_pretrain_mix(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path / "sft.pt", "sft")
    make_checkpoint(tmp_path / "reward.pt", "reward", seed=1)
    alone = rlhf.main(tiny_config(tmp_path, sft_coef=1.0, sft_batch_size=4))
    assert alone["train/sft_loss"] > 0
    mixed = rlhf.main(tiny_config(tmp_path, sft_coef=1.0, sft_batch_size=4, pretrain_mix=2))
    assert mixed["train/sft_loss"] > alone["train/sft_loss"]   # a second loss, on the pretraining rows, adds to it
