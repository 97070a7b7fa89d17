"""Fault profiles more than one test runs: ``QUICK_CHAOS``, a short chaotic run (throttling, server
errors, closed connections, latency, invalid tokens, short psats, drops, ejections, the meeting ending)."""

from __future__ import annotations

from anonjoin.simulator import FaultProfile, FaultRule

CHAOS_RULES = (
    FaultRule(route="@protocol", kind="429", rate=0.05, retry_after=1.0),
    FaultRule(route="@protocol", kind="503", rate=0.04, retry_after=1.0),
    FaultRule(route="@protocol", kind="500", rate=0.03),
    FaultRule(route="@protocol", kind="504", rate=0.02),
    FaultRule(route="@protocol", kind="close", rate=0.02),
    FaultRule(route="@protocol", kind="latency", rate=0.02, latency_s=0.05),
    FaultRule(route="@sa", kind="invalid_token", rate=0.02, burst=2),
)
QUICK_CHAOS = FaultProfile(
    name="quick-chaos",
    rules=CHAOS_RULES,
    psat_ttl_s=3.0,
    drop_rate=0.15,
    drop_after_s=(0.2, 1.0),
    eject_rate=0.05,
    eject_after_s=(0.2, 1.0),
    end_meeting_after_s=1.5,
)
