"""Several processes serving one model: joining `jax.distributed`, the channel that carries each device
call from process 0 to the others, and the heartbeats that tell each process when another is gone.

Process 0 runs the scheduler and announces every call of its executor (`engine.executor`) before it runs
it; the others receive the call and run it too, so that all run the same programs over one global mesh.
A call travels as pickled host arrays in a `uint8` array that one small jitted program copies from
process 0's first device to every process's (the transport is XLA's collectives, Gloo on CPU). Every
process also writes a heartbeat into the coordinator's key-value store; one that stops writing, or whose
store cannot be reached, counts as failed (`Heartbeats`).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserver.config import JAXServerConfig
from jaxserver.errors import JAXServerError
from jaxserver.model import cpu_kernels, paged
from jaxserver.model.config import ModelConfig

log = logging.getLogger(__name__)

# A call fits one broadcast of this many bytes (a step of a few hundred tokens, its page table and
# sampling rows); a longer one (token masks, penalty rows) sends the rest in a second, sized to it.
MESSAGE_BYTES = 64 * 1024
_LENGTH_BYTES = 8
HEARTBEAT_INTERVAL_S = 0.5
_KEY = "jaxserver/heartbeat/{}"
_FAILED_KEY = "jaxserver/failed/{}"
# Settings that may differ between the processes of a group; every other one must be the same.
PER_PROCESS_SETTINGS = {"host", "port", "process_id", "api_key", "logging", "ui", "cors_origins"}


class GroupError(JAXServerError):
    """The process group cannot form or has lost a member."""


@dataclass(frozen=True)
class GroupSettings:
    coordinator_address: str
    num_processes: int
    process_id: int
    timeout_s: float  # to join, and for process 0's setup to reach the others
    heartbeat_timeout_s: float

    @classmethod
    def of(cls, config: JAXServerConfig) -> GroupSettings | None:
        """The config's group, or None for a process of its own."""
        if config.num_processes == 1:
            return None
        assert config.coordinator_address is not None  # the config checks it
        return cls(
            config.coordinator_address,
            config.num_processes,
            config.process_id,
            config.distributed_timeout_s,
            config.heartbeat_timeout_s,
        )

    @property
    def leads(self) -> bool:
        return self.process_id == 0

    def describe(self) -> str:
        return f"process {self.process_id} of {self.num_processes} at {self.coordinator_address}"


def join(settings: GroupSettings) -> None:
    """Initialise `jax.distributed` (before any other JAX call). A group that has not formed within
    `timeout_s` ends this process with a message naming the settings: JAX itself would abort it a little
    later with a bare deadline error."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining the process group as %s (for up to %g s)", settings.describe(), settings.timeout_s)
    joined = threading.Event()

    def give_up() -> None:
        if not joined.wait(settings.timeout_s):
            log.error(
                "jaxserver: the process group did not form within %g s (--distributed-timeout-s) as %s: "
                "check that process 0 runs and listens at --coordinator-address, that every process has "
                "the same --num-processes and its own --process-id",
                settings.timeout_s,
                settings.describe(),
            )
            os._exit(2)

    threading.Thread(target=give_up, name="jaxserver-join", daemon=True).start()
    try:
        jax.distributed.initialize(
            settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=int(settings.timeout_s) + 10,
            # JAX aborts every process once one misses heartbeats this long; ours notice sooner and end
            # requests with an error first.
            heartbeat_timeout_seconds=int(3 * settings.heartbeat_timeout_s) + 10,
            shutdown_timeout_seconds=int(settings.heartbeat_timeout_s) + 5,
        )
    except Exception as exc:
        raise GroupError(f"could not join the process group as {settings.describe()}: {exc}") from exc
    finally:
        joined.set()
    if jax.process_count() != settings.num_processes:
        raise GroupError(
            f"--num-processes is {settings.num_processes} here, but process 0 formed a group of "
            f"{jax.process_count()}: start every process with the same --num-processes"
        )
    log.info(
        "joined: %d processes, %d devices (%d here)",
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )


@dataclass(frozen=True)
class ExecutorSetup:
    """What process 0 sends the others first: the executor they must build (the settings process 0 chose
    for its machine: pages, cache dtype, attention) and what their model and mesh must be."""

    model: ModelConfig
    weight_dtype: str
    mesh_shape: tuple[int, ...]
    attention_kernel: bool
    executor: dict[str, Any]

    def attention(self) -> paged.Attention:
        return cpu_kernels.paged_attention if self.attention_kernel else paged.attention_reference


class StepChannel:
    """Process 0 `send`s a call, every other process `receive`s it, in the same order."""

    def __init__(self) -> None:
        firsts = [
            min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
            for p in range(jax.process_count())
        ]
        mesh = Mesh(np.asarray(firsts), ("processes",))
        self._rows = NamedSharding(mesh, PartitionSpec("processes"))
        self._local = next(d for d in firsts if d.process_index == jax.process_index())
        self._first = jax.jit(lambda rows: rows[0], out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._leads = jax.process_index() == 0
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        assert self._leads, "only process 0 sends"
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        head = np.zeros(MESSAGE_BYTES, np.uint8)
        head[:_LENGTH_BYTES] = np.frombuffer(len(data).to_bytes(_LENGTH_BYTES, "little"), np.uint8)
        room = MESSAGE_BYTES - _LENGTH_BYTES
        head[_LENGTH_BYTES : _LENGTH_BYTES + min(room, len(data))] = np.frombuffer(data[:room], np.uint8)
        with self._lock:
            self._broadcast(head)
            if len(data) > room:
                rest = np.zeros(_rest_bytes(len(data) - room), np.uint8)
                rest[: len(data) - room] = np.frombuffer(data[room:], np.uint8)
                self._broadcast(rest)

    def receive(self) -> Any:
        assert not self._leads, "process 0 sends"
        head = self._broadcast(np.zeros(MESSAGE_BYTES, np.uint8))
        length = int.from_bytes(head[:_LENGTH_BYTES].tobytes(), "little")
        data = head[_LENGTH_BYTES : _LENGTH_BYTES + length].tobytes()
        room = MESSAGE_BYTES - _LENGTH_BYTES
        if length > room:
            rest = self._broadcast(np.zeros(_rest_bytes(length - room), np.uint8))
            data += rest[: length - room].tobytes()
        return pickle.loads(data)

    def _broadcast(self, data: np.ndarray) -> np.ndarray:
        """Process 0's `data` on every process (the others pass an array of the same shape)."""
        local = jax.device_put(data[None], self._local)
        rows = jax.make_array_from_single_device_arrays(
            (jax.process_count(), *data.shape), self._rows, [local]
        )
        return np.asarray(self._first(rows).addressable_data(0))


