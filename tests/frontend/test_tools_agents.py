"""An agent framework's tool loop against the real stack: the OpenAI Agents SDK, over chat
completions, makes the model call a function tool (tool_choice required forces a valid call even
from a random model), runs the tool, sends its output back, and finishes with the model's answer."""

from __future__ import annotations

import asyncio
from typing import Literal

import openai
import pytest

agents = pytest.importorskip("agents")


def test_an_agent_runs_its_tool_loop(tools_base: str):
    agents.set_tracing_disabled(True)
    calls: list[tuple[str, str]] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        calls.append((city, unit))
        return f"21 degrees {unit} in {city}"

    name = openai.OpenAI(base_url=f"{tools_base}/v1", api_key="unused").models.list().data[0].id

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{tools_base}/v1", api_key="unused", max_retries=0, timeout=120)
        agent = agents.Agent(
            name="weather", instructions="Answer with the weather.", tools=[get_weather],
            model=agents.OpenAIChatCompletionsModel(model=name, openai_client=client),
            model_settings=agents.ModelSettings(tool_choice="required", temperature=0.0, max_tokens=60),
        )
        return await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    assert len(calls) >= 1 and all(c in ("Paris", "Rome") and u in ("celsius", "fahrenheit") for c, u in calls)
    outputs = [item for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs and outputs[0].output.startswith("21 degrees")
    assert isinstance(result.final_output, str)  # the turn after the tool: the model's answer (tool_choice reset)
