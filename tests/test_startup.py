"""Start-up: once the server is ready and its remaining programs are compiled, no request of any length, mix
or sampling setting waits for a compilation."""

import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from jaxserver import JAXServer
from jaxserver.engine.request import GenerationRequest, SamplingOptions
from tests import tiny

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_no_request_after_warm_up_waits_for_a_compilation(tiny_llama_dir):
    config = tiny.test_config(max_length=256, max_num_seqs=4, max_num_batched_tokens=64, warm_up=True)
    server = JAXServer.load(tiny_llama_dir, config=config)
    engine = server.engine
    deadline = time.monotonic() + 300
    while engine.stats()["programs_compiling"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.stats()["programs_compiling"] == 0
    compiled: list[float] = []

    def count(event: str, seconds: float, **_) -> None:
        if event == BACKEND_COMPILE:
            compiled.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        rng = np.random.default_rng(0)
        vocab = server.tokenizer.vocab_size
        sampled = SamplingOptions(temperature=1.0, top_p=0.9, top_k=20, seed=1)
        penalized = SamplingOptions(greedy=True, repetition_penalty=1.2, presence_penalty=0.5)
        requests = []
        for length in range(1, 256, 9):  # every prompt length's bucket, answers up to the context's end
            prompt = rng.integers(3, vocab, length).tolist()
            options = (SamplingOptions(greedy=True), sampled, penalized)[length % 3]
            requests.append(
                GenerationRequest(prompt, 256 - length, options, ignore_eos=True, logprobs=length % 2 or None)
            )
        with ThreadPoolExecutor(6) as pool:  # alone, and up to six at once over four rows
            finished = list(pool.map(lambda r: list(engine.submit(r))[-1].finish_reason, requests))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
        server.shutdown()
    assert finished == ["length"] * len(requests)
    assert compiled == []
