"""End to end: every stage through its real command line, in order, on tiny configurations, each
checkpoint loaded by the next; then what a user does wrong or abruptly (run twice, skip a stage, mix
checkpoints, Ctrl-C, kill -9 while saving) and the determinism of a seeded run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny settings for each stage: seconds, not minutes. The model is small enough that every stage
# runs its whole code path (sampling, scoring, evaluation, plotting, saving) quickly.
TINY = {
    "pretrain.py": ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
                    "--batch_size", "8", "--max_iters", "20", "--eval_interval", "10", "--warmup_iters", "5",
                    "--vocab_size", "300", "--max_time", "0", "--samples", "0", "--eval_tokens", "2048"],
    "sft.py": ["--max_iters", "10", "--batch_size", "8", "--eval_limit", "3", "--eval_interval", "5",
               "--eval_max_new_tokens", "16"],
    "reward.py": ["--max_prompts", "12", "--max_iters", "4", "--eval_interval", "2", "--max_new_tokens", "12",
                  "--prompts_per_step", "4", "--examples", "1"],
    "rlhf.py": ["--max_iters", "2", "--prompts_per_step", "2", "--samples_per_prompt", "2",
                "--max_new_tokens", "12", "--eval_tasks", "12", "--diversity_prompts", "2"],
    "sample.py": ["--report", "--report_limit", "2", "--max_new_tokens", "12"],
}
STAGES = ["pretrain.py", "sft.py", "reward.py", "rlhf.py"]


def run(script, out_dir, *extra, check=True, timeout=300):
    command = [sys.executable, os.path.join(ROOT, script), "--out_dir", str(out_dir), "--device", "cpu",
               *TINY.get(script, []), *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole tiny pipeline, run once for this module."""
    out_dir = tmp_path_factory.mktemp("pipeline")
    for script in STAGES + ["sample.py"]:
        run(script, out_dir)
    return out_dir


def test_every_stage_hands_over_to_the_next(pipeline):
    for stage, parent in [("pretrain", None), ("sft", "pretrain"), ("reward", "sft"), ("rlhf", "sft")]:
        checkpoint = load(pipeline / f"{stage}.pt")
        assert checkpoint["stage"] == stage
        if parent is None:
            assert checkpoint["parent"] is None
        else:
            assert checkpoint["parent"]["stage"] == parent
        metrics = json.loads((pipeline / f"{stage}.json").read_text())
        assert metrics and all(not isinstance(value, (dict, list)) for value in metrics.values()), "flat keys"
        assert (pipeline / f"{stage}.png").stat().st_size > 0
    # every stage after pretraining speaks with the tokenizer pretraining made
    tokenizer = load(pipeline / "pretrain.pt")["tokenizer"]
    for stage in ["sft", "reward", "rlhf"]:
        assert load(pipeline / f"{stage}.pt")["tokenizer"] == tokenizer
    assert (pipeline / "comparisons.jsonl").stat().st_size > 0


def test_report_has_a_row_for_every_stage(pipeline):
    from data.tinyworld import FAMILIES
    report = (pipeline / "report.md").read_text()
    for stage in ["pretrain", "sft", "rlhf"]:
        for family in FAMILIES:
            assert f"| {stage} | {family} | " in report, (stage, family)
    for stage in ["pretrain", "sft", "reward", "rlhf"]:   # and a line of each stage's own figures
        assert re.search(rf"^\| {stage} \| \d+ \| ", report, re.MULTILINE), stage
    assert (pipeline / "report.png").stat().st_size > 0


def test_running_a_stage_twice_overwrites_cleanly(pipeline, tmp_path):
    out_dir = tmp_path / "again"
    shutil.copytree(pipeline, out_dir)
    before = os.path.getmtime(out_dir / "sft.pt")
    time.sleep(0.05)
    run("sft.py", out_dir)
    assert os.path.getmtime(out_dir / "sft.pt") > before
    assert load(out_dir / "sft.pt")["stage"] == "sft"
    assert not [name for name in os.listdir(out_dir) if name.startswith(".tmp-")]


@pytest.mark.parametrize("script, first", [("sft.py", "pretrain.py"), ("reward.py", "sft.py"),
                                           ("rlhf.py", "sft.py")])
def test_a_stage_without_its_input_says_which_script_to_run(tmp_path, script, first):
    result = run(script, tmp_path, check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error:") and first in message
    assert "Traceback" not in result.stderr


def test_a_checkpoint_of_another_tokenizer_is_refused(pipeline, tmp_path, make_checkpoint):
    out_dir = tmp_path / "mixed"
    shutil.copytree(pipeline, out_dir)
    make_checkpoint(out_dir / "reward.pt", "reward")  # the conftest tokenizer, not the pipeline's
    result = run("rlhf.py", out_dir, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tokenizer" in result.stderr.strip().splitlines()[-1]


def test_a_checkpoint_of_the_wrong_stage_is_refused(pipeline, tmp_path):
    out_dir = tmp_path / "wrong"
    shutil.copytree(pipeline, out_dir)
    shutil.copy(out_dir / "pretrain.pt", out_dir / "sft.pt")
    result = run("reward.py", out_dir, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pretrain" in result.stderr.strip().splitlines()[-1]


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "pretrain.py"), "--out_dir", str(tmp_path), "--device", "cpu",
               *TINY["pretrain.py"], "--max_iters", "100000", "--eval_interval", "1000000"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    for line in process.stdout:  # wait until training has started
        output += line
        if "step" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    output += process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    checkpoint = load(tmp_path / "pretrain.pt")
    assert checkpoint["stage"] == "pretrain"
    run("pretrain.py", tmp_path, "--resume", "--max_iters", str(checkpoint["resume"]["step"] + 5))


def test_kill_9_while_saving_never_leaves_a_broken_checkpoint(tmp_path):
    # Save at every step, and kill the process at moments spread over its life: whatever the moment,
    # the checkpoint is either absent or loads completely, and the next run works.
    command = [sys.executable, os.path.join(ROOT, "pretrain.py"), "--out_dir", str(tmp_path), "--device", "cpu",
               *TINY["pretrain.py"], "--max_iters", "100000", "--eval_interval", "1"]
    for delay in [3.0, 4.5, 6.0]:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
        if (tmp_path / "pretrain.pt").exists():
            assert load(tmp_path / "pretrain.pt")["stage"] == "pretrain"
    run("pretrain.py", tmp_path)
    assert load(tmp_path / "pretrain.pt")["stage"] == "pretrain"


def test_same_seed_same_metrics(tmp_path):
    def figures(out_dir):
        run("pretrain.py", out_dir, "--max_iters", "8")
        metrics = json.loads((out_dir / "pretrain.json").read_text())
        # wall-clock figures differ from run to run by nature; everything learned must not
        return {key: value for key, value in metrics.items()
                if not any(word in key for word in ("seconds", "per_second", "tokens_per_s", "time"))}
    assert figures(tmp_path / "a") == figures(tmp_path / "b")
