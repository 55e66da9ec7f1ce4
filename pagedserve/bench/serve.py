"""`pagedserve bench serve`: streaming requests against any OpenAI-compatible server.

Requests arrive as a Poisson process (--request-rate, --burstiness: gamma-distributed gaps) or all
at once, at most --max-concurrency in flight. The result uses vLLM's keys (output_throughput,
mean/median/std/p99 of TTFT, TPOT, ITL and E2EL in ms), so tooling written for `vllm bench serve`
reads it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from pagedserve.bench.datasets import SampleRequest


@dataclass
class RequestOutput:
    success: bool = False
    start: float = 0.0  # seconds after the benchmark started
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk, from the benchmark start
    prompt_len: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str = ""


def request_body(req: SampleRequest, model: str, chat: bool, ignore_eos: bool, temperature: float) -> dict:
    body = {
        "model": model, "max_tokens": req.output_len, "temperature": temperature, "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: use the completions endpoint for token ids")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(choice: dict) -> str:
    delta = choice.get("delta")
    return (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")


async def one_request(client: httpx.AsyncClient, url: str, body: dict, t0: float, req: SampleRequest) -> RequestOutput:
    out = RequestOutput(start=time.perf_counter() - t0, prompt_len=req.prompt_len)
    begin, last, chunks = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300].decode(errors='replace')}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if usage:
                    out.output_tokens = usage.get("completion_tokens") or 0
                    out.prompt_len = usage.get("prompt_tokens") or out.prompt_len
                if not chunk.get("choices"):
                    continue
                text = _chunk_text(chunk["choices"][0])
                now = time.perf_counter()
                if last is None:
                    out.ttft = now - begin
                else:
                    out.itl.append(now - last)
                last, chunks = now, chunks + 1
                out.token_times.append(now - t0)
                out.text += text
        out.latency = time.perf_counter() - begin
        out.output_tokens = out.output_tokens or chunks
        out.success = last is not None
        if not out.success:
            out.error = "the stream ended without a token"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error = repr(exc)
    return out


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each request: 0 for an infinite rate, else gamma gaps with mean 1/rate
    (burstiness 1: a Poisson process; lower: burstier)."""
    if rate == float("inf"):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def run_load(
    url: str, bodies: list[dict], requests: list[SampleRequest], gaps: list[float], max_concurrency: int | None,
    progress=None, headers: dict | None = None,
) -> tuple[list[RequestOutput], float]:
    """Send every body (after its gap), at most max_concurrency at once; (outputs, duration)."""
    limit = max_concurrency or len(bodies)
    sem = asyncio.Semaphore(limit)
    limits = httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits, headers=headers) as client:
        t0 = time.perf_counter()

        async def bounded(body: dict, req: SampleRequest) -> RequestOutput:
            async with sem:
                out = await one_request(client, url, body, t0, req)
            if progress is not None:
                progress.update(1)
            return out

        tasks = []
        for body, req, gap in zip(bodies, requests, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(bounded(body, req)))
        outputs = await asyncio.gather(*tasks)
        return list(outputs), time.perf_counter() - t0
