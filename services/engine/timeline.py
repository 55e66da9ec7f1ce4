"""The critical path of one step, from the engine's and the worker's timestamps.

Per step: the engine's planning time, the worker's compute time, the worker's idle time (waiting
for this plan since its previous step ended) and transport: the time a plan or a result spent
travelling while its receiver was waiting for it (a message that arrives while the receiver is
busy costs nothing on the critical path). Transport compares the worker's wall clock with the
engine's, so it assumes one clock (the same host); across hosts it is approximate, never negative.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.workers import StepTimes
from shared.protocol import StepResult

# Finer than the request latency buckets: a step's parts take microseconds to milliseconds.
STEP_PART_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)


@dataclass(frozen=True)
class StepTimeline:
    compute_s: float  # the worker executing the step
    idle_s: float  # the worker waiting for the plan since its previous step
    transport_s: float  # plan and result in transit while their receiver waited


def step_timeline(times: StepTimes, result: StepResult) -> StepTimeline:
    """The worker's parts of a step from the times it reported and the engine's own."""
    # the plan leg counts only while the worker idled: a plan queued behind a step costs nothing
    plan_leg = min(max(0.0, result.received_at - times.sent), result.idle_s)
    # the result leg counts only while the engine waited: one queued while it planned costs nothing
    result_sent = result.received_at + result.compute_s
    result_leg = max(0.0, times.got - max(result_sent, times.waiting))
    return StepTimeline(result.compute_s, result.idle_s, plan_leg + result_leg)
