"""--generation-config (auto / vllm / a folder) and --override-generation-config, as the engine
reads them from its flags: the request defaults every frontend then applies."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from shared.engine_args import add_model_args, engine_config_from_args


def defaults(model: str, *flags: str) -> dict:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return engine_config_from_args(parser.parse_args(["--model", model, *flags]), weights=False).model.generation_defaults


@pytest.fixture(scope="module")
def model_with_defaults(model_dirs, tmp_path_factory):
    """A checkpoint whose generation_config.json sets sampling defaults."""
    path = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(model_dirs("llama"), path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(temperature=0.6, top_p=0.9, max_new_tokens=40, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return str(path)


def test_auto_is_the_models(model_with_defaults):
    assert defaults(model_with_defaults) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 40}


def test_vllm_drops_the_models_and_keeps_the_override(model_with_defaults):
    assert defaults(model_with_defaults, "--generation-config", "vllm") == {}
    override = ["--generation-config", "vllm", "--override-generation-config", '{"top_k": 5}']
    assert defaults(model_with_defaults, *override) == {"top_k": 5}


def test_folder_and_override_on_top(model_with_defaults, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "repetition_penalty": 1.1}))
    got = defaults(model_with_defaults, "--generation-config", str(tmp_path),
                   "--override-generation-config", '{"temperature": 0.0, "max_new_tokens": 3}')
    assert got == {"temperature": 0.0, "repetition_penalty": 1.1, "max_tokens": 3}


def test_auto_merges_the_override(model_with_defaults):
    got = defaults(model_with_defaults, "--override-generation-config", '{"temperature": 1.0}')
    assert got == {"temperature": 1.0, "top_p": 0.9, "max_tokens": 40}


@pytest.mark.parametrize(("override", "message"), [
    ('{"max_new_tokens": "many"}', "max_new_tokens must be a finite number"),
    ('{"temperature": true}', "temperature must be a finite number"),
    ('{"top_p": 0}', "top_p"),
    ("not json", "must be a JSON object"),
])
def test_bad_overrides_name_the_key(model_with_defaults, override, message):
    with pytest.raises(ValueError, match="--override-generation-config") as err:
        defaults(model_with_defaults, "--override-generation-config", override)
    assert message in str(err.value)
