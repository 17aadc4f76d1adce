"""reward.py: the reward is read at the reward token, the pairwise loss is the textbook one, the
comparison files round-trip, and a reward model really learns a preference."""

import dataclasses
import json
import math
import os
import random
import signal
import threading
import time

import pytest
import torch

import reward
from bpe import TOOL_RESULT_PREFIX, UsageError
from conftest import CALCULATOR_QUESTION
from model import load_checkpoint, load_model, parse_config
from reward import (Comparison, Config, batch_loss, centre_rewards, clear_pair_accuracy, main, pad_batch, pairwise_loss,
                    rank_by_scores, read_preferences, reward_input_ids, reward_model_from_sft, reward_scores,
                    rewards_of, sample_comparisons, sft_logprob_rewards, spearman, spearman_within_prompts,
                    split_by_prompt, split_heldout, write_comparisons)
from sample import calculator_result


@pytest.fixture(params=[0.0, 1.0], ids=["head alone", "head + log-probability"])
def reward_model(request, tmp_path, make_checkpoint):
    """A tiny random reward model, with and without the log-probability part of the reward."""
    path = make_checkpoint(tmp_path / "reward.pt", "reward", reward_logprob_weight=request.param)
    model, tokenizer, _ = load_model(path, stages="reward")
    return model, tokenizer


PAIRS = [("What is 2 + 3?", "2 + 3 = 5."), ("Name a colour.", "Blue, I think, or perhaps a deep green."),
         ("Hi", "Hello!"), ("What is the capital of France?", "The capital of France is Paris.")]


def test_reward_is_read_at_the_reward_token(reward_model):
    model, tokenizer = reward_model
    ids, mask = reward_input_ids(tokenizer, *PAIRS[0], model.config.block_size)
    assert ids[-1] == tokenizer.special_tokens["<|reward|>"] and mask[-1] == 0
    position = torch.tensor([len(ids) - 1])
    alone = rewards_of(model, torch.tensor([ids]), position, torch.tensor([mask]))
    # whatever follows the reward token (padding, other text) cannot change the reward
    for tail in ([0, 0, 0], [5, 77, 123, 9, 200], list(range(20))):
        followed = rewards_of(model, torch.tensor([ids + tail]), position, torch.tensor([mask + [0] * len(tail)]))
        assert torch.allclose(alone, followed, atol=1e-6)
    # ... but the text before it does
    other, other_mask = reward_input_ids(tokenizer, PAIRS[0][0], "2 + 3 = 6.", model.config.block_size)
    assert not torch.allclose(alone, rewards_of(model, torch.tensor([other]), torch.tensor([len(other) - 1]),
                                                torch.tensor([other_mask])))


def test_reward_is_the_head_plus_the_weighted_mean_logprob_of_the_response(reward_model):
    """The reference computation, one token at a time: the head at the reward token, plus the weight
    times the mean of log p(token | everything before it) over the response's tokens."""
    model, tokenizer = reward_model
    prompt, response = PAIRS[3]
    ids, mask = reward_input_ids(tokenizer, prompt, response, model.config.block_size)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        counted = [logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]]
        head = model.scalar(torch.tensor([ids]), torch.tensor([len(ids) - 1])).item()
    assert len(counted) == len(tokenizer.encode(" " + response)) + 1   # the response (after its MESSAGE_PREFIX) and <|end|>
    expected = head + model.config.reward_logprob_weight * sum(counted) / len(counted)
    assert reward_scores(model, tokenizer, [prompt], [response]).item() == pytest.approx(expected, abs=1e-5)


def test_padded_batch_equals_one_by_one(reward_model):
    model, tokenizer = reward_model
    prompts, responses = zip(*PAIRS)
    together = reward_scores(model, tokenizer, list(prompts), list(responses), batch_size=3)
    alone = torch.cat([reward_scores(model, tokenizer, [p], [r]) for p, r in PAIRS])
    assert together.shape == (len(PAIRS),)
    assert torch.allclose(together, alone, atol=1e-5)


def test_too_long_input_keeps_the_reward_token(reward_model):
    model, tokenizer = reward_model
    ids, mask = reward_input_ids(tokenizer, "word " * 400, "fine.", model.config.block_size)
    assert len(ids) == len(mask) == model.config.block_size and ids[-1] == tokenizer.special_tokens["<|reward|>"]
    assert sum(mask) == len(tokenizer.encode(" fine.")) + 1       # the whole response is still in view


