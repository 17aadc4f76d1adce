"""
Benchmarks: whole, repeatable measurements that print a table. README quotes their figures with the
command that produced them. (Tests never time anything; speed lives here.)

    python bench.py tokenizer     # BPE training time and encoding throughput
    python bench.py model         # training tokens/s, generation tokens/s with and without the KV cache
    python bench.py sampling      # many answers at once on a CPU: one thread, all threads, batches side by side
    python bench.py pretrain      # bits per byte at equal wall time on real text (tiny Shakespeare)
"""

import argparse
import os

from bpe import UsageError

SHARED_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "bench-data",
                           "tinyshakespeare.txt")


def default_text_path(path):
    """The benchmark text: the one named with --data, else tiny Shakespeare if it lies beside the repo."""
    if path:
        return path
    if os.path.isfile(SHARED_TEXT):
        return SHARED_TEXT
    raise SystemExit("error: name a text file with --data (e.g. tiny Shakespeare, 1.1 MB of plain text)")


def print_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for index, row in enumerate([header] + rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def bench_tokenizer(args):
    """BPE training time to vocab 512/1024/4096 on a ~1 MB text and on that text repeated to ~10 MB,
    encoding and decoding MB/s, and the fast trainer against the plain reference trainer (same merges)
    at vocab 1024 on the 1 MB text. Fast figures are the best of 3 repeats (1 with --quick): a shared
    machine only ever slows a run down. Times are CPU seconds of this (single-threaded) process: on a
    quiet machine they equal wall-clock seconds, and on a machine shared with other work they stay close to
    what a quiet machine would show, where wall-clock time would not."""
    import gc
    import time
    from collections import Counter

    import bpe

    clock = time.process_time
    path = default_text_path(args.data)
    try:
        text = bpe.read_text_file(path)
    except bpe.UsageError as error:
        raise SystemExit(f"error: {error}")
    size = len(text.encode("utf-8"))
    repeats = 1 if args.quick else 3

    def best_seconds(run):
        seconds = []
        for _ in range(repeats):
            start = clock()
            result = run()
            seconds.append(clock() - start)
        return min(seconds), result

    corpora = [("1x", text)]
    if not args.quick:
        corpora.append((f"{-(-10_000_000 // size)}x", text * -(-10_000_000 // size)))   # ~10 MB
    print(f"text: {path} ({size:,} bytes); 8 special tokens; one process; best of {repeats}; "
          f"CPU seconds (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print("\ntraining (pre-split + counting + merges)")
    rows = []
    tokenizers = {}
    for name, corpus in corpora:
        corpus_size = len(corpus.encode("utf-8"))
        for vocab_size in (512, 1024, 4096):
            seconds, tokenizer = best_seconds(lambda: bpe.Tokenizer.train(corpus, vocab_size))
            tokenizers[vocab_size] = tokenizer
            rows.append([f"{name} ({corpus_size / 1e6:.1f} MB)", vocab_size, f"{seconds:.2f}",
                         f"{corpus_size / len(tokenizer.encode(corpus)):.2f}"])
    print_table(["text", "vocab", "seconds", "bytes/token"], rows)
    print("targets: 1.1 MB -> vocab 512 in <= 2 s, -> 4096 in <= 10 s; "
          "Hugging Face tokenizers (Rust): vocab 512 in 0.38 s; minbpe (Python): vocab 512 in 100 s")

    print(f"\nencoding and decoding the 1x text ({size / 1e6:.2f} MB)")
    rows = []
    for vocab_size in (1024, 4096):
        trained = tokenizers[vocab_size]
        cold, ids = best_seconds(lambda: bpe.Tokenizer.from_dict(trained.to_dict()).encode(text))
        warm, _ = best_seconds(lambda: trained.encode(text))
        decode, decoded = best_seconds(lambda: trained.decode(ids))
        assert decoded == text
        rows.append([vocab_size, f"{size / cold / 1e6:.1f}", f"{size / warm / 1e6:.1f}", f"{size / decode / 1e6:.0f}"])
    print_table(["vocab", "encode MB/s (empty cache)", "encode MB/s (warm cache)", "decode MB/s"], rows)
    print("target: encode >= 5 MB/s; tiktoken (Rust) 17 MB/s; Hugging Face tokenizers 1.0 MB/s; minbpe 0.9 MB/s")

    print("\nfast trainer against the plain reference (merge loops only, same pre-split chunks, vocab 1024)")
    del tokenizers, corpora, ids     # fewer live objects: Python's garbage collector scans them all now and then
    gc.collect()
    chunk_texts = bpe.compile_pattern(bpe.SPLIT_PATTERN).findall(text)
    chunks = [chunk.encode("utf-8") for chunk in chunk_texts]
    num_merges = 1024 - 256 - len(bpe.SPECIAL_TOKENS)
    fast_seconds, fast_merges = best_seconds(lambda: bpe.train_merges_fast(Counter(chunks), num_merges))
    # The reference recounts every pair of the whole text after each merge: minutes at vocab 1024, and each
    # merge is cheaper than the one before (the text has fewer tokens). So we time a few of its merges at
    # several points along the run (starting it from the text as the fast trainer's first j merges left
    # it) and sum the per-merge cost over all merges (trapezoid rule). If that estimate is under 2 minutes
    # (and not --quick), the whole run is timed as well.
    points, per_point = (4, 3) if args.quick else (8, 5)
    starts = [round(k * (num_merges - per_point) / (points - 1)) for k in range(points)]
    costs = []
    for first in starts:
        so_far = bpe.Tokenizer([(pair, 256 + k) for k, pair in enumerate(fast_merges[:first])], {}, pattern=None)
        merged_chunks = [so_far.encode_ordinary(chunk) for chunk in chunk_texts]
        start = clock()
        merges = bpe.train_merges_reference(merged_chunks, per_point, first_id=256 + first)
        costs.append((clock() - start) / per_point)
        assert merges == fast_merges[first:first + per_point], "the fast trainer's merges differ from the reference's"
        del so_far, merged_chunks
    estimate = sum((costs[k] + costs[k + 1]) / 2 * (starts[k + 1] - starts[k]) for k in range(points - 1))
    estimate += costs[-1] * (num_merges - starts[-1])
    rows = [["reference, estimated", f"{estimate:.0f}", f"{estimate / fast_seconds:,.0f}x"]]
    if not args.quick and estimate <= 120:
        start = clock()
        merges = bpe.train_merges_reference(chunks, num_merges)
        reference_seconds = clock() - start
        assert merges == fast_merges, "the fast trainer's merges differ from the reference's"
        rows.append(["reference, measured", f"{reference_seconds:.1f}", f"{reference_seconds / fast_seconds:,.0f}x"])
    rows.insert(0, ["fast", f"{fast_seconds:.2f}", "1x"])
    print_table(["trainer", "seconds", "speed-up"], rows)
    print(f"estimate: {per_point} reference merges timed at each of merges {', '.join(map(str, starts))} "
          f"({costs[0]:.2f} s/merge at the start, {costs[-1]:.2f} at the end), all equal to the fast trainer's")
    print("target: >= 50x")


def bench_model(args):
    """Training tokens/s (forward + backward + AdamW step) and generation tokens/s (with and without
    the KV cache, batch 1 and 16) for a tiny and a small GPT with random weights, on the CPU, and the
    time to draw a sampled token. Each figure is the best of a few repeats: a shared machine only ever
    slows a run down, so the fastest repeat is the least disturbed one."""
    import copy
    import time

    import torch

    from model import GPT, GPTConfig, autocast, draw_from

    repeats = 2 if args.quick else 3
    sizes = {"tiny": dict(n_layer=4, n_head=4, n_embd=128), "small": dict(n_layer=6, n_head=6, n_embd=384)}
    # Reference figures measured on this project's 2-core machine (see the model issue): nanoGPT's GPT
    # training, Hugging Face GPT-2's cached generation of 200 tokens at batch 1.
    nanogpt = {"tiny": 28_900, "small": 3_300}
    huggingface = {"tiny": 750, "small": 290}

    def best_rate(run, tokens):
        run()  # warm-up: first calls allocate memory and pick kernels
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return tokens / min(seconds)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary 1024, random weights; "
          f"best of {repeats} repeats; load average {os.getloadavg()[0]:.1f} (other jobs slow every figure)")
    print("\ntraining: forward + backward + AdamW step, tokens/s")
    # fp32 and bf16 autocast, eager, are how the stages train on a CPU without and with bf16 matrix
    # instructions (AVX-512 BF16 or AMX: pretrain.py's and sft.py's --dtype auto picks bf16 there; where
    # they are missing bf16 is emulated and slow). The compiled rows show what torch.compile would add;
    # --quick skips them (compiling takes a while). The tiny model is measured at nanoGPT's shape
    # (context 64, batch 12) and at context 256, batch 16 (pretrain.py's shape until it took 4 rows a step).
    # These rows use GPT-2's learned position table, as nanoGPT does; the "rotary" rows, the positions
    # the stages train with, show what turning the queries and keys costs.
    variants = [("fp32", False, False, "learned"), ("bf16 autocast", False, True, "learned")]
    variants += [] if args.quick else [("fp32, compiled", True, False, "learned"),
                                       ("bf16 autocast, compiled", True, True, "learned")]
    variants += [("fp32, rotary", False, False, "rotary"), ("bf16 autocast, rotary", False, True, "rotary")]
    rows = []
    # (nanoGPT's figures are for its own shapes only: none for the tiny model at context 256)
    for name, context, batch, reference in [("tiny", 64, 12, nanogpt["tiny"]), ("tiny", 256, 16, None),
                                            ("small", 256, 8, nanogpt["small"])]:
        steps = (5 if args.quick else 20) if name == "tiny" else (2 if args.quick else 6)
        for label, compiled, bf16, positions in variants:
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=1024, block_size=context, positions=positions, **sizes[name]))
            optimizer = model.configure_optimizer(learning_rate=1e-3)
            forward = torch.compile(model) if compiled else model
            x = torch.randint(0, 1024, (batch, context))
            y = torch.randint(0, 1024, (batch, context))

            def train():
                for _ in range(steps):
                    with autocast("cpu", "bfloat16" if bf16 else "float32"):
                        _, loss = forward(x, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

            if compiled:
                train()  # the first call compiles
            rate = best_rate(train, steps * batch * context)
            compared = reference if positions == "learned" else None   # nanoGPT has the table
            rows.append([f"{name} {sizes[name]['n_layer']}x{sizes[name]['n_embd']}", label, context, batch,
                         f"{model.num_parameters():,}", f"{rate:,.0f}", f"{compared:,}" if compared else "-",
                         f"{rate / compared:.2f}x" if compared else "-"])
    print_table(["model", "variant", "context", "batch", "parameters", "tokens/s", "nanoGPT", "ratio"], rows)

    print("\ngeneration: new tokens/s (all sequences together), greedy, prompts of 16 tokens; GPT-2's learned "
          "positions, as Hugging Face's, but for the rotary row")
    rows = []
    for name in ["tiny", "small"]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=1024, block_size=512, positions="learned", **sizes[name])).eval()
        rates = {}
        target_200 = f"HF {huggingface[name]} x1.5 = {1.5 * huggingface[name]:,.0f}"
        cases = [(1, 200, True), (1, 256, True), (16, 256, True), (1, 256, False)]
        for batch, new, cached in cases:
            prompts = torch.randint(0, 1024, (batch, 16)).tolist()
            run = lambda: model.generate(prompts, new, temperature=0, use_cache=cached)
            if not cached:  # slow (it reruns the whole sequence each step): measure once
                start = time.perf_counter()
                run()
                rate = batch * new / (time.perf_counter() - start)
            else:
                rate = best_rate(run, batch * new)
            rates[batch, new, cached] = rate
            rows.append([name, batch, new, "yes" if cached else "no", f"{rate:,.0f}",
                         target_200 if (batch, new) == (1, 200) else ""])
        if not args.quick:
            # the same weights held in bf16: half the bytes to read per token, which is what batch-1
            # decoding of the small model waits for (on a CPU with bf16 instructions)
            half = copy.deepcopy(model).to(torch.bfloat16)
            prompts = torch.randint(0, 1024, (1, 16)).tolist()
            rate = best_rate(lambda: half.generate(prompts, 200, temperature=0), 200)
            rows.append([name, 1, 200, "yes, bf16 weights", f"{rate:,.0f}", target_200])
        torch.manual_seed(0)
        rotary = GPT(GPTConfig(vocab_size=1024, block_size=512, positions="rotary", **sizes[name])).eval()
        prompts = torch.randint(0, 1024, (1, 16)).tolist()
        rate = best_rate(lambda: rotary.generate(prompts, 200, temperature=0), 200)
        rows.append([name, 1, 200, "yes, rotary", f"{rate:,.0f}", target_200])
        rows.append([name, "", "", "", f"cached/uncached {rates[1, 256, True] / rates[1, 256, False]:.1f}x", "target >= 5x"])
        rows.append([name, "", "", "", f"batch 16/batch 1 {rates[16, 256, True] / rates[1, 256, True]:.1f}x", "target >= 6x"])
    print_table(["model", "batch", "new tokens", "cache", "tokens/s", "target"], rows)

    # Sampling draws one token per sequence at every step. torch.multinomial draws a random number per
    # vocabulary entry; model.draw_from draws one per sequence and searches the running total.
    print("\ndrawing one token per sequence from (batch, 1024) probabilities, as sampling does at every step")
    rows = []
    generator = torch.Generator().manual_seed(0)
    draws = 200
    for batch in (16, 64):
        probs = torch.randn(batch, 1024).softmax(dim=-1)
        for label, draw in [("torch.multinomial", lambda: torch.multinomial(probs, 1, generator=generator)),
                            ("draw_from (model.py)", lambda: draw_from(probs, generator))]:
            rate = best_rate(lambda: [draw() for _ in range(draws)], draws)
            rows.append([batch, label, f"{1e6 / rate:,.0f}"])
    print_table(["batch", "method", "microseconds per draw"], rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def bench_sampling(args):
    """Many answers at once, as the evaluations and reward.py's comparisons are sampled: the default
    model's shape (4 layers x 128, rotary, context 256) with random weights, 16 batches of 64 prompts of
    16 tokens (--quick: 4 batches), 96 new tokens each at temperature 1, every batch seeded by where it
    starts. Three ways to use a CPU's cores: one thread for everything; every matrix product split over
    all threads (torch's default); and model.map_batches, one thread per batch with the batches side by
    side. Best of 3 repeats (1 with --quick). Side by side must write exactly the tokens one thread writes.
    (Products split over threads add in another order; near-uniform random logits then round into other
    tokens now and then.)"""
    import time

    import torch

    from model import GPT, GPTConfig, map_batches

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, block_size=256, n_layer=4, n_head=4, n_embd=128)).eval()
    batches, batch_size, new_tokens = (4 if args.quick else 16), 64, 96
    prompts = torch.randint(0, 1024, (batches * batch_size, 16)).tolist()

    def one_batch(start):
        return [g.tokens for g in model.generate(prompts[start:start + batch_size], new_tokens, temperature=1.0,
                                                 seed=start)]
    one_after_another = lambda: [tokens for start in range(0, len(prompts), batch_size) for tokens in one_batch(start)]
    ways = [("one thread, one batch after another", 1, one_after_another),
            (f"{threads} threads share each product", threads, one_after_another),
            (f"batches side by side (map_batches, {min(threads, 4)} threads)", threads,
             lambda: map_batches(model, one_batch, len(prompts), batch_size))]
    seconds, written = [], []   # written[way]: the tokens of each repeat
    for label, count, run in ways:
        best, repeats = float("inf"), []
        for _ in range(1 if args.quick else 3):
            torch.set_num_threads(count)
            start = time.perf_counter()
            repeats.append(run())
            best = min(best, time.perf_counter() - start)
        torch.set_num_threads(threads)
        seconds.append(best)
        written.append(repeats)
    rows = [[label, f"{len(prompts) * new_tokens / best:,.0f}", f"{best:.2f}", f"{seconds[0] / best:.2f}x"]
            for (label, _, _), best in zip(ways, seconds)]
    one_thread, _, side_by_side = written
    same = all(tokens == one_thread[0] for tokens in one_thread + side_by_side)
    print(f"torch {torch.__version__}, {threads} threads; {len(prompts)} answers of {new_tokens} tokens, "
          f"batches of {batch_size}; side by side wrote the very tokens of one thread: {'yes' if same else 'NO'}")
    print_table(["how", "new tokens/s", "seconds", "vs one thread"], rows)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def bench_pretrain(args):
    """Bits per byte of held-out text after equal wall time: pretrain.py with nanoGPT's CPU-example model
    (4 layers, 128 wide, 4 heads, context 64, batch 12, lr 1e-3, no dropout) trained for one minute
    (--quick: 15 s), once with a 1024-token BPE and once on plain bytes (our character baseline). The
    held-out text is the last 10% of the file, as in nanoGPT, and all of it is scored. The clock counts
    training steps only: tokenizer training and tokenizing come before it (and are cached for a second
    run), and evaluations stop it (nanoGPT's 62 s below include its few small evaluations). Reference,
    quoted not run: nanoGPT's character model reaches val loss 1.886 nats per character = 2.72 bits per
    byte in about 62 s on this machine."""
    import pretrain

    path = default_text_path(args.data)
    minutes = 0.25 if args.quick else 1.0
    rows = []
    for name, vocab_size in (("pretrain.py, BPE", 1024), ("pretrain.py, bytes", 256)):
        config = pretrain.Config(data=path, vocab_size=vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=64,
                                 batch_size=12, learning_rate=1e-3, warmup_iters=100, dropout=0.0,
                                 max_time=minutes, max_iters=10 ** 9, eval_interval=10 ** 9,
                                 eval_tokens=10 ** 9, samples=0, device="cpu",  # eval_tokens: all of val
                                 out_dir=os.path.join("out", "bench", f"pretrain-vocab{vocab_size}"))
        try:
            metrics = pretrain.main(config)
        except pretrain.UsageError as error:
            raise SystemExit(f"error: {error}")
        rows.append([name, metrics["vocab_size"], f"{metrics['bytes_per_token']:.2f}", metrics["steps"],
                     f"{metrics['tokens_per_second']:,.0f}", f"{metrics['train_seconds']:.0f}",
                     f"{metrics['last_val_loss']:.3f}", f"{metrics['last_val_bpb']:.3f}"])
    rows.append(["nanoGPT char (quoted)", 65, "1.00", 2000, "", "62", "1.886", "2.721"])
    print()
    print(f"{os.path.basename(path)}: val bits per byte after {minutes * 60:.0f} s of training, 4 layers x 128, context 64")
    print_table(["run", "vocab", "bytes/token", "steps", "train tokens/s", "seconds", "val nats/token",
                 "val bits/byte"], rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["tokenizer", "model", "sampling", "pretrain"])
    parser.add_argument("--data", default=None, help="text file to benchmark on (default: tiny Shakespeare if present)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a first look")
    args = parser.parse_args()
    if args.benchmark in ("model", "sampling") and args.data:
        parser.error(f"--data: `bench.py {args.benchmark}` times random weights and reads no text")
    try:
        {"tokenizer": bench_tokenizer, "model": bench_model, "sampling": bench_sampling,
         "pretrain": bench_pretrain}[args.benchmark](args)
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None
