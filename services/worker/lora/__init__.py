"""Multi-LoRA in the worker: adapters loaded from PEFT folders, kept in LRU device slots, and
applied per row inside the linear layers (segmented matmuls over the rows of each adapter)."""
