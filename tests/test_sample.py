"""sample.py: one-shot answers, chat (multi-turn, commands, context overflow), --compare, --best_of and
the report card, on tiny random checkpoints: their answers are junk, but every path must work and every
number must be the one a direct computation gives."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import sample
from bpe import UsageError, render_chat
from conftest import teach
from model import GPT, chat_responses, load_model, save_checkpoint
from sample import Config, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*arguments, stdin=""):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *arguments], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def chat_session(monkeypatch, capsys, config, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    main(config)
    return capsys.readouterr().out


# --- one-shot ----------------------------------------------------------------------------------

def test_one_shot_prompt_prints_an_answer_and_exits_0(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    result = run_script("--ckpt", path, "--prompt", "What is 2 + 2?", "--max_new_tokens", "12", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    again = run_script("--ckpt", path, "--prompt", "What is 2 + 2?", "--max_new_tokens", "12", "--seed", "3")
    assert again.stdout == result.stdout   # same seed, same answer


def test_one_shot_samples_and_the_latest_stage_is_the_default(tmp_path, make_checkpoint, recorded_prompts):
    make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    make_checkpoint(tmp_path / "sft.pt", "sft")
    answers = main(Config(out_dir=str(tmp_path), prompt="Hello there", num_samples=3, max_new_tokens=6,
                          temperature=1.0, top_k=50, top_p=0.9))["answers"]
    assert len(answers) == 3
    _, tokenizer, _ = load_model(str(tmp_path / "sft.pt"))
    chat_ids, _ = render_chat(tokenizer, [{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    assert recorded_prompts[0] == chat_ids   # the sft model, in the chat format


def test_a_base_model_completes_documents_or_answers_a_fewshot_page(tmp_path, make_checkpoint, recorded_prompts, world):
    path = make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    _, tokenizer, _ = load_model(path)
    main(Config(ckpt=path, prompt="The capital of France is", max_new_tokens=5))
    assert recorded_prompts[-1] == tokenizer.encode("The capital of France is")
    answer = main(Config(ckpt=path, prompt="What is the capital of France?", fewshot=True, max_new_tokens=5))["answers"][0]
    page = tokenizer.decode(recorded_prompts[-1])   # the page's end: it is cut to fit the tiny context
    assert world.fewshot_prompt("What is the capital of France?").endswith(page)
    assert page.endswith("Question: What is the capital of France?\nAnswer:")
    assert "\n" not in answer


# --- chat --------------------------------------------------------------------------------------

def test_chat_through_stdin(tmp_path, make_checkpoint, monkeypatch, capsys, recorded_prompts):
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    _, tokenizer, _ = load_model(path)
    out = chat_session(monkeypatch, capsys, Config(ckpt=path, max_new_tokens=8, seed=1),
                       ["hello", "and again", "/temperature 0", "/temperature hot", "/reset", "fresh start",
                        "/nonsense", "/quit", "never read"])
    assert "(temperature 0.0)" in out and "/temperature needs a number" in out
    assert "(conversation cleared)" in out and "unknown command /nonsense" in out
    first, second, third = [p for p in recorded_prompts]  # no tool call: one generate per turn
    assert second[:len(first)] == first                  # turn 2 sees turn 1 ...
    assert tokenizer.decode(second).count("<|user|>") == 2
    reset, _ = render_chat(tokenizer, [{"role": "user", "content": "fresh start"}], add_generation_prompt=True)
    assert third == reset                                # ... and after /reset only itself


def test_a_streamed_chat_answer_is_its_message(tiny_tokenizer):
    """Printed as it arrives: without the space render_chat puts before every message (whether it comes as
    its own token, as before a digit or a tool call, or inside the first word's token), without the end
    token, and whole characters only (é is two bytes)."""
    end = tiny_tokenizer.special_tokens["<|end|>"]
    for message in ("Paris is big.", "42", "<|calc|>2 * 3<|result|> 6<|/result|> 6.", "été"):
        ids, _ = render_chat(tiny_tokenizer, [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": message}])
        answer = ids[ids.index(tiny_tokenizer.special_tokens["<|assistant|>"]) + 1:]   # ends with <|end|>
        assert answer[-1] == end
        for chat, expected in ((True, message), (False, " " + message)):  # a base model's text keeps its space
            printed = io.StringIO()
            stream = sample.TextStream(tiny_tokenizer, file=printed, message=chat)
            for token in answer:
                stream(0, token)
            stream.finish()
            assert printed.getvalue() == expected + "\n"


def test_every_way_an_answer_comes_back_is_the_message_without_render_chats_space(
        tmp_path, make_checkpoint, monkeypatch, capsys, recorded_prompts):
    """A model that learnt to answer "hi" with "Paris is big." writes " Paris is big." (the space
    render_chat trains before every message): one-shot, best-of-N, chat (and the history it renders next
    turn), chat_responses and RLHF's rollouts all hand back "Paris is big.", so that re-rendering it gives
    back exactly the tokens that were generated."""
    from rlhf import sample_rollout
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "sft.pt", "sft"))
    teach(model, tokenizer, [("hi", "Paris is big.")], steps=150)
    path = str(tmp_path / "sft.pt")
    save_checkpoint(path, stage="sft", model=model, tokenizer=tokenizer, parent=None, args={}, metrics={})
    make_checkpoint(tmp_path / "reward.pt", "reward")
    expected = "Paris is big."
    assert chat_responses(model, tokenizer, ["hi"]) == [expected]
    assert sample_rollout(model, tokenizer, ["hi"], 2, 8, seed=0).responses == [expected, expected]
    assert main(Config(ckpt=path, prompt="hi"))["answers"] == [expected]
    assert main(Config(ckpt=path, prompt="hi", best_of=2, temperature=1.0, reward_ckpt=str(tmp_path / "reward.pt"),
                       ))["answers"][0] == expected
    capsys.readouterr()
    out = chat_session(monkeypatch, capsys, Config(ckpt=path), ["hi", "and again"])
    assert expected in out and " " + expected not in out
    history, _ = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": expected}])
    assert recorded_prompts[-1][:len(history)] == history
    written = tokenizer.encode(" Paris is big.")
    assert history[-len(written) - 1:-1] == written     # the tokens the model wrote, exactly


def test_chat_as_a_subprocess_reads_until_end_of_input(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    result = run_script("--ckpt", path, "--max_new_tokens", "6", stdin="hi\n/reset\nhi again\n")
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stdout


def test_context_overflow_drops_the_oldest_turns_and_says_so(tmp_path, make_checkpoint, monkeypatch, capsys,
                                                           recorded_prompts):
    path = make_checkpoint(tmp_path / "sft.pt", "sft")   # block_size 128
    _, tokenizer, _ = load_model(path)
    turns = [f"turn {k}: " + "the cat sat on the mat " * 4 for k in range(5)]
    out = chat_session(monkeypatch, capsys, Config(ckpt=path, max_new_tokens=16, temperature=0), turns)
    assert re.search(r"outgrew the 128-token context: dropped the oldest \d+ turns?", out)
    last = tokenizer.decode(recorded_prompts[-1])
    assert len(recorded_prompts[-1]) <= 128 - 16
    assert "turn 4" in last and "turn 0" not in last
    assert last.startswith("<|user|>")   # whole turns are dropped, never half of one


def test_chat_prompt_keeps_whole_turns():
    from bpe import SPECIAL_TOKENS, Tokenizer
    tokenizer = Tokenizer([], {s: 256 + k for k, s in enumerate(SPECIAL_TOKENS)})   # bytes only
    messages = [{"role": "user", "content": "a" * 10}, {"role": "assistant", "content": "b" * 10},
                {"role": "user", "content": "c" * 10}]
    ids, kept, dropped = sample.chat_prompt(tokenizer, messages, block_size=40, max_new_tokens=10)
    assert kept == messages[2:] and dropped == 1 and len(ids) <= 30
    ids, kept, dropped = sample.chat_prompt(tokenizer, messages, block_size=100, max_new_tokens=10)
    assert kept == messages and dropped == 0
    # one message too long for the context keeps its end, behind the <|user|> that opens the turn
    long = [{"role": "user", "content": "x" * 50 + " the question?"}]
    ids, kept, dropped = sample.chat_prompt(tokenizer, long, block_size=40, max_new_tokens=10)
    assert len(ids) == 30 and ids[0] == tokenizer.special_tokens["<|user|>"]
    assert tokenizer.decode(ids[1:]).endswith("the question?<|end|><|assistant|>")


# --- compare and best-of-N ---------------------------------------------------------------------

def test_compare_lists_every_stage_present(tmp_path, make_checkpoint, capsys):
    for stage in ("pretrain", "sft", "reward", "rlhf"):
        make_checkpoint(tmp_path / f"{stage}.pt", stage, seed=len(stage))
    answers = main(Config(out_dir=str(tmp_path), compare=True, prompt="What is 2 + 2?", max_new_tokens=5))["answers"]
    out = capsys.readouterr().out
    assert list(answers) == ["pretrain", "sft", "rlhf"]   # the reward model does not write
    positions = [out.index(f"=== {stage} (") for stage in ("pretrain", "sft", "rlhf")]
    assert positions == sorted(positions)


def test_best_of_n_returns_the_sample_the_reward_model_scores_highest(tmp_path, make_checkpoint, capsys):
    from reward import reward_scores
    make_checkpoint(tmp_path / "sft.pt", "sft")
    make_checkpoint(tmp_path / "reward.pt", "reward", seed=5)
    result = main(Config(out_dir=str(tmp_path), best_of=5, prompt="Name an animal.", max_new_tokens=10,
                         temperature=1.0, verbose=True))
    reward_model, tokenizer, _ = load_model(str(tmp_path / "reward.pt"))
    direct = reward_scores(reward_model, tokenizer, ["Name an animal."] * 5, result["answers"])
    assert torch.allclose(direct, torch.tensor(result["rewards"]), atol=1e-5)
    assert result["best"] == result["answers"][int(direct.argmax())]
    assert len(set(result["answers"])) > 1
    out = capsys.readouterr().out
    assert out.count("[reward ") == 5 and out.rstrip().endswith(result["best"].rstrip())


def test_best_of_n_needs_a_reward_model(tmp_path, make_checkpoint):
    make_checkpoint(tmp_path / "sft.pt", "sft")
    with pytest.raises(UsageError, match="reward.pt not found"):
        main(Config(out_dir=str(tmp_path), best_of=3, prompt="hi"))


# --- the report card ---------------------------------------------------------------------------

def test_report_has_a_row_per_stage_and_family_with_the_numbers_of_a_direct_evaluation(tmp_path, make_checkpoint, world):
    from data.tinyworld import FAMILIES
    from sft import base_fewshot_responses
    for stage in ("pretrain", "sft", "reward", "rlhf"):
        make_checkpoint(tmp_path / f"{stage}.pt", stage, seed=len(stage))
    # the SFT model learns the facts questions' answers, so its rows cannot equal another stage's by chance
    facts = [task for task in sample.report_tasks(world, 2) if task.family == "facts"]
    sft_model, tokenizer, _ = load_model(str(tmp_path / "sft.pt"))
    teach(sft_model, tokenizer, [(task.prompt, task.answer) for task in facts], steps=100)
    save_checkpoint(str(tmp_path / "sft.pt"), stage="sft", model=sft_model, tokenizer=tokenizer, parent=None,
                    args={}, metrics={})
    for stage, figures in (("pretrain", {"seconds": 300.5}), ("reward", {"seconds": 150.0, "heldout/pairwise_accuracy": 0.75}),
                           ("rlhf", {"seconds": 200.0, "rlhf/kl": 1.5, "rlhf/distinct": 0.5})):
        (tmp_path / f"{stage}.json").write_text(json.dumps(figures))
    metrics = main(Config(out_dir=str(tmp_path), report=True, report_limit=2, max_new_tokens=16))

    tasks = sample.report_tasks(world, 2)
    assert [t.family for t in tasks] == [family for family in FAMILIES for _ in range(2)]
    direct, _ = world.evaluate(lambda prompts: chat_responses(sft_model, tokenizer, prompts, temperature=0.0,
                                                              max_new_tokens=16), tasks)
    assert {key: metrics[f"sft/greedy/{key}"] for key in direct} == direct
    assert direct["accuracy/facts"] == 1.0 and metrics["pretrain/greedy/accuracy/facts"] < 1.0
    base_model, _, _ = load_model(str(tmp_path / "pretrain.pt"))
    direct, _ = world.evaluate(lambda prompts: base_fewshot_responses(base_model, tokenizer, world, prompts, 16), tasks)
    assert {key: metrics[f"pretrain/greedy/{key}"] for key in direct} == direct

    text = (tmp_path / "report.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if re.match(r"\| (pretrain|sft|rlhf) \| \w+ \| \d+ \|", line)]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [(stage, family) for stage in ("pretrain", "sft", "rlhf")
                                                                  for family in FAMILIES]
    for row in rows:
        stage, family = row[0].strip(), row[1].strip()
        assert row[3].strip() == f"{100 * metrics[f'{stage}/greedy/accuracy/{family}']:.0f}%"
        assert row[4].strip() == f"{metrics[f'{stage}/greedy/score/{family}']:.2f}"
        assert row[6].strip() == f"{metrics[f'{stage}/temp1/score/{family}']:.2f}"
    assert "heldout/pairwise_accuracy 0.750" in text and "rlhf/kl 1.500" in text and "| pretrain | 300 |" in text
    assert metrics["techniques/stage"] == "rlhf"
    assert metrics["techniques/json/greedy/with/parse_rate"] == 1.0   # constrained JSON always parses
    # best-of-N: no judge picks better than the oracle's own pick of the same samples
    for name in ("facts", "json"):
        best = {key: metrics[f"techniques/best_of/{name}/{key}"]
                for key in ("one_sample", "reward_pick", "oracle_pick", "n")}
        assert best["n"] == sample.REPORT_BEST_OF
        assert max(best["one_sample"], best["reward_pick"]) <= best["oracle_pick"]
        assert f"| best-of-{best['n']} (`--best_of`), the reward model picks; {name}, T=1 | 2 | " \
               f"{100 * best['one_sample']:.0f}% | {100 * best['reward_pick']:.0f}% |" in text
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["seconds"] == metrics["seconds"]


def test_best_of_n_takes_the_highest_reward_of_each_prompt():
    right = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.1, 0.9, -2.0], [-1.0, 3.0, 0.5], [5.0, 1.0, 2.0]])   # picks 1, 1, 0
    assert sample.best_of_accuracies(right, rewards) == {
        "one_sample": pytest.approx(2 / 9), "reward_pick": pytest.approx(1 / 3), "oracle_pick": pytest.approx(2 / 3)}


# --- bad input ---------------------------------------------------------------------------------

def test_a_missing_checkpoint_is_one_clear_line(tmp_path):
    result = run_script("--ckpt", str(tmp_path / "nope.pt"), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "nope.pt not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_option_values_and_an_empty_prompt_are_refused(tmp_path, make_checkpoint):
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    result = run_script("--ckpt", path, "--embedding", "word2vec", "--prompt", "hi")
    assert result.returncode == 2 and "invalid choice: 'word2vec'" in result.stderr
    for bad, message in [(dict(prompt=""), "--prompt is empty"), (dict(prompt="  "), "--prompt is empty"),
                         (dict(prompt="hi", temperature=-1.0), "--temperature"), (dict(prompt="hi", top_p=1.5), "--top_p"),
                         (dict(prompt="hi", best_of=1), "--best_of"), (dict(compare=True), "--compare needs --prompt"),
                         (dict(prompt="hi", schema="a,,b", json=True), "--schema"),
                         (dict(prompt="hi", schema="name,prénom", json=True), "needs escaping"),
                         (dict(prompt="hi", schema='a"b', json=True), "needs escaping"),
                         (dict(prompt="hi", schema="a"), "--schema only applies with --json"),
                         (dict(prompt="hi", docs=str(tmp_path / "missing.txt")), "no such file"),
                         (dict(prompt="hi", docs=path), "not UTF-8 text"),   # a checkpoint is no text
                         (dict(out_dir=str(tmp_path / "empty"), prompt="hi"), "run `python pretrain.py` first")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            main(Config(ckpt=path if "out_dir" not in bad else "", **bad))
    with pytest.raises(UsageError, match="is a 'reward' checkpoint"):
        main(Config(ckpt=make_checkpoint(tmp_path / "reward.pt", "reward"), prompt="hi"))
    base = make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    for bad in (dict(json=True), dict(cot=True), dict(retrieval=True), dict(docs=str(tmp_path / "missing.txt"))):
        with pytest.raises(UsageError, match="an assistant's answer, and .*pretrain.pt is a base model"):
            main(Config(ckpt=base, prompt="The capital of", **bad))   # not silently ignored


def test_chain_of_thought_answers_may_run_past_max_new_tokens(tmp_path, make_checkpoint, monkeypatch):
    """A worked addition is longer than a direct answer's budget: with --cot the answer may fill the context."""
    path = make_checkpoint(tmp_path / "sft.pt", "sft")
    generated, original = [], GPT.generate

    def counting(self, *args, **kwargs):
        generations = original(self, *args, **kwargs)
        generated.append(sum(len(generation.tokens) for generation in generations))
        return generations

    monkeypatch.setattr(GPT, "generate", counting)
    main(Config(ckpt=path, prompt="What is 482 + 739?", max_new_tokens=6, temperature=0.0))
    direct = sum(generated)
    generated.clear()
    main(Config(ckpt=path, prompt="What is 482 + 739?", max_new_tokens=6, temperature=0.0, cot=True))
    assert direct <= 6 < sum(generated)


def test_a_long_answer_budget_still_leaves_the_prompt_half_the_context(tmp_path, make_checkpoint, recorded_prompts):
    """An answer budget as long as the context (as --cot gives a chat model); the base model must still
    see its text."""
    path = make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    model, _, _ = load_model(path)
    main(Config(ckpt=path, prompt="the cat lives near a small river and " * 40, max_new_tokens=model.config.block_size))
    assert len(recorded_prompts[0]) == model.config.block_size // 2