def test_pad_batch_positions():
    idx, positions = pad_batch([[1, 2, 3], [4]], "cpu")
    assert idx.tolist() == [[1, 2, 3], [4, 0, 0]] and positions.tolist() == [2, 0]


def softplus(x):
    return math.log1p(math.exp(x))   # -log sigmoid(-x)


def test_pairwise_loss_matches_hand_computation_and_ignores_ties():
    # prompt 0: completion 0 is best, 1 and 2 tie below it; prompt 1: completion 3 beats 4
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    levels = torch.tensor([0, 1, 1, 0, 1])
    loss, accuracy, pairs = pairwise_loss(rewards, groups, levels)
    prompt0 = (softplus(-(1.0 - 0.0)) + softplus(-(1.0 - -1.0))) / 2    # the tie (1, 2) gives no pair
    prompt1 = softplus(-(0.5 - 2.0))
    assert loss.item() == pytest.approx((prompt0 + prompt1) / 2, rel=1e-6)
    assert pairs == 3 and accuracy.item() == pytest.approx(2 / 3)
    # moving only the tied completions relative to each other changes nothing
    moved = rewards.clone()
    moved[1], moved[2] = -1.0, 0.0
    assert pairwise_loss(moved, groups, levels)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # all rewards equal (the untrained head): log 2 per pair, and accuracy is chance, not 0
    equal_loss, equal_accuracy, _ = pairwise_loss(torch.zeros(5), groups, levels)
    assert equal_loss.item() == pytest.approx(math.log(2)) and equal_accuracy.item() == 0.5


