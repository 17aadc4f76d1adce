"""sft.py: the loss mask, the data formats, LoRA and the int8 base, and a tiny end-to-end run."""

import json
import re

import pytest
import torch

import sample
import sft
from bpe import UsageError
from model import GPT, IGNORE_INDEX, load_model


# --- the loss mask ---------------------------------------------------------------------------------

def trained_runs(tokenizer, targets):
    """The text of each contiguous run of targets that count in the loss."""
    runs, current = [], []
    for target in targets + [IGNORE_INDEX]:
        if target != IGNORE_INDEX:
            current.append(target)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_loss_counts_exactly_the_assistant_tokens_and_their_end(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of Peru?"},
                {"role": "assistant", "content": "The capital of Peru is Lima."},
                {"role": "user", "content": "And 2 + 2?"},
                {"role": "assistant", "content": "2 + 2 = 4."}]
    inputs, targets, truncated = sft.encode_conversation(tiny_tokenizer, messages, block_size=128)
    assert not truncated and len(inputs) == len(targets)
    # (each message is encoded after one space: bpe.MESSAGE_PREFIX)
    assert trained_runs(tiny_tokenizer, targets) == [" The capital of Peru is Lima.<|end|>", " 2 + 2 = 4.<|end|>"]
    # Each trained target is the next input token: the model reads ids[:-1] and predicts ids[1:].
    for position, target in enumerate(targets[:-1]):
        if target != IGNORE_INDEX:
            assert inputs[position + 1] == target
    # Everything else - the user's turns, the role markers - is context only.
    untrained = [inputs[position + 1] for position, target in enumerate(targets[:-1]) if target == IGNORE_INDEX]
    assert tiny_tokenizer.decode(untrained) == (" What is the capital of Peru?<|end|><|assistant|>"
                                                "<|user|> And 2 + 2?<|end|><|assistant|>")


def test_calculator_output_is_not_trained(tiny_tokenizer):
    messages = [{"role": "user", "content": "What is 12 * 3?"},
                {"role": "assistant", "content": "<|calc|>12 * 3<|result|> 36<|/result|> 12 * 3 = 36."}]
    _, targets, _ = sft.encode_conversation(tiny_tokenizer, messages, block_size=128)
    assert trained_runs(tiny_tokenizer, targets) == [" <|calc|>12 * 3<|result|>", " 12 * 3 = 36.<|end|>"]


def test_long_conversations_are_truncated_and_counted(tiny_tokenizer, capsys):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 100}]
    long_question = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    examples, truncated, dropped = sft.encode_all(tiny_tokenizer, [short, long_answer, long_question], block_size=32)
    assert (truncated, dropped, len(examples)) == (2, 1, 2)   # the long question leaves no answer in the context
    assert all(len(inputs) <= 32 for inputs, _ in examples)
    assert "2 of 3 conversations" in capsys.readouterr().err


def test_batches_pad_with_ignored_targets(tiny_tokenizer):
    examples = [([1, 2, 3], [IGNORE_INDEX, 5, 6]), ([7], [8])]
    x, y = sft.pad_batch(examples, pad_id=0)
    assert x.tolist() == [[1, 2, 3], [7, 0, 0]]
    assert y.tolist() == [[IGNORE_INDEX, 5, 6], [8, IGNORE_INDEX, IGNORE_INDEX]]


# --- data formats ----------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_jsonl_in_both_trl_shapes(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Bye."}]},
        {"prompt": "2 + 2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "3 + 3?"}], "completion": [{"role": "assistant", "content": "6"}]},
        {"prompt": "The sky is", "completion": " blue."},   # TRL's plain text, meant to be joined
    ])
    conversations = sft.jsonl_conversations(path)
    assert conversations == [
        [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}],
        [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6"}],
        # render_chat puts the space before every message itself, so the completion's own one goes
        [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": "blue."}],
    ]


@pytest.mark.parametrize("bad_line, reason", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "plain text"}', 'expected a "messages" list'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": 7}]}', "message 0 must be"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"prompt": 3, "completion": "x"}', '"prompt" must be a string'),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad_line, reason):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", bad_line])
    with pytest.raises(UsageError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(reason)):
        sft.jsonl_conversations(path)