def check_same_settings(channel: StepChannel, config: JAXServerConfig, model: str | None) -> None:
    """The first call on the channel, right after joining (a channel's first collective must start on every
    process within Gloo's 30 s): process 0 sends its settings, the others check theirs are the same."""
    mine = config.model_dump(mode="json", exclude=PER_PROCESS_SETTINGS) | {"model": model}
    if jax.process_index() == 0:
        channel.send(("settings", (mine,)))
        return
    name, (theirs,) = channel.receive()
    differ = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
    if name != "settings" or differ:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {mine.get(k)} here, {theirs.get(k)} on process 0" for k in differ
        )
        raise GroupError(f"every process of the group needs the same settings: {shown}")


def _rest_bytes(count: int) -> int:
    """A power of two of at least MESSAGE_BYTES that holds `count` bytes, so that few sizes compile."""
    size = MESSAGE_BYTES
    while size < count:
        size *= 2
    return size


class Heartbeats:
    """Writes this process's heartbeat every HEARTBEAT_INTERVAL_S and watches its peers' (process 0
    watches all, the others process 0): `on_failure(reason)` is called once, when a peer has not written
    for `timeout_s`, the key-value store fails, or `local_error()` reports a failure here."""

    def __init__(
        self,
        timeout_s: float,
        on_failure: Callable[[str], None],
        local_error: Callable[[], str | None] = lambda: None,
    ):
        from jax._src import distributed  # the client `jax.distributed.initialize` made (no public handle)

        self._client = distributed.global_state.client
        self._me = jax.process_index()
        count = jax.process_count()
        self._peers = [p for p in range(count) if p != self._me] if self._me == 0 else [0]
        self._timeout_s = timeout_s
        self._on_failure = on_failure
        self._local_error = local_error
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxserver-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def report(self, reason: str) -> None:
        """Tell the other processes why this one is about to fail (they name it in their own error)."""
        try:
            self._client.key_value_set(_FAILED_KEY.format(self._me), reason, allow_overwrite=True)
        except Exception:
            log.warning("could not report the failure to the other processes", exc_info=True)

    def _run(self) -> None:
        seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic()) for p in self._peers}
        beat = 0
        while not self._stopped.wait(HEARTBEAT_INTERVAL_S):
            beat += 1
            now = time.monotonic()
            error = self._local_error()
            if error:
                self._fail(error)
                return
            try:
                self._client.key_value_set(_KEY.format(self._me), str(beat), allow_overwrite=True)
                for peer in self._peers:
                    failure = _try_get(self._client, _FAILED_KEY.format(peer))
                    if failure is not None:
                        self._fail(f"process {peer} failed: {failure}")
                        return
                    value = _try_get(self._client, _KEY.format(peer))
                    if value != seen[peer][0]:
                        seen[peer] = (value, now)
                    elif now - seen[peer][1] > self._timeout_s:
                        self._fail(f"process {peer} sent no heartbeat for {self._timeout_s:g} s")
                        return
            except Exception as exc:  # noqa: BLE001 - the coordinator (in process 0) is gone
                self._fail(f"the coordinator cannot be reached: {exc}")
                return

    def _fail(self, reason: str) -> None:
        if not self._stopped.is_set():
            self._on_failure(reason)


def _try_get(client: Any, key: str) -> str | None:
    try:
        return client.key_value_try_get(key)
    except Exception as exc:
        if "NOT_FOUND" in str(exc):
            return None
        raise