def test_pairwise_loss_stays_finite_and_has_gradients():
    rewards = torch.tensor([-200.0, 200.0], requires_grad=True)
    loss, _, _ = pairwise_loss(rewards, torch.tensor([0, 0]), torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(400.0) and torch.isfinite(rewards.grad).all()


def test_ties_make_no_pairs():
    comparison = rank_by_scores("p", ["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.5])
    assert comparison.ranking == [0, 2, 3, 1]
    assert sorted(comparison.pairs()) == [(0, 1), (0, 3), (2, 1), (2, 3), (3, 1)]
    assert rank_by_scores("p", ["a", "b"], [0.0, 0.0]).pairs() == []
    # without scores a ranking is strict
    assert Comparison("p", ["a", "b", "c"], [2, 0, 1]).pairs() == [(0, 1), (2, 0), (2, 1)]


def test_sampled_comparisons_round_trip(tmp_path, make_checkpoint, world):
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"), stages="sft")
    prompts = [task.prompt for task in world.tasks("reward")[:3]]
    comparisons = sample_comparisons(model, tokenizer, world, prompts, samples_per_prompt=3,
                                     temperature=1.0, max_new_tokens=6, seed=0)
    for comparison in comparisons:
        assert len(comparison.completions) == 3 and len(comparison.scores) == 3
        assert comparison.scores == [world.score(comparison.prompt, c)[0] for c in comparison.completions]
        ranked = [comparison.scores[i] for i in comparison.ranking]
        assert ranked == sorted(ranked, reverse=True)
    path = tmp_path / "comparisons.jsonl"
    write_comparisons(path, comparisons)
    read, skipped = read_preferences(str(path))
    assert skipped == 0 and read == comparisons
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == prompts


def test_the_labelers_see_answers_with_the_calculators_result(calculator_user, world):
    """The SFT model is sampled as it is used, with its tool: an answer that asks the calculator holds
    the tool's result (not the model's guess at it), and the oracle grades that whole answer."""
    model, tokenizer = calculator_user
    comparisons = sample_comparisons(model, tokenizer, world, [CALCULATOR_QUESTION], samples_per_prompt=4,
                                     temperature=1.0, max_new_tokens=24, seed=0)
    completions = comparisons[0].completions
    called = [c for c in completions if "<|calc|>" in c]
    assert any("<|calc|>12 * 7<|result|> 84<|/result|>" in c for c in called), completions
    for completion in called:   # the tool's value of whatever expression the model wrote, not its guess
        expression, rest = completion.split("<|calc|>", 1)[1].split("<|result|>", 1)
        assert rest.startswith(TOOL_RESULT_PREFIX + calculator_result(expression) + "<|/result|>")
    assert comparisons[0].scores == [world.score(CALCULATOR_QUESTION, c)[0] for c in completions]
    # what the reward model reads: the same tokens, with the tool's output out of the response's train mask
    ids, mask = reward_input_ids(tokenizer, CALCULATOR_QUESTION, called[0], block_size=128)
    start, end = ids.index(tokenizer.special_tokens["<|result|>"]) + 1, ids.index(tokenizer.special_tokens["<|/result|>"])
    assert tokenizer.decode(ids[start:end]) == TOOL_RESULT_PREFIX + "84"
    assert mask[start - 1] == 1 and mask[start:end + 1] == [0] * (end + 1 - start)


def test_preference_files_in_both_shapes(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
             {"prompt": "3+3?", "completions": ["7", "6", "six"], "ranking": [1, 2, 0]},
             {"prompt": "1+1?", "completions": ["2", "3", "two"], "ranking": [0, 2, 1], "scores": [1, 0, 1]},
             {"prompt": "x", "chosen": "same", "rejected": "same"},
             {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]   # TRL's plain text
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    comparisons, skipped = read_preferences(str(path))
    assert skipped == 1 and len(comparisons) == 4
    assert comparisons[3].completions == ["blue.", "green."]   # render_chat puts its own space before them
    assert comparisons[0].completions == ["4", "5"] and comparisons[0].pairs() == [(0, 1)]
    assert sorted(comparisons[1].pairs()) == [(1, 0), (1, 2), (2, 0)]
    assert sorted(comparisons[2].pairs()) == [(0, 1), (2, 1)]      # "2" and "two" tie


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "p", "chosen": "a"}', "must both be strings"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "non-empty string"),
    ('{"prompt": "p", "answer": "a"}', "expected \"chosen\""),
    ('{"prompt": "p", "completions": ["a"], "ranking": [0]}', "at least two"),
    ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}', "each completion index"),
    ('{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0], "scores": [1, 0]}', "disagrees"),
    ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "scores": [1]}', "one finite number"),
    ('{"prompt": "p", "chosen": "a", ', "not valid JSON"),
    ('["p", "a", "b"]', "JSON object"),
])
def test_malformed_preference_lines_name_file_and_line(tmp_path, bad, reason):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + bad + "\n")
    with pytest.raises(UsageError, match=rf"^{path}:2: .*{reason}"):
        read_preferences(str(path))


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: ranks x = 1,2,3,4 and y = 1.5,1.5,3.5,3.5 -> r = 0.894...
    assert spearman([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == pytest.approx(2 / math.sqrt(5))


GOOD = ["good", "great", "kind", "right"]
BAD = ["bad", "awful", "rude", "wrong"]
FILLER = ["the", "cat", "dog", "river", "lives", "near", "a", "small", "town", "and", "is", "very"]


def synthetic_preferences(count, seed):
    """Prompts and answers of random filler words; the better answer carries a 'good' word where the
    worse one carries a 'bad' word. Half the lines are pairs, half rankings of three."""
    rng = random.Random(seed)

    def sentence(word):
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), word)
        return " ".join(words) + "."

    records = []
    for index in range(count):
        prompt = " ".join(rng.choices(FILLER, k=4)) + "?"
        if index % 2:
            records.append({"prompt": prompt, "chosen": sentence(rng.choice(GOOD)), "rejected": sentence(rng.choice(BAD))})
        else:
            texts = [sentence(rng.choice(GOOD)), sentence(rng.choice(BAD)), sentence(rng.choice(GOOD))]
            records.append({"prompt": prompt, "completions": texts, "ranking": [0, 2, 1], "scores": [1, 0, 1]})
    return records


