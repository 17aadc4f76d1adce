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
    raise SystemExit("not written yet")


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
