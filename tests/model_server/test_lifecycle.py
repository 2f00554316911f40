"""Disconnects stop generation, a full queue answers 503 with Retry-After, metrics carry vLLM's names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ._util import metric, wait_until
from .conftest import BASE, MAX_MODEL_LEN, RunningServer, start_server, stop_server

pytestmark = pytest.mark.model

STORY = [{"role": "user", "content": "Tell me a very long story about a dragon and a knight."}]
VLLM_METRICS = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
]


def _idle(url: str) -> bool:
    return metric(url, "vllm:num_requests_running") == 0 and metric(url, "vllm:num_requests_waiting") == 0


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "non-stream"])
def test_client_disconnect_stops_generation(
    client: openai.OpenAI, server: RunningServer, streaming: bool
) -> None:
    wait_until(lambda: _idle(server.url), 60, "server idle before the test")
    aborted_before = metric(server.url, "vllm:request_success_total", finished_reason="abort")
    tokens_before = metric(server.url, "vllm:generation_tokens_total")
    max_tokens = MAX_MODEL_LEN - 64  # minutes of generation on this CPU if nothing stopped it

    if streaming:
        stream = client.chat.completions.create(
            model=BASE,
            messages=STORY,
            max_tokens=max_tokens,
            stream=True,
            extra_body={"ignore_eos": True},  # only the disconnect can end it early
        )
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the client goes away mid-stream
    else:
        body = {"model": BASE, "messages": STORY, "max_tokens": max_tokens, "ignore_eos": True}
        # The client gives up (and closes the connection) long before the answer could be ready.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.v1}/chat/completions", json=body, timeout=httpx.Timeout(10, read=2))

    wait_until(lambda: _idle(server.url), 30, "generation to stop after the disconnect")
    assert metric(server.url, "vllm:request_success_total", finished_reason="abort") == aborted_before + 1
    assert metric(server.url, "vllm:generation_tokens_total") - tokens_before < max_tokens / 4


def test_metrics_use_vllm_names_and_model_name_label(client: openai.OpenAI, server: RunningServer) -> None:
    client.chat.completions.create(model=BASE, messages=STORY, temperature=0, max_tokens=4)
    text = httpx.get(f"{server.url}/metrics").text
    for name in VLLM_METRICS:
        assert f'{name}{{model_name="{BASE}"}}' in text or f'{name}_count{{model_name="{BASE}"}}' in text, (
            name
        )
    assert metric(server.url, "vllm:generation_tokens_total", model_name=BASE) >= 4


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One running slot and one waiting slot: the third request has nowhere to go."""
    log: Path = tmp_path_factory.mktemp("tiny") / "model-server.log"
    srv = start_server(["--max-batch-size", "1", "--max-queue", "1", "--max-model-len", "256"], log)
    yield srv
    stop_server(srv.proc)


def test_full_queue_answers_503_with_retry_after(tiny_server: RunningServer) -> None:
    # ignore_eos: the running request must hold its slot for the whole test.
    body = {"model": BASE, "messages": STORY, "max_tokens": 200, "stream": True, "ignore_eos": True}
    url = f"{tiny_server.v1}/chat/completions"
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url, json=body) as running:
            events = (line for line in running.iter_lines() if line.startswith("data: "))
            next(events)  # the opening (role) chunk, sent on acceptance
            next(events)  # the first token: this request now holds the only batch slot
            with http.stream("POST", url, json=body) as waiting:
                assert waiting.status_code == 200  # accepted into the queue
                wait_until(
                    lambda: metric(tiny_server.url, "vllm:num_requests_waiting") == 1, 30, "one waiting"
                )
                refused = http.post(url, json={**body, "stream": False})
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "server_error"
