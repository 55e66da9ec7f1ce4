"""vLLM-compatible entry points: the module path `pagedserve.entrypoints.openai.api_server`,
`--config FILE.yaml`, and vLLM's flags that pagedserve does not implement (a clear error)."""