# --- LoRA and the int8 base ------------------------------------------------------------------------

@pytest.fixture
def tiny_model(make_checkpoint, tmp_path):
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "base.pt", "pretrain"))
    return model


def logits_of(model, seed=0):
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(idx)[0]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_lora_trains_only_adapters(tiny_model, precision):
    total = tiny_model.num_parameters()
    wrapped = sft.add_lora(tiny_model, rank=4, alpha=8, precision=precision)
    assert wrapped and all(name.endswith(sft.LORA_LAYERS) for name in wrapped)
    trainable = {name for name, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert sum(p.numel() for p in tiny_model.parameters() if p.requires_grad) < total


def test_lora_at_step_zero_is_exactly_the_base_model(tiny_model):
    before = logits_of(tiny_model)
    sft.add_lora(tiny_model, rank=4, alpha=8)
    assert torch.equal(logits_of(tiny_model), before)   # B = 0: not close, identical


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_merged_adapters_give_the_same_logits(tiny_model, precision):
    plain_keys = set(tiny_model.state_dict())
    adapted = sft.add_lora(tiny_model, rank=4, alpha=8, precision=precision, layers=("attn.c_attn", "mlp.c_fc"))
    wrapped = [module for module in tiny_model.modules() if isinstance(module, sft.LoRALinear)]
    # With an int8 base the layers without adapters are held in int8 too (rank 0): all are frozen.
    assert len(wrapped) == (2 * len(adapted) if precision == "int8" else len(adapted))
    torch.manual_seed(1)
    for module in wrapped:
        if module.rank:
            module.lora_B.data.normal_(std=0.05)   # as if trained: the adapters now change the output
    with_adapters = logits_of(tiny_model)
    sft.merge_lora(tiny_model)
    assert not any(isinstance(module, sft.LoRALinear) for module in tiny_model.modules())
    assert set(tiny_model.state_dict()) == plain_keys     # a plain GPT again: later stages load it as is
    assert torch.allclose(logits_of(tiny_model), with_adapters, atol=1e-5)


def test_int8_error_is_at_most_half_a_step_per_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 48, generator=generator) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    weight[5] = 0.0                                                                           # and a row of zeros
    quantized, scale = sft.quantize_int8(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (64,)
    assert quantized.abs().max() <= 127
    error = (sft.dequantize_int8(quantized, scale) - weight).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5)).all()           # the documented bound: half a step
    assert error[5].max() == 0                                         # zeros stay exactly zero
    # Each row's largest weight is exactly representable (it defines the scale).
    largest = weight.abs().argmax(dim=1)
    rows = torch.arange(64)
    assert torch.allclose(sft.dequantize_int8(quantized, scale)[rows, largest], weight[rows, largest])


def test_int8_base_holds_the_frozen_linears_in_a_quarter_of_the_memory(tiny_model):
    fp32 = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    sft.add_lora(tiny_model, rank=4, alpha=8, precision="int8")
    wrapped = [m for m in tiny_model.modules() if isinstance(m, sft.LoRALinear)]
    linear_fp32 = sum(m.weight_int8.numel() * 4 for m in wrapped)
    linear_int8 = sum(m.weight_int8.numel() + m.weight_scale.numel() * 4 for m in wrapped)
    assert 3.5 < linear_fp32 / linear_int8 <= 4    # 1 byte per weight + one fp32 scale per row
    # Everything else frozen (embeddings, LayerNorms, biases) stays fp32 and is counted as is.
    assert sft.base_weight_bytes(tiny_model) == fp32 - linear_fp32 + linear_int8


# --- the stage end to end --------------------------------------------------------------------------

def tiny_config(out_dir, **overrides):
    settings = dict(out_dir=str(out_dir), device="cpu", max_iters=30, batch_size=8, learning_rate=2e-3,
                    lora_learning_rate=1e-2, warmup_iters=3, eval_interval=10, pretrain_mix=4,
                    pretrain_mix_length=32, pretrain_mix_tokens=4000, eval_limit=12, eval_max_new_tokens=8)
    settings.update(overrides)
    return sft.Config(**settings)


