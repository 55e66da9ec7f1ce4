"""The torch-free request processor shared by the offline LLM and the HTTP frontend (see
shared.processor.processor for what it owns and where stop strings are checked)."""
