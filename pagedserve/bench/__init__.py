"""`pagedserve bench`: serving and offline benchmarks with vLLM's flags and result keys."""