def test_a_tiny_run_learns_and_saves_an_sft_checkpoint(make_checkpoint, tmp_path):
    make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    metrics = sft.main(tiny_config(tmp_path))
    assert metrics["train/sft_loss"] < metrics["train/sft_loss_start"] - 0.5
    assert metrics["steps"] == 30 and 0 <= metrics["accuracy/all"] <= 1
    model, _, checkpoint = load_model(str(tmp_path / "sft.pt"), stages="sft")
    assert checkpoint["stage"] == "sft" and isinstance(model, GPT)
    assert checkpoint["parent"] == {"path": str(tmp_path / "pretrain.pt"), "stage": "pretrain"}
    saved = json.loads((tmp_path / "sft.json").read_text())
    assert saved["steps"] == 30 and "seconds" in saved and "base_fewshot/accuracy/all" in saved
    for family in sft.TECHNIQUE_FAMILIES:   # each family asked bare and with its technique, both models
        for prefix in ("", "base_fewshot/"):
            assert 0 <= saved[f"{prefix}accuracy/{family}_with_technique"] <= 1
            assert 0 <= saved[f"{prefix}accuracy/{family}"] <= 1
    assert (tmp_path / "sft.png").stat().st_size > 0


def test_a_lora_int8_run_saves_a_plain_gpt(make_checkpoint, tmp_path):
    make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    metrics = sft.main(tiny_config(tmp_path, lora_rank=4, base_precision="int8", max_iters=12,
                                   skip_base_eval=True, pretrain_mix=0))
    assert metrics["params/trainable"] < metrics["params/total"]
    assert metrics["memory/base_bytes"] < metrics["memory/base_bytes_fp32"]
    tokenizer, checkpoint = load_model(str(tmp_path / "sft.pt"), stages="sft")[1:]
    base = load_model(str(tmp_path / "pretrain.pt"))[2]["model"]
    assert set(checkpoint["model"]) == set(base)   # a plain GPT: the adapters are merged in
    # The embedding trained only the rows of the special tokens (new in SFT); every other row is untouched.
    special = sorted(tokenizer.special_tokens.values())
    ordinary = [token for token in range(base["transformer.wte.weight"].size(0)) if token not in special]
    embedding = checkpoint["model"]["transformer.wte.weight"]
    assert torch.equal(embedding[ordinary], base["transformer.wte.weight"][ordinary])
    assert not torch.equal(embedding[special], base["transformer.wte.weight"][special])
    assert not torch.equal(checkpoint["model"]["transformer.h.0.attn.c_attn.weight"],
                           base["transformer.h.0.attn.c_attn.weight"])


def test_show_example_marks_the_trained_tokens(make_checkpoint, tmp_path, capsys):
    make_checkpoint(tmp_path / "pretrain.pt", "pretrain")
    assert sft.main(tiny_config(tmp_path, show_example=True)) == {}
    printed = capsys.readouterr().out
    assert re.search(r"<\|assistant\|>\[.+<\|end\|>\]", printed)   # the answer and its end, inside [ ]
    assert not (tmp_path / "sft.pt").exists()


