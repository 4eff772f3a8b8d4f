"""Tokenisation once: time `distsent.data.tokenize` cold, from its cache, and with the cache off.

    python bench/tokenize_cache.py [--dataset imdb] [--max-length 256]

Uses a fresh, temporary datasets cache, so the first call really tokenises. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="imdb", choices=["imdb", "rotten_tomatoes"])
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    # Before datasets is imported: it reads the cache location once.
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="distsent-tokenize-bench-")
    import datasets

    from distsent.config import load_config
    from distsent.data import _is_whole, load_labeled_splits, tokenize
    from distsent.modeling import build_tokenizer

    datasets.disable_progress_bars()
    cfg = load_config(None, [f"data.dataset=embedded:{args.dataset}", f"data.max_length={args.max_length}"])
    tokenizer = build_tokenizer(cfg.model)
    splits = load_labeled_splits(cfg.data)
    texts, labels = splits.texts["train"], splits.labels["train"]
    cold = timed(lambda: tokenize(texts, labels, tokenizer, cfg.data))
    warm = timed(lambda: tokenize(texts, labels, tokenizer, cfg.data))
    # Part of every cached load: the check that the cache file holds every row whole.
    cached = tokenize(texts, labels, tokenizer, cfg.data)
    check = timed(lambda: _is_whole(cached, len(texts)))
    cfg.data.cache_tokenized = False
    uncached = timed(lambda: tokenize(texts, labels, tokenizer, cfg.data))
    record = {
        "texts": len(texts),
        "cold_seconds": round(cold, 3),
        "cached_seconds": round(warm, 3),
        "cache_check_seconds": round(check, 4),
        "cache_off_seconds": round(uncached, 3),
        "speedup": round(cold / warm, 1),
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
