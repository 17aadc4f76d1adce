"""
Benchmarks: whole, repeatable measurements that print a table. README quotes their figures with the
command that produced them. (Tests never time anything; speed lives here.)

    python bench.py tokenizer     # BPE training time and encoding throughput
    python bench.py model         # training tokens/s, generation tokens/s with and without the KV cache
    python bench.py pretrain      # bits per byte at equal wall time on real text (tiny Shakespeare)
"""

import argparse
import os

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
    machine only ever slows a run down."""
    import time
    from collections import Counter

    import bpe

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
            start = time.perf_counter()
            result = run()
            seconds.append(time.perf_counter() - start)
        return min(seconds), result

    corpora = [("1x", text)]
    if not args.quick:
        corpora.append((f"{-(-10_000_000 // size)}x", text * -(-10_000_000 // size)))   # ~10 MB
    print(f"text: {path} ({size:,} bytes); 8 special tokens; one process; best of {repeats}")
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
    compiled = bpe.compile_pattern(bpe.SPLIT_PATTERN)
    chunks = [chunk.encode("utf-8") for chunk in compiled.findall(text)]
    num_merges = 1024 - 256 - len(bpe.SPECIAL_TOKENS)
    fast_seconds, fast_merges = best_seconds(lambda: bpe.train_merges_fast(Counter(chunks), num_merges))
    # The reference recounts every pair of the whole text after each merge: minutes at vocab 1024. With
    # --quick it runs only for about 30 s and the total is extrapolated linearly (an overestimate: later
    # merges run over fewer tokens, so they are cheaper than the first ones).
    probe = 10
    start = time.perf_counter()
    reference_merges = bpe.train_merges_reference(chunks, probe)
    probe_seconds = time.perf_counter() - start
    measured = num_merges if not args.quick else max(probe, min(num_merges, int(30 / (probe_seconds / probe))))
    if measured > probe:
        print(f"(running the reference for {measured} merges, about {probe_seconds / probe * measured:.0f} s "
              f"or less ...)", flush=True)
        start = time.perf_counter()
        reference_merges = bpe.train_merges_reference(chunks, measured)
        reference_seconds = time.perf_counter() - start
    else:
        reference_seconds = probe_seconds
    assert reference_merges == fast_merges[:measured], "the fast trainer's merges differ from the reference's"
    if measured == num_merges:
        label = f"{reference_seconds:.1f} (measured)"
    else:
        reference_seconds *= num_merges / measured
        label = f"~{reference_seconds:.0f} (linear extrapolation from {measured} merges; an overestimate)"
    print_table(["merges", "fast seconds", "reference seconds", "speed-up", "same merges"],
                [[num_merges, f"{fast_seconds:.2f}", label, f"{reference_seconds / fast_seconds:,.0f}x",
                  f"yes (first {measured})" if measured < num_merges else "yes"]])
    print("target: >= 50x")


def bench_model(args):
    raise SystemExit("not written yet")


def bench_pretrain(args):
    raise SystemExit("not written yet")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["tokenizer", "model", "pretrain"])
    parser.add_argument("--data", default=None, help="text file to benchmark on (default: tiny Shakespeare if present)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a first look")
    args = parser.parse_args()
    {"tokenizer": bench_tokenizer, "model": bench_model, "pretrain": bench_pretrain}[args.benchmark](args)