def test_clear_errors(tmp_path, make_checkpoint):
    with pytest.raises(UsageError, match="pretrain.py"):
        sft.main(tiny_config(tmp_path))
    make_checkpoint(tmp_path / "pretrain.pt", "reward")
    with pytest.raises(UsageError, match="'reward' checkpoint"):
        sft.main(tiny_config(tmp_path))
    with pytest.raises(UsageError, match="--lora_rank"):
        sft.main(tiny_config(tmp_path, base_precision="int8"))
    with pytest.raises(UsageError, match="--learning_rate must be positive"):
        sft.main(tiny_config(tmp_path, learning_rate=-1.0))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UsageError, match="--out_dir .*a-file: cannot write there"):   # before minutes of work
        sft.main(tiny_config(tmp_path / "a-file", init_from=str(tmp_path / "pretrain.pt")))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_after_ctrl_c_gives_the_uninterrupted_model(make_checkpoint, tmp_path, monkeypatch, lora_rank):
    settings = dict(max_iters=12, skip_base_eval=True, eval_limit=4, lora_rank=lora_rank)
    for folder in ("whole", "parts"):
        make_checkpoint(tmp_path / folder / "pretrain.pt", "pretrain")
    sft.main(tiny_config(tmp_path / "whole", **settings))

    steps_started = []
    learning_rate_at = sft.learning_rate_at

    def ctrl_c_at_step_7(*args):   # called once as each step begins
        steps_started.append(1)
        if len(steps_started) == 7:
            raise KeyboardInterrupt
        return learning_rate_at(*args)

    monkeypatch.setattr(sft, "learning_rate_at", ctrl_c_at_step_7)
    interrupted = sft.main(tiny_config(tmp_path / "parts", **settings))
    assert interrupted["interrupted"] == 1 and interrupted["steps"] == 6
    monkeypatch.setattr(sft, "learning_rate_at", learning_rate_at)
    with pytest.raises(UsageError, match="--batch_size 8; resume with the same"):   # not the run it continues
        sft.main(tiny_config(tmp_path / "parts", resume=True, **{**settings, "batch_size": 3}))
    resumed = sft.main(tiny_config(tmp_path / "parts", resume=True, **settings))
    assert resumed["steps"] == 12 and resumed["interrupted"] == 0

    whole = load_model(str(tmp_path / "whole" / "sft.pt"), stages="sft")[2]
    parts = load_model(str(tmp_path / "parts" / "sft.pt"), stages="sft")[2]
    assert "resume" not in parts
    for name, tensor in whole["model"].items():
        assert torch.allclose(parts["model"][name], tensor, atol=1e-6), name
    with pytest.raises(UsageError, match="nothing to resume"):
        sft.main(tiny_config(tmp_path / "parts", resume=True, **settings))


def test_reading_practice_adds_conversations_to_the_world_pairs(world):
    plain = sft.world_conversations(world)
    practised = sft.world_conversations(world, reading_practice=7)
    assert practised[:len(plain)] == plain and len(practised) == len(plain) + 7
    assert all(c[0]["content"].startswith("Answer using the passages below.") for c in practised[len(plain):])
    both = sft.world_conversations(world, reading_practice=7, calculator_practice=5)
    assert both[:len(practised)] == practised and len(both) == len(practised) + 5
    assert all(c[1]["content"].startswith("<|calc|>") for c in both[len(practised):])


def test_the_calculator_result_comes_from_the_tool_not_the_model():
    assert sft.run_calculator_line(" 347 * 829 -> 123") == " 347 * 829 -> 287663\n"
    assert sft.run_calculator_line(" 12 * 34") == " 12 * 34 -> 408\n"     # stopped before "->"
    assert sft.run_calculator_line(" Paris -> 5") == " Paris -> error\n"


def test_technique_metrics_grade_each_answer_as_it_was_asked(world):
    from data.tinyworld import COT_PREFIX, worked_addition
    tasks = world.tasks("eval")
    asked = sample.asked_with_technique(world, tasks)
    assert {task.family for task in tasks if task.prompt in asked} == set(sft.TECHNIQUE_FAMILIES)
    cot = [task for task in tasks if task.family == "cot"]
    assert all(asked[task.prompt] == COT_PREFIX + task.prompt for task in cot)
    assert all(task.prompt in asked[task.prompt] and "Passage 1:" in asked[task.prompt]
               for task in tasks if task.family == "retrieval")

    def ideal(task):   # the worked form is the ideal answer once "Let's think step by step." was asked
        if task.family == "cot":
            return worked_addition(*map(int, re.findall(r"\d+", task.prompt)))
        return task.answer
    answers = {task.prompt: (asked[task.prompt], ideal(task)) for task in tasks if task.prompt in asked}
    assert sft.technique_metrics(world, tasks, answers) == {
        f"{kind}/{family}_with_technique": 1.0 for kind in ("accuracy", "score") for family in sft.TECHNIQUE_FAMILIES}
    direct = dict(answers, **{task.prompt: (asked[task.prompt], task.answer) for task in cot})
    graded = sft.technique_metrics(world, tasks, direct)   # right, but without the steps it was asked for
    assert graded["accuracy/cot_with_technique"] == 1.0 and graded["score/cot_with_technique"] == pytest.approx(0.8)
    wrong = sft.technique_metrics(world, tasks, {prompt: (question, "I do not know.") for prompt, question in asked.items()})
    assert all(value == 0.0 for value in wrong.values())