def test_reward_model_learns_a_preference(tmp_path, make_checkpoint):
    sft = make_checkpoint(tmp_path / "sft.pt", "sft")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(200, seed=0)))
    config = Config(out_dir=str(tmp_path / "run"), init_from=sft, data=str(data), device="cpu",
                    max_iters=60, prompts_per_step=16, learning_rate=3e-3, eval_interval=20, examples=1)
    metrics = main(config)
    assert metrics["heldout/pairwise_accuracy"] >= 0.85          # chance is 0.5
    assert metrics["heldout/loss"] < math.log(2)                  # better than the untrained model's log 2
    assert abs(metrics["reward/mean"]) < 0.5 * metrics["reward/std"]    # centred
    checkpoint = load_checkpoint(str(tmp_path / "run" / "reward.pt"), stages="reward")
    assert checkpoint["parent"] == {"path": sft, "stage": "sft"}
    assert checkpoint["model_config"]["scalar_head"] and "resume" not in checkpoint
    assert json.loads((tmp_path / "run" / "reward.json").read_text()) == pytest.approx(metrics, nan_ok=True)
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0
    # --score prints the same reward as reward_scores
    model, tokenizer, _ = load_model(str(tmp_path / "run" / "reward.pt"), stages="reward")
    prompt, response = "the cat?", "the dog is good."
    scored = main(parse_config(Config, ["--out_dir", str(tmp_path / "run"), "--score", prompt, response]))
    assert scored["reward"] == pytest.approx(reward_scores(model, tokenizer, [prompt], [response]).item(), abs=1e-5)
    assert scored["head"] + model.config.reward_logprob_weight * scored["logprob"] == pytest.approx(scored["reward"], abs=1e-5)
    assert scored["logprob"] < 0
    # and the model prefers the good words to the bad ones in a sentence it has never seen
    good = reward_scores(model, tokenizer, [prompt] * len(GOOD), [f"the dog is {word}." for word in GOOD])
    bad = reward_scores(model, tokenizer, [prompt] * len(BAD), [f"the dog is {word}." for word in BAD])
    assert good.mean() > bad.mean()


def resumable_run(tmp_path, make_checkpoint, prompts, max_iters):
    """config(folder, **overrides): a reward run on synthetic preferences, each in its own folder."""
    sft = make_checkpoint(tmp_path / "sft.pt", "sft")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(prompts, seed=1)))

    def config(name, **overrides):
        return Config(out_dir=str(tmp_path / name), init_from=sft, data=str(data), device="cpu",
                      max_iters=max_iters, prompts_per_step=8, learning_rate=3e-3, eval_interval=10, examples=0,
                      **overrides)
    return config


def test_ctrl_c_saves_and_resume_matches_the_uninterrupted_run(tmp_path, make_checkpoint, capsys):
    config = resumable_run(tmp_path, make_checkpoint, prompts=60, max_iters=30)

    straight = main(config("run"))
    assert straight["interrupted"] == 0 and straight["steps"] == 30
    straight_model = load_checkpoint(str(tmp_path / "run" / "reward.pt"))["model"]

    def press_ctrl_c():  # as soon as the first step has been reported
        deadline = time.time() + 60
        while "reward step" not in capsys.readouterr().err and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    capsys.readouterr()   # forget the first run's output
    handler_before = signal.getsignal(signal.SIGINT)
    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    interrupted = main(config("halves"))
    presser.join()
    assert interrupted["interrupted"] == 1 and 0 < interrupted["steps"] < 30
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert load_checkpoint(str(tmp_path / "halves" / "reward.pt"))["resume"]["step"] == interrupted["steps"]
    resumed = main(config("halves", resume=True))
    assert resumed["steps"] == 30 and resumed["interrupted"] == 0
    resumed_model = load_checkpoint(str(tmp_path / "halves" / "reward.pt"))["model"]
    for name, tensor in straight_model.items():
        assert torch.allclose(tensor, resumed_model[name], atol=1e-5), name
    assert resumed["heldout/pairwise_accuracy"] == pytest.approx(straight["heldout/pairwise_accuracy"])


