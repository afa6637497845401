"""Test setup: CPU only, 8 simulated devices (set before JAX is imported), tiny models made here."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return tiny.make_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir):
    from jaxserver import JAXServer

    return JAXServer.load(tiny_llama_dir, config=tiny.test_config(max_length=128, max_compile_tokens=8))


@pytest.fixture(scope="module")
def served_tiny(tiny_llama_dir):
    """The tiny model served over HTTP (uvicorn in this process) for one test module: (server, URL)."""
    from tests.live import serving

    with serving(tiny_llama_dir, tiny.test_config(max_length=2048, max_batch_size=8)) as served:
        yield served
