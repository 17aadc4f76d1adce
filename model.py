"""
The one GPT that every stage trains or runs, and the plumbing the stages share.

    python model.py import_gpt2 FOLDER     # OpenAI's GPT-2 weights -> out/pretrain.pt

Read it in this order: the configuration, the model (attention, MLP, block, GPT), generation with a
KV cache, real GPT-2 weights, then the shared plumbing (device, checkpoints, command lines, progress).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from bpe import Tokenizer, UsageError, render_chat

IGNORE_INDEX = -1  # a target with this value contributes nothing to the loss

# -----------------------------------------------------------------------------------------------
# The model
# (architecture, generation and GPT-2 import go here)


# -----------------------------------------------------------------------------------------------
# Plumbing shared by every stage: device, checkpoints, files, command lines, progress.

STAGE_SCRIPTS = {"pretrain": "pretrain.py", "sft": "sft.py", "reward": "reward.py", "rlhf": "rlhf.py"}


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


def autocast(device):
    """bfloat16 autocast on CUDA (matmuls in bf16, weights and optimizer state stay fp32);
    full precision elsewhere, where bf16 brings no speed."""
    if str(device).startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_seed(seed):
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the same folder as `path`; on success move it over `path` in one
    step (os.replace). A crash or Ctrl-C mid-write leaves the old file untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as error:
        raise UsageError(f"cannot write to {folder}: {error.strerror}; choose another --out_dir") from None
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "tokenizer": tokenizer.to_dict(),
        "parent": parent,
        "args": _plain(args),
        "metrics": _plain(metrics),
    }
    checkpoint.update(extra or {})
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)


def _plain(value):
    """Configs may be dataclasses; checkpoints keep plain dicts."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


def load_checkpoint(path, stages=None):
    """Load and check a checkpoint. `stages` is the stage (or tuple of stages) the caller accepts."""
    stages = (stages,) if isinstance(stages, str) else stages
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
    missing = [key for key in ("stage", "model_config", "model", "tokenizer") if key not in checkpoint]
    if not isinstance(checkpoint, dict) or missing:
        raise UsageError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)})")
    if stages and checkpoint["stage"] not in stages:
        raise UsageError(f"{path} is a '{checkpoint['stage']}' checkpoint, but this needs "
                         f"{' or '.join(repr(s) for s in stages)}")
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


def build_parser(config_class, description=""):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = field.metadata.get("help", "")
        options = dict(default=default, help=f"{help_text} (default: {default})",
                       choices=field.metadata.get("choices"))
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

def chat_responses(model, tokenizer, prompts, temperature=0.0, max_new_tokens=128, seed=None,
                   batch_size=64, top_k=None, top_p=None):
    """Answer each prompt as a one-turn chat; returns the assistant's text (up to its <|end|>).
    Prompts too long for the context keep their last tokens (the question is at the end)."""
    end = tokenizer.special_tokens["<|end|>"]
    keep = max(model.config.block_size - max_new_tokens, 1)
    rendered = []
    for prompt in prompts:
        ids, _ = render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        rendered.append(ids[-keep:])
    responses = []
    for start in range(0, len(rendered), batch_size):
        batch_seed = None if seed is None else seed + start
        generations = model.generate(rendered[start:start + batch_size], max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, stop_tokens=(end,), seed=batch_seed)
        for generation in generations:
            tokens = generation.tokens[:-1] if generation.stopped else generation.tokens
            responses.append(tokenizer.decode(tokens))
    return responses