def test_ctrl_c_after_training_still_saves_the_model_and_resume_finishes_it(tmp_path, make_checkpoint, monkeypatch):
    """Centring and evaluating a trained model take a while; a Ctrl-C then must not lose the training."""
    config = resumable_run(tmp_path, make_checkpoint, prompts=30, max_iters=6)

    straight = main(config("run"))
    calls = []
    real_centre = reward.centre_rewards

    def ctrl_c_after_training(*args, **kwargs):   # call 1 centres the untrained model, call 2 the trained one
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_centre(*args, **kwargs)

    monkeypatch.setattr(reward, "centre_rewards", ctrl_c_after_training)
    interrupted = main(config("later"))
    assert interrupted["interrupted"] == 1 and interrupted["steps"] == 6
    assert "heldout/pairwise_accuracy" not in interrupted
    monkeypatch.setattr(reward, "centre_rewards", real_centre)
    finished = main(config("later", resume=True))   # no steps left: it centres and evaluates
    assert finished["interrupted"] == 0 and finished["steps"] == 6
    assert finished["heldout/pairwise_accuracy"] == pytest.approx(straight["heldout/pairwise_accuracy"])
    straight_model = load_checkpoint(str(tmp_path / "run" / "reward.pt"))["model"]
    finished_model = load_checkpoint(str(tmp_path / "later" / "reward.pt"))["model"]
    for name, tensor in straight_model.items():
        assert torch.allclose(tensor, finished_model[name], atol=1e-5), name


def test_missing_and_wrong_stage_checkpoints_are_clear_errors(tmp_path, make_checkpoint):
    with pytest.raises(UsageError, match="sft.py"):
        main(Config(out_dir=str(tmp_path), device="cpu"))
    pretrain = make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    with pytest.raises(UsageError, match="'pretrain' checkpoint"):
        main(Config(out_dir=str(tmp_path), init_from=pretrain, device="cpu"))
    with pytest.raises(UsageError, match="reward.py"):
        main(Config(out_dir=str(tmp_path), score=["p", "r"], device="cpu"))
    make_checkpoint(tmp_path / "reward.pt", "reward")
    with pytest.raises(UsageError, match="two texts"):
        main(Config(out_dir=str(tmp_path), score=["only a prompt"], device="cpu"))
    for values, message in [({"max_iters": 0}, "--max_iters must be positive"),
                            ({"eval_interval": 0}, "--eval_interval must be positive"),
                            ({"learning_rate": -1.0}, "--learning_rate must be positive")]:
        with pytest.raises(UsageError, match=message):   # not a traceback, nor an untrained reward.pt
            main(Config(out_dir=str(tmp_path), init_from=pretrain, device="cpu", **values))


def test_all_tied_comparisons_are_a_clear_error(tmp_path, make_checkpoint):
    sft = make_checkpoint(tmp_path / "sft.pt", "sft")
    data = tmp_path / "tied.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "scores": [1, 1]}) + "\n")
    with pytest.raises(UsageError, match="all tied"):
        main(Config(out_dir=str(tmp_path), init_from=sft, data=str(data), device="cpu"))


