"""pretrain.py on tiny configurations: the batch layout, bits per byte, that loss falls, that resume and
two processes retrace a plain run, and that bad input gives a one-line error and writes nothing."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from bpe import Tokenizer, UsageError
from model import GPT, GPTConfig, load_model
import pretrain
from pretrain import (EOT, Config, batch_starts, encode_documents, eval_starts, evaluate, micro_batches,
                      prepare_corpus, rows_at, token_byte_counts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMALS = ["cat", "dog", "owl", "ant", "cow", "bee", "fox", "eel", "yak", "emu"]


def tiny_documents(count=60):
    """Small, learnable documents: a few sentence shapes over a few words."""
    documents = []
    for index in range(count):
        animal, other = ANIMALS[index % 10], ANIMALS[(index * 3 + 1) % 10]
        documents.append(f"The {animal} met the {other}. The {animal} has {index % 7 + 2} legs. "
                         f"The {other} said hello to the {animal} on day {index}.")
    return documents


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": document}) + "\n" for document in tiny_documents()), encoding="utf-8")
    return str(path)


def tiny_config(data, out_dir, **overrides):
    settings = dict(data=data, out_dir=str(out_dir), vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=32,
                    batch_size=8, learning_rate=3e-3, warmup_iters=2, max_iters=20, max_time=0.0, eval_interval=5,
                    eval_tokens=512, samples=0, device="cpu", seed=7)
    settings.update(overrides)
    return Config(**settings)


def resume_state(out_dir):
    return torch.load(os.path.join(out_dir, "pretrain.pt"), map_location="cpu", weights_only=True)["resume"]


# --- data and batches ----------------------------------------------------------------------------

def test_documents_are_joined_with_end_of_text_and_specials_in_text_stay_text():
    tokenizer = Tokenizer.train(tiny_documents(), 300)
    eot = tokenizer.special_tokens[EOT]
    stream = encode_documents(tokenizer, ["The cat.", "A dog <|endoftext|> here."])
    assert stream.dtype == np.uint16
    expected = [eot] + tokenizer.encode("The cat.") + [eot] + tokenizer.encode("A dog <|endoftext|> here.") + [eot]
    assert stream.tolist() == expected
    assert stream.tolist().count(eot) == 3  # the typed "<|endoftext|>" is plain bytes, not the token


def test_rows_are_shifted_by_one_and_processes_share_out_each_batch():
    tokens = np.arange(500, dtype=np.uint16)
    x, y = rows_at(tokens, np.array([0, 100, 437]), 62)
    assert x.shape == y.shape == (3, 62) and x.dtype == torch.int64
    assert x[1].tolist() == list(range(100, 162))
    assert y[1].tolist() == list(range(101, 163))        # target t is input t + 1
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert y[2, -1].item() == 499                         # the last row may end on the last token

    config = Config(batch_size=12, grad_accum=3, block_size=16, seed=5)
    starts = batch_starts(4, config.seed, 500, config.block_size, config.batch_size)
    assert np.array_equal(starts, batch_starts(4, config.seed, 500, 16, 12))       # a step's batch is a function of it
    assert not np.array_equal(starts, batch_starts(5, config.seed, 500, 16, 12))
    assert starts.max() <= 500 - 16 - 1
    for world_size in (1, 2):
        shares = [micro_batches(4, config, 500, rank, world_size) for rank in range(world_size)]
        assert all(len(share) == 3 and all(len(rows) == 12 // 3 // world_size for rows in share) for share in shares)
        together = sorted(np.concatenate([rows for share in shares for rows in share]).tolist())
        assert together == sorted(starts.tolist())     # every row once, whatever the number of processes


def test_tokens_are_cached_and_reused(corpus_file, tmp_path):
    config = tiny_config(corpus_file, tmp_path)
    first = prepare_corpus(config)
    assert not first.from_cache
    eot = first.tokenizer.special_tokens[EOT]
    assert first.train[0] == eot and first.train[-1] == eot
    assert sum(1 for token in first.train if token == eot) == 54 + 1   # 60 documents, 10% held out
    second = prepare_corpus(config)
    assert second.from_cache and second.key == first.key
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.tokenizer.to_dict() == first.tokenizer.to_dict()
    other = prepare_corpus(dataclasses.replace(config, vocab_size=280))
    assert other.key != first.key and not other.from_cache


def test_a_tokenizer_is_reused_from_its_file_or_from_a_checkpoint(corpus_file, tmp_path, make_checkpoint, tiny_tokenizer):
    tiny_tokenizer.save(str(tmp_path / "tokenizer.json"))
    checkpoint = make_checkpoint(tmp_path / "some.pt", "sft")   # holds tiny_tokenizer
    from_file = prepare_corpus(tiny_config(corpus_file, tmp_path / "a", tokenizer=str(tmp_path / "tokenizer.json")))
    from_checkpoint = prepare_corpus(tiny_config(corpus_file, tmp_path / "b", tokenizer=checkpoint))
    assert from_file.tokenizer.to_dict() == from_checkpoint.tokenizer.to_dict() == tiny_tokenizer.to_dict()
    assert np.array_equal(from_file.train, from_checkpoint.train)


def test_show_batch_prints_rows_and_their_targets(corpus_file, tmp_path, capsys):
    assert pretrain.main(tiny_config(corpus_file, tmp_path, show_batch=True)) == {}
    shown = capsys.readouterr().out
    assert "x ids:" in shown and "y ids:" in shown and "shifted left by one" in shown
    assert not os.path.exists(tmp_path / "pretrain.pt")


# --- evaluation ----------------------------------------------------------------------------------

def test_bits_per_byte_of_a_uniform_model_by_hand():
    tokenizer = Tokenizer.train(tiny_documents(), 300)
    tokens = encode_documents(tokenizer, tiny_documents(20))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()   # every logit 0: each next token has probability 1/V, costs ln V nats
    starts = eval_starts(len(tokens), 16, 100)
    loss, bpb = evaluate(model, tokens, starts, 16, token_byte_counts(tokenizer), "cpu", rows_per_pass=4)
    targets = [int(token) for start in starts for token in tokens[start + 1:start + 17]]
    specials = set(tokenizer.special_tokens.values())
    text_bytes = sum(len(tokenizer.decode_bytes([token])) for token in targets if token not in specials)
    assert len(starts) == 6 and len(targets) == 6 * 16
    assert loss == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-6)
    assert bpb == pytest.approx(len(targets) * math.log2(tokenizer.vocab_size) / text_bytes, rel=1e-6)


def test_a_fact_counts_when_the_completion_starts_with_the_whole_answer():
    assert pretrain.fact_completed(" Lima. It lies by the sea.", "Lima")
    assert pretrain.fact_completed(" 68\n12 + 3 = 15", "68")
    assert not pretrain.fact_completed(" Limassol.", "Lima")       # the word must end there
    assert not pretrain.fact_completed(" 680", "68")
    assert not pretrain.fact_completed(" lima.", "Lima")
    assert not pretrain.fact_completed(" the city of Lima.", "Lima")


def test_probes_of_a_random_model_report_every_figure(world, tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16))
    metrics, examples = pretrain.probe_knowledge(model.eval(), tiny_tokenizer)
    expected = {"facts_accuracy", "facts_heldout_accuracy", "sums_accuracy", "fewshot_accuracy/facts",
                "fewshot_accuracy/arithmetic", "fewshot_accuracy/all"}
    assert expected <= set(metrics) and all(0.0 <= metrics[name] <= 1.0 for name in expected)
    assert metrics["facts_accuracy"] < 0.1         # random weights know nothing
    assert examples[0][0] == world.fact_probes()[0][0]


# --- training --------------------------------------------------------------------------------------

def test_loss_goes_down_and_outputs_are_written(corpus_file, tmp_path):
    metrics = pretrain.main(tiny_config(corpus_file, tmp_path, max_iters=30, eval_interval=10))
    state = resume_state(tmp_path)
    assert state["history"]["eval_step"] == [0, 10, 20, 30]
    val = state["history"]["val_loss"]
    assert val[0] == pytest.approx(math.log(metrics["vocab_size"]), abs=0.3)   # a fresh model guesses evenly
    assert val[-1] < val[0] - 1.5
    assert metrics["val_loss"] == min(val) and metrics["steps"] == 30
    assert 0 < metrics["val_bpb"] < metrics["val_loss"] / math.log(2)   # several bytes per token
    model, tokenizer, checkpoint = load_model(str(tmp_path / "pretrain.pt"), "pretrain")
    assert checkpoint["metrics"]["val_loss"] == metrics["val_loss"]
    with open(tmp_path / "pretrain.json") as file:
        assert json.load(file)["val_bpb"] == pytest.approx(metrics["val_bpb"])
    assert (tmp_path / "pretrain.png").stat().st_size > 0


def test_positions_learned_trains_gpt2s_table_and_resume_keeps_the_choice(corpus_file, tmp_path):
    config = tiny_config(corpus_file, tmp_path, max_iters=20, eval_interval=10, positions="learned")
    metrics = pretrain.main(config)
    history = resume_state(tmp_path)["history"]
    assert history["val_loss"][-1] < history["val_loss"][0] - 1.0
    model, _, checkpoint = load_model(str(tmp_path / "pretrain.pt"), "pretrain")
    assert checkpoint["model_config"]["positions"] == "learned" and "transformer.wpe.weight" in checkpoint["model"]
    assert metrics["params"] == model.num_parameters()
    with pytest.raises(UsageError, match="another model shape"):
        pretrain.main(dataclasses.replace(config, max_iters=30, resume=True, positions="rotary"))
    with pytest.raises(UsageError, match="--positions rotary turns pairs"):
        pretrain.main(tiny_config(corpus_file, tmp_path / "odd", n_embd=30, n_head=2 * 5))


def test_bfloat16_training_on_the_cpu_follows_float32(corpus_file, tmp_path):
    # --dtype bfloat16 runs the matrix products in bf16 (weights stay fp32): a different path through
    # every layer, which must still learn as well as full precision does
    full = pretrain.main(tiny_config(corpus_file, tmp_path / "fp32", max_iters=30, eval_interval=10, dtype="float32"))
    half = pretrain.main(tiny_config(corpus_file, tmp_path / "bf16", max_iters=30, eval_interval=10, dtype="bfloat16"))
    assert half["val_loss"] != full["val_loss"]   # really a different computation
    assert half["val_loss"] == pytest.approx(full["val_loss"], rel=0.05)


def test_resume_retraces_the_uninterrupted_run(corpus_file, tmp_path):
    straight = tiny_config(corpus_file, tmp_path / "straight", max_iters=12, lr_decay_iters=12, eval_interval=4)
    pretrain.main(straight)
    first_half = dataclasses.replace(straight, out_dir=str(tmp_path / "halves"), max_iters=6)
    pretrain.main(first_half)
    assert resume_state(tmp_path / "halves")["step"] == 6
    with pytest.raises(UsageError, match="--resume: .*pretrain.pt not found"):   # before any tokenizer is trained
        pretrain.main(dataclasses.replace(first_half, out_dir=str(tmp_path / "nothing"), resume=True))
    assert not os.path.exists(tmp_path / "nothing" / "cache")
    with pytest.raises(UsageError, match="--seed 7; resume with the same option"):   # another run's batches
        pretrain.main(dataclasses.replace(first_half, max_iters=12, resume=True, seed=8))
    pretrain.main(dataclasses.replace(first_half, max_iters=12, resume=True))
    a, b = resume_state(tmp_path / "straight"), resume_state(tmp_path / "halves")
    assert b["step"] == 12 and b["history"]["train_step"] == list(range(1, 13))
    assert b["history"]["train_loss"] == pytest.approx(a["history"]["train_loss"], rel=1e-5)
    assert b["history"]["val_loss"][-1] == pytest.approx(a["history"]["val_loss"][-1], rel=1e-5)
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-5), name


def test_a_checkpoint_from_before_a_new_config_field_still_resumes(corpus_file, tmp_path):
    """GPTConfig gains fields over time (reward_logprob_weight did); a pretrain.pt saved without one
    is the same model shape and must resume, with the field at its default."""
    config = tiny_config(corpus_file, tmp_path, max_iters=3, lr_decay_iters=6, eval_interval=3)
    pretrain.main(config)
    path = tmp_path / "pretrain.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_config"]["reward_logprob_weight"]
    torch.save(checkpoint, path)
    pretrain.main(dataclasses.replace(config, max_iters=6, resume=True))
    assert resume_state(tmp_path)["step"] == 6


def test_ctrl_c_saves_and_exits_cleanly(corpus_file, tmp_path):
    checkpoint = tmp_path / "pretrain.pt"

    def press_ctrl_c():  # once training is under way (the first checkpoint is written at step 0)
        deadline = time.time() + 60
        while not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    presser = threading.Thread(target=press_ctrl_c)
    presser.start()
    metrics = pretrain.main(tiny_config(corpus_file, tmp_path, max_iters=5000, eval_interval=1000))
    presser.join()
    assert metrics["interrupted"] and 0 < metrics["steps"] < 5000
    assert resume_state(tmp_path)["step"] == metrics["steps"]
    assert signal.getsignal(signal.SIGINT) is handler_before   # Ctrl-C is ordinary again


def test_two_processes_with_torchrun_match_one(corpus_file, tmp_path):
    # float32: in bf16 the two halves of a batch round differently from the whole (the CPU this was built
    # on has bf16 instructions, so "auto" would pick it), and this test is about the arithmetic of DDP
    config = tiny_config(corpus_file, tmp_path / "one", max_iters=6, eval_interval=3, grad_accum=2, dtype="float32")
    pretrain.main(config)
    options = [f"--{name}={value}" for name, value in dataclasses.asdict(config).items()
               if name not in ("out_dir", "resume", "show_batch", "compile")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "pretrain.py", *options, f"--out_dir={tmp_path / 'two'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    # the workers' own errors come first, the launcher's summary last: show both
    assert result.returncode == 0, result.stderr[:1500] + "\n...\n" + result.stderr[-1500:]
    one, two = resume_state(tmp_path / "one"), resume_state(tmp_path / "two")
    assert two["step"] == 6
    assert two["history"]["train_loss"] == pytest.approx(one["history"]["train_loss"], rel=1e-4)
    assert two["history"]["val_loss"] == pytest.approx(one["history"]["val_loss"], rel=1e-4)
    # the same weights, up to float rounding (threads sum in another order; Adam may magnify that in
    # a few elements whose gradient is nearly zero, so compare the whole weight vector)
    flat_one = torch.cat([tensor.flatten() for tensor in one["model"].values()])
    flat_two = torch.cat([two["model"][name].flatten() for name in one["model"]])
    assert (flat_two - flat_one).norm() <= 1e-4 * flat_one.norm()


# --- bad input -------------------------------------------------------------------------------------

BAD_INPUTS = {
    "missing.txt": None,
    "empty.txt": b"",
    "latin1.txt": "caf\u00e9 cr\u00e8me ".encode("latin-1") * 50,
    "short.txt": b"Too short for one context.",
    "notext.jsonl": b'{"content": "the field is called text"}\n',
    "records.json": b'{"text": "a .json file is not read as records"}\n',
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_and_writes_no_checkpoint(name, tmp_path):
    path = tmp_path / name
    if BAD_INPUTS[name] is not None:
        path.write_bytes(BAD_INPUTS[name])
    with pytest.raises(UsageError) as caught:
        pretrain.main(tiny_config(str(path), tmp_path / "out", vocab_size=256, block_size=64))
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    if name.endswith(".json"):   # refused as JSON, not read as a text too short for the context
        assert "a .json file is neither plain text nor records" in message
    assert not os.path.exists(tmp_path / "out" / "pretrain.pt")


def test_unwritable_out_dir(corpus_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UsageError, match="--out_dir"):
        pretrain.main(tiny_config(corpus_file, blocker / "out"))


def test_command_line_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "pretrain.py", f"--data={tmp_path / 'nowhere.txt'}",
                             f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "nowhere.txt" in result.stderr
