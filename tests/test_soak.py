"""The soak benchmark (benchmarks/soak.py) in short: 300 mixed requests, some of whose clients leave on
purpose and some invalid, against `jaxserver serve` over the tiny model."""

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 300


def test_a_short_soak_loses_nothing_and_leaks_no_slot_or_page(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # the server on one CPU device, not the tests' 8 simulated ones
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # scripts, not a package
    soak = importlib.import_module("soak")
    flags = f"--no-ui --max-length 1024 --max-num-seqs 16 --compilation-cache-dir {tmp_path / 'xla'}"
    argv = ["--model", str(tiny_llama_dir), "--requests", str(REQUESTS), "--concurrency", "16"]
    report = soak.soak(soak.parse_args([*argv, "--flags", flags, "--log", str(tmp_path / "serve.log")]))

    classes = report["classes"]
    assert sum(classes.values()) == REQUESTS
    assert classes["lost"] == 0, report["lost_samples"]
    assert report["server_errors"] == 0
    assert 0 < classes["disconnected"] <= sum(report["planned_disconnects"].values())
    assert classes["error_body"] > 0 and classes["complete"] > REQUESTS / 2
    assert sum(q["complete"] for q in report["latency_by_quarter"]) <= classes["complete"]
    after = report["engine_after"]
    assert after["running_requests"] == after["waiting_requests"] == after["pages_held"] == 0
    rss = report["rss_kib"]
    assert rss["start"] > 0 and rss["end"] > 0  # measured; too noisy to bound in a short run
    assert [f for f in report["failures"] if not f.startswith("RSS")] == []
