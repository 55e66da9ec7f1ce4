"""One flag mechanism for every service (shared.engine_args.add_flag): each flag's default is its
PAGEDSERVE_* variable (lists comma-separated, switches from 1/true/yes/on), a flag can opt out of
the environment, aliases spell the same flag; and the attention backend is a flag of the config tree."""

from __future__ import annotations

import argparse

import pytest

from shared.engine_args import add_model_args, engine_config_from_args
from shared.frontend_args import add_arguments as frontend_arguments


def parse(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_environment_gives_the_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_SERVED_MODEL_NAME", "a,b")
    monkeypatch.setenv("PAGEDSERVE_DISABLE_UI", "yes")
    monkeypatch.setenv("PAGEDSERVE_MAX_N", "7")
    monkeypatch.setenv("PAGEDSERVE_FRONTEND_ID", "shared-by-replicas")  # not read: unique per process
    args = parse(frontend_arguments, [])
    assert (args.served_model_name, args.disable_ui, args.max_n, args.frontend_id) == (["a", "b"], True, 7, None)
    args = parse(frontend_arguments, ["--served-model-name", "c", "--no-disable-ui", "--max-n", "2"])
    assert (args.served_model_name, args.disable_ui, args.max_n) == (["c"], False, 2)


def test_aliases_spell_the_same_flag():
    assert parse(add_model_args, ["-tp", "2"]).tensor_parallel_size == 2
    assert parse(frontend_arguments, ["--model", "tok"]).tokenizer == "tok"  # the frontend's older spelling


def test_attention_backend_is_in_the_config_tree(monkeypatch, model_dirs):
    model = str(model_dirs("llama"))
    config = engine_config_from_args(parse(add_model_args, ["--model", model, "--attention-backend", "triton"]))
    assert config.compilation.attention_backend == "triton"
    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "torch")  # the variable is the flag's default
    assert engine_config_from_args(parse(add_model_args, ["--model", model])).compilation.attention_backend == "torch"
    with pytest.raises(SystemExit):
        parse(add_model_args, ["--attention-backend", "cuda-magic"])


def test_frontend_flags_reach_its_config():
    from services.frontend.server import frontend_config

    config = frontend_config(parse(frontend_arguments, [
        "--response-store-max-entries", "5", "--response-store-ttl", "60", "--tool-call-parser", "hermes",
        "--enable-auto-tool-choice", "--reasoning-parser", "qwen3", "--max-n", "3",
    ]))
    assert (config.response_store_max_entries, config.response_store_ttl) == (5, 60.0)
    assert (config.tool_call_parser, config.enable_auto_tool_choice, config.reasoning_parser) == ("hermes", True, "qwen3")
    assert config.limits.max_n == 3
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        frontend_config(parse(frontend_arguments, ["--enable-auto-tool-choice"]))
