"""Shared fixtures: a small tiny-world slice, a tokenizer trained on it, and a factory of tiny
random-weight checkpoints of any stage, so each stage's tests run in seconds without the earlier
stages having been trained."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tests' models are tiny and gain nothing from a second thread, and on a busy 2-core machine
    torch's threads mostly wait for each other (measured: a tiny backward pass 4 ms with one thread,
    770 ms with two; tests/test_reward.py 158 s with two, 5 s with one). The scripts the tests start as
    subprocesses choose their own."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def world():
    from data.tinyworld import World
    return World(seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(world):
    from bpe import Tokenizer
    documents = world.documents()[:300]
    return Tokenizer.train(documents, vocab_size=400)


TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=128)


@pytest.fixture
def make_checkpoint(tiny_tokenizer):
    """make_checkpoint(path, stage, seed=0, **config) -> path of a tiny random GPT checkpoint."""
    import torch
    from model import GPT, GPTConfig, save_checkpoint

    def make(path, stage="pretrain", seed=0, **overrides):
        torch.manual_seed(seed)
        settings = dict(TINY_MODEL, vocab_size=tiny_tokenizer.vocab_size)
        settings.update(overrides)
        if stage == "reward":
            settings.setdefault("scalar_head", True)
        model = GPT(GPTConfig(**settings))
        save_checkpoint(str(path), stage=stage, model=model, tokenizer=tiny_tokenizer,
                        parent=None, args={}, metrics={})
        return str(path)

    return make


CALCULATOR_QUESTION = "What is 12 * 7?"


def teach(model, tokenizer, conversations, steps, learning_rate=1e-2):
    """Train a tiny model in place on (question, answer) pairs, the answers only (render_chat's mask),
    all in one padded batch; a few dozen steps make it say them, so tests sample real answers from the
    real forward pass (a scripted model would fake its log-probabilities)."""
    import torch
    from bpe import render_chat
    from model import IGNORE_INDEX
    rows = []
    for question, answer in conversations:
        ids, train_mask = render_chat(tokenizer, [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": answer}])
        rows.append((ids[:-1], [token if trained else IGNORE_INDEX for token, trained in zip(ids[1:], train_mask[1:])]))
    length = max(len(inputs) for inputs, _ in rows)
    inputs = torch.tensor([x + [0] * (length - len(x)) for x, _ in rows])
    targets = torch.tensor([y + [IGNORE_INDEX] * (length - len(y)) for _, y in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@pytest.fixture
def calculator_user(tmp_path, make_checkpoint):
    """(model, tokenizer): a tiny GPT that memorised one answer asking the calculator (100 steps of SFT on
    "<|calc|>12 * 7<|result|> 84<|/result|> It is 84." after CALCULATOR_QUESTION), so that sampling from it
    calls the tool with the real forward pass."""
    from model import load_model
    model, tokenizer, _ = load_model(make_checkpoint(tmp_path / "calculator_user.pt", "sft"))
    teach(model, tokenizer, [(CALCULATOR_QUESTION, "<|calc|>12 * 7<|result|> 84<|/result|> It is 84.")], steps=100)
    return model, tokenizer


@pytest.fixture
def recorded_prompts(monkeypatch):
    """Every prompt the real GPT.generate is asked to continue (the model still runs)."""
    from model import GPT
    prompts, original = [], GPT.generate

    def recording(self, batch, *args, **kwargs):
        prompts.extend(list(prompt) for prompt in batch)
        return original(self, batch, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate", recording)
    return prompts