def test_batch_loss_equals_scoring_each_completion_alone(reward_model):
    model, tokenizer = reward_model
    comparisons = [rank_by_scores("What is 2 + 3?", ["2 + 3 = 5.", "5", "2 + 3 = 6, I am quite sure of it."], [1.0, 0.5, 0.0]),
                   rank_by_scores("word " * 30, ["a", "b", "c", "d"], [0.0, 1.0, 1.0, 0.2])]
    _, loss, accuracy, _ = batch_loss(model, comparisons, tokenizer, Config(), "cpu", rows_per_pass=2)
    prompts = [c.prompt for c in comparisons for _ in c.completions]
    rewards = reward_scores(model, tokenizer, prompts, [t for c in comparisons for t in c.completions], batch_size=1)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    levels = torch.tensor([level for c in comparisons for level in c.levels()])
    expected, expected_accuracy, _ = pairwise_loss(rewards, groups, levels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and accuracy.item() == pytest.approx(expected_accuracy.item())


def test_clear_pair_accuracy_counts_only_right_against_wrong():
    comparisons = [rank_by_scores("p", ["right", "near miss", "garbage"], [1.0, 0.2, 0.0]),
                   rank_by_scores("q", ["a", "b"], [0.1, 0.0])]               # two kinds of wrong: not clear
    rewards = torch.tensor([0.5, 1.0, -1.0, 3.0, -3.0])   # ranks "near miss" above "right"
    assert clear_pair_accuracy(comparisons, rewards) == (0.5, 2)
    assert clear_pair_accuracy(comparisons, rewards, gap=0.1) == (pytest.approx(3 / 4), 4)


def test_spearman_within_prompts_averages_each_prompts_own_order():
    comparisons = [rank_by_scores("p", ["a", "b", "c"], [1.0, 0.5, 0.0]),
                   rank_by_scores("q", ["a", "b"], [0.0, 1.0]),
                   rank_by_scores("r", ["a", "b"], [1.0, 1.0])]          # all tied: skipped
    rewards = torch.tensor([3.0, 2.0, 1.0, 5.0, -5.0, 0.0, 9.0])   # p in order, q reversed
    assert spearman_within_prompts(comparisons, rewards) == pytest.approx(0.0)
    assert spearman_within_prompts(comparisons[:1], rewards) == pytest.approx(1.0)


def test_the_worlds_held_out_prompts_are_its_eval_split(world):
    """reward.py trains on the reward and SFT splits' samples and evaluates on the eval split's: no
    stage trains on those prompts, so the held-out accuracy is on prompts nothing has seen."""
    trained_on = {task.prompt for split in ("reward", "sft", "rl") for task in world.tasks(split)}
    eval_prompts = [task.prompt for task in world.tasks("eval")]
    assert not trained_on & set(eval_prompts)
    comparisons = [Comparison(prompt, ["a", "b"], [0, 1]) for prompt in eval_prompts[:5] + sorted(trained_on)[:7]]
    train, heldout = split_by_prompt(comparisons, frozenset(eval_prompts))
    assert [c.prompt for c in heldout] == eval_prompts[:5]
    assert [c.prompt for c in train] == sorted(trained_on)[:7]


def test_split_heldout_keeps_whole_prompts_apart():
    comparisons = [Comparison(f"p{i}", ["a", "b"], [0, 1]) for i in range(20)]
    train, heldout = split_heldout(comparisons, 0.2, seed=3)
    assert len(heldout) == 4 and len(train) == 16
    assert sorted(c.prompt for c in train + heldout) == sorted(c.prompt for c in comparisons)
    assert split_heldout(comparisons, 0.2, seed=3)[1] == heldout   # seeded: the same every run
    # several pairs of one prompt (TRL's prompt/chosen/rejected lines) all land on the same side
    pairs = [Comparison(f"p{i % 10}", [f"a{i}", "b"], [0, 1]) for i in range(30)]
    train, heldout = split_heldout(pairs, 0.2, seed=3)
    assert len({c.prompt for c in heldout}) == 2 and len(heldout) == 6
    assert not {c.prompt for c in train} & {c.prompt for c in heldout}


def test_logprob_baseline_is_the_mean_log_probability_of_the_response(tmp_path, make_checkpoint):
    from model import render_chat
    from reward import sft_logprob_rewards
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"), stages="sft")
    comparisons = [Comparison(prompt, [response, response + " More."], [0, 1]) for prompt, response in PAIRS]
    batched = sft_logprob_rewards(model, tokenizer, comparisons, batch_size=3)
    # the reference, one conversation at a time: log p of each trained token given what comes before
    for row, (comparison, text) in enumerate((c, t) for c in comparisons for t in c.completions):
        ids, mask = render_chat(tokenizer, [{"role": "user", "content": comparison.prompt},
                                            {"role": "assistant", "content": text}])
        logits, _ = model(torch.tensor([ids]))
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        scored = [logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]]
        assert batched[row].item() == pytest.approx(sum(scored) / len(scored), abs=1e-4)


def test_untrained_reward_is_the_sft_models_mean_logprob_or_zero(tmp_path, make_checkpoint):
    """The new head starts at zero, so before training the reward is exactly logprob_weight x the SFT
    model's mean log-probability of the response (the baseline reward.py prints), and 0 for the plain
    head: a first pairwise loss of log 2."""
    sft, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"), stages="sft")
    comparisons = [rank_by_scores(prompt, [response, response[::-1]], [1.0, 0.0]) for prompt, response in PAIRS]
    prompts = [c.prompt for c in comparisons for _ in c.completions]
    responses = [text for c in comparisons for text in c.completions]
    baseline = sft_logprob_rewards(sft, tokenizer, comparisons)
    for weight in (0.0, 1.0, 2.5):
        model = reward_model_from_sft(sft, weight)
        assert model.config.reward_logprob_weight == weight
        rewards = reward_scores(model, tokenizer, prompts, responses)
        assert torch.allclose(rewards, weight * baseline, atol=1e-5)
    plain = reward_model_from_sft(sft, 0.0)
    _, loss, _, _ = batch_loss(plain, comparisons, tokenizer, Config(), "cpu")
    assert loss.item() == pytest.approx(math.log(2))


