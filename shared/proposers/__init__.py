"""Torch-free speculative proposers, run by the engine (services/engine/spec_decode.py) or, with
async scheduling, by the workers (services/worker/proposals.py) over their own copy of a request's
tokens: prompt lookup (ngram.py) and suffix decoding (suffix.py over suffix_tree.py)."""
