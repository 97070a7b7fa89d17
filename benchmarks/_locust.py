"""The Locust peer: FastHttpUser doing the same chain as the raw baseline, headless, from Python.

Imported only inside a worker process whose spec says ``client: locust``: Locust monkey-patches the
standard library with gevent when it is imported, which must not happen to the harness or to an asyncio
worker. ``concurrency`` users run at once (spawned together); each takes the next guest number, does one
join (and the leave), and stops once every guest has been taken. Requests are named by route, as a Locust
user would, so Locust's statistics stay one entry a route. Locust's own machinery (statistics, its CPU
monitor greenlet) is part of its cost, as it is for anyone who runs it.
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401  (first: gevent's monkey-patching)

# isort: on

import cProfile
import importlib
import itertools
import json
import resource
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin

from locust import FastHttpUser, constant, events
from locust.env import Environment
from locust.exception import StopUser

from benchmarks._chain import ChainError, link
from benchmarks._harness import percentile, self_rss_bytes

POLL_RELEASE_S = 5.0

# gevent comes with Locust; looked up at run time so the type check needs neither installed.
gevent: Any = importlib.import_module("gevent")
importlib.import_module("gevent.event")
importlib.import_module("gevent.ssl")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run(
    spec: dict[str, Any], *, emit: Callable[..., None], wait_for: Callable[[str], None]
) -> dict[str, Any]:
    info = spec["info"]
    guests, concurrency = int(spec["guests"]), int(spec["concurrency"])
    origin, meeting_url = info["origin"], info["meeting_url"]
    base = info["discover_url"].split("/platformservice")[0]
    ca_file = info["ca_file"]

    # geventhttpclient asks the factory for a context per connection pool (per user and host) and, when the
    # factory takes no ``cafile``, loads certifi's whole bundle into it (~70 ms each time). One context with
    # the simulator's CA, built once, keeps that start-up cost out of the per-join figures.
    shared_context = gevent.ssl.create_default_context(cafile=ca_file)

    def ssl_context(cafile: str | None = None, **_: Any) -> Any:
        return shared_context

    state: dict[str, Any] = {}
    numbers = itertools.count()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    finished = gevent.event.Event()
    done = itertools.count(1)

    def call(client: Any, method: str, url: str, name: str, headers: dict[str, str], body: Any = None) -> Any:
        resp = client.request(method, url, name=name, headers=headers, json=body)
        if resp.status_code >= 300:
            raise ChainError(f"{name} -> {resp.status_code}")
        content = resp.content
        return json.loads(content) if content else {}

    def join_one(client: Any, i: int) -> None:
        asi = str(uuid.uuid4())
        name = f"guest-{i}"
        t = time.perf_counter()
        body = call(
            client,
            "POST",
            state["tokens_url"],
            "anon_tokens",
            {"Authorization": state["aad"]},
            {"applicationSessionId": asi, "allowedOrigins": origin, "meetingUrl": meeting_url},
        )
        url = state["tokens_url"]
        psat = body["token"]
        discover = link(body, "discover", url)
        body = call(client, "GET", discover, "anon_discover", {"Origin": origin})
        conference_id = body.get("conferenceId")
        headers = {"Origin": origin, "Authorization": f"Bearer {psat}"}
        apps_url = link(body, "anonApplications", discover)
        body = call(
            client,
            "POST",
            apps_url,
            "anon_applications",
            headers,
            {"anonymousDisplayName": name, "culture": "en-us", "userAgent": "locust-peer/1"},
        )
        self_url = link(body, "self", apps_url)
        events_url = link(body, "events", apps_url)
        invite_url = link(body["_embedded"]["communication"], "joinOnlineMeeting", apps_url)
        call(
            client,
            "POST",
            invite_url,
            "invitations",
            headers,
            {
                "anonymousDisplayName": name,
                "importance": "Normal",
                "onlineMeetingUri": conference_id,
                "operationId": asi[:32],
                "subject": "benchmark",
            },
        )
        completed = False
        while not completed:
            body = call(client, "GET", events_url, "events", headers)
            events_url = urljoin(events_url, body["_links"]["next"]["href"])
            for sender in body.get("sender", ()):
                for event in sender.get("events", ()):
                    if event["link"]["rel"] == "onlineMeetingInvitation" and event["type"] == "completed":
                        if event.get("status") != "Success":
                            raise ChainError(f"invitation completed with {event.get('status')}")
                        completed = True
        latencies.append(time.perf_counter() - t)
        # Like the other clients: the next poll goes out at once, then the guest leaves.
        parked = gevent.spawn(call, client, "GET", events_url, "events", headers)
        gevent.sleep(0)
        call(client, "DELETE", self_url, "delete_application", headers)
        parked.join(timeout=POLL_RELEASE_S)  # the DELETE releases the parked poll (404)
        if not parked.ready():
            parked.kill(block=False)

    def join_task(user: Any) -> None:
        i = next(numbers)
        if i >= guests:
            raise StopUser()
        try:
            join_one(user.client, i)
        except Exception as exc:
            errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
        if next(done) >= guests:
            finished.set()

    # Built with type() rather than a class statement: the type check passes whether or not Locust (and
    # its type information) is installed.
    join_user: Any = type(
        "JoinUser",
        (FastHttpUser,),
        {
            "host": base,
            "wait_time": constant(0),
            "insecure": False,
            "ssl_context_factory": staticmethod(ssl_context),
            "tasks": [join_task],
        },
    )

    env = Environment(user_classes=[join_user], events=events)
    # Shared by all users, once, before the measured section: the AAD token and the discovery chain.
    setup_user = join_user(env)
    c = setup_user.client
    config = call(c, "GET", f"{info['authority']}/v2.0/.well-known/openid-configuration", "aad_openid", {})
    form = {
        "grant_type": "client_credentials",
        "client_id": info["client_id"],
        "client_secret": info["client_secret"],
        "scope": info["scope"],
    }
    resp = c.request("POST", config["token_endpoint"], name="aad_token", data=form)
    state["aad"] = f"Bearer {json.loads(resp.content)['access_token']}"
    auth = {"Authorization": state["aad"]}
    body = call(c, "GET", info["discover_url"], "discover", auth)
    apps = link(body, "applications", info["discover_url"])
    apps_q = f"{apps}{'&' if '?' in apps else '?'}endpointId={info['endpoint_id']}"
    body = call(c, "GET", apps_q, "applications", auth)
    app_url = link(body, "application", apps_q)
    body = call(c, "GET", app_url, "capabilities", auth)
    state["tokens_url"] = link(body, "anonApplicationTokens", app_url)
    for w in range(int(spec.get("warmup", 1))):
        join_one(c, -1 - w)
    latencies.clear()

    emit("armed")
    wait_for("go")
    rss_base = self_rss_bytes()
    runner = env.create_local_runner()
    profiler = cProfile.Profile() if spec.get("profile") else None
    cpu0, t0 = _cpu(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    runner.start(concurrency, spawn_rate=max(concurrency * 100, 1000))
    finished.wait(timeout=float(spec.get("timeout_s", 600)))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    runner.quit()
    latencies.sort()
    return {
        "client": "locust",
        "guests": guests,
        "concurrency": concurrency,
        "joined": len(latencies),
        "failed": guests - len(latencies),
        "errors": dict(errors.most_common(10)),
        "wall_s": wall,
        "cpu_s": cpu,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": (latencies[-1] if latencies else float("nan")) * 1000,
        },
        "rss_base": rss_base,
    }
