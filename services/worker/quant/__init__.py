"""Quantization: FP8 KV cache storage and scales (kv_fp8, kv_scales); quantized weights elsewhere here."""