def test_centring_moves_the_mean_reward_to_zero_through_the_head_alone(tmp_path, make_checkpoint):
    """With the log-probability in it a reward starts far from 0; centre_rewards shifts only the head's
    bias, so every pair's margin (all the loss sees) stays exactly what it was."""
    sft, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"), stages="sft")
    model = reward_model_from_sft(sft, 1.0)
    comparisons = [rank_by_scores(prompt, [response, response[::-1], "ok"], [1.0, 0.5, 0.0]) for prompt, response in PAIRS]
    prompts = [c.prompt for c in comparisons for _ in c.completions]
    responses = [text for c in comparisons for text in c.completions]
    before = reward_scores(model, tokenizer, prompts, responses)
    offset = centre_rewards(model, tokenizer, comparisons)
    after = reward_scores(model, tokenizer, prompts, responses)
    assert before.mean().item() < -1.0 and offset == pytest.approx(before.mean().item(), abs=1e-5)
    assert abs(after.mean().item()) < 1e-5
    assert torch.allclose(after - after[0], before - before[0], atol=1e-5)
    # centred on a random sample of the completions (how training starts): that sample's mean is removed
    sampled = reward_model_from_sft(sft, 1.0)
    chosen = random.Random(3).sample(range(len(prompts)), 4)
    offset = centre_rewards(sampled, tokenizer, comparisons, sample=4, seed=3)
    assert offset == pytest.approx(before[chosen].mean().item(), abs=1e-5)
    assert before[chosen].mean().item() != pytest.approx(before.mean().item(), abs=1e-3)


def test_resume_with_another_logprob_weight_or_train_layers_is_a_clear_error(tmp_path, make_checkpoint):
    sft = make_checkpoint(tmp_path / "sft.pt", "sft")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(20, seed=2)))
    config = Config(out_dir=str(tmp_path / "run"), init_from=sft, data=str(data), device="cpu", max_iters=2,
                    prompts_per_step=4, examples=0)
    main(config)
    checkpoint = load_checkpoint(str(tmp_path / "run" / "reward.pt"))
    checkpoint["resume"] = {"step": 1}     # as if interrupted after one step
    torch.save(checkpoint, tmp_path / "run" / "reward.pt")
    with pytest.raises(UsageError, match="--logprob_weight 1.0; resume with the same"):
        main(dataclasses.replace(config, logprob_weight=0.0, resume=True))
    with pytest.raises(UsageError, match="--train_layers 1; resume with the same"):
        main(dataclasses.replace(config, train_layers=-1, resume=True))


def test_only_the_head_and_the_top_blocks_train(tmp_path, make_checkpoint):
    sft = make_checkpoint(tmp_path / "sft.pt", "sft", n_layer=3)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_preferences(40, seed=3)))
    before = load_checkpoint(sft)["model"]
    config = Config(out_dir=str(tmp_path / "run"), init_from=sft, data=str(data), device="cpu", max_iters=3,
                    prompts_per_step=8, learning_rate=1e-2, examples=0, train_layers=1)
    main(config)
    after = load_checkpoint(str(tmp_path / "run" / "reward.pt"))["model"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("transformer.h.2.") for name in changed)   # the top block only
    assert "transformer.wte.weight" not in changed        # the embeddings, tied to the LM head, stay as SFT left them
    assert not torch.equal(after["scalar_head.weight"], torch.zeros_like(after["scalar_head.weight"]))
    everything = main(dataclasses.replace(config, out_dir=str(tmp_path / "all"), train_layers=-1))
    assert everything["steps"] == 3
    after = load_checkpoint(str(tmp_path / "all" / "reward.pt"))["model"]
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    for wrong in (4, -2):
        with pytest.raises(UsageError, match=f"--train_layers {wrong}: choose from 0 .* to 3"):
            main(dataclasses.replace(config, train_layers=wrong))
