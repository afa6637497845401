"""Loading paths and their errors: HF folders, our checkpoint, load_from_params, wrong inputs."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserver import JAXServer, ModelConfig
from jaxserver.errors import ModelLoadError
from jaxserver.model.loader import load_model
from tests import tiny


def greedy_answer(server: JAXServer, prompt: str = "The capital of France") -> str:
    return server.forward_instruct_non_api(prompt, greedy=True)["response"]


def test_checkpoint_round_trip(tiny_server, tmp_path):
    tiny_server.save(tmp_path / "ckpt")
    reloaded = JAXServer.load(tmp_path / "ckpt", config=tiny.test_config())
    assert reloaded.model_config == tiny_server.model_config
    assert greedy_answer(reloaded) == greedy_answer(tiny_server)


def test_params_read_back_while_the_engine_serves(tiny_llama_dir, tiny_server):
    """The server keeps one copy of the weights, the engine's; `params` rebuilds the loaded pytree."""
    _, loaded, _ = load_model(tiny_llama_dir)
    assert tiny_server._params is None
    params = tiny_server.params
    assert sorted(params) == sorted(loaded) and sorted(params["layers"]) == sorted(loaded["layers"])
    pairs = [(params[n], loaded[n]) for n in ("embed", "final_norm")]
    pairs += [(params["layers"][n], stacked) for n, stacked in loaded["layers"].items()]
    for got, want in pairs:  # the weights in the server's dtype (bf16 on machines with the bf16 kernel)
        want = jnp.asarray(want).astype(got.dtype)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_load_from_params_matches_load(tiny_llama_dir, tiny_server):
    cfg, params, tokenizer = load_model(tiny_llama_dir)
    server = JAXServer.load_from_params(
        params={"params": params}, tokenizer=tokenizer.hf, config_model=cfg, config=tiny.test_config()
    )
    assert greedy_answer(server) == greedy_answer(tiny_server)


def test_sharded_safetensors_index(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _, params, _ = load_model(folder)
    _, expected, _ = load_model(tiny_llama_dir)
    np.testing.assert_array_equal(params["layers"]["wq"], expected["layers"]["wq"])


def test_missing_path_names_what_is_supported(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*gguf"):
        load_model(tmp_path / "nope")


def test_folder_without_weights(tiny_llama_dir, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(folder)


def test_unsupported_architecture_is_named(tiny_llama_dir, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(folder)


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(bogus)


def test_load_from_params_needs_everything():
    with pytest.raises(ModelLoadError, match="needs params"):
        JAXServer.load_from_params(params=None, tokenizer=None, config_model=None)
    with pytest.raises(ModelLoadError, match="ModelConfig"):
        JAXServer.load_from_params(params={}, tokenizer=object(), config_model={"hidden_size": 1})


def test_model_config_rejects_bad_head_counts():
    with pytest.raises(ModelLoadError, match="multiple"):
        ModelConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
        )
