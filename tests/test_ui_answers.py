"""The pages' answers without a browser: a page whose stream is closed before it reads a chunk (a tab
closed at once) still frees its request."""

import asyncio
from types import SimpleNamespace

from jaxserver import JAXServerConfig
from jaxserver.engine.request import GenerationRequest, OutputStream
from jaxserver.server.metrics import Metrics
from jaxserver.server.streaming import EngineClient
from jaxserver.server.ui import AnswersInFlight, Sampling


class RecordingBackend:
    """Just what a page's answer uses: prepare, submit, abort (recorded), count_request."""

    config = JAXServerConfig()

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def prepare(self, string, greedy=False, max_new_tokens=None, **options):
        return GenerationRequest([1, 2, 3], 8)

    def submit(self, request, loop=None):
        return OutputStream(request, loop)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def count_request(self) -> None:
        raise AssertionError("an answer closed before its end is not a served request")


def test_an_answer_closed_before_its_first_chunk_aborts_its_request():
    backend = RecordingBackend()
    in_flight = AnswersInFlight(backend, EngineClient(backend, Metrics(lambda: None)))
    sampling = Sampling(temperature=0.5, top_p=1.0, top_k=0, max_new_tokens=8, greedy=True)

    async def open_then_close() -> None:
        answers = in_flight.stream(SimpleNamespace(session_hash="tab"), lambda: "Hi", sampling)
        assert await anext(answers) == ""  # the engine has the request
        await answers.aclose()

    asyncio.run(open_then_close())
    assert len(backend.aborted) == 1
