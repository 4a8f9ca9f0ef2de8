"""``dspark serve --replicas``: two replicas of a tiny bundle on a local Ray instance, behind the gateway.

One Ray instance and one two-replica deployment for the module (4 logical CPU slots, one ONNX Runtime thread
per replica), taken down at the end with ``serve.shutdown()`` and ``ray.shutdown()``. Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="the 'cluster' extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve", reason="the 'cluster' extra (ray[serve]) is not installed")
httpx = pytest.importorskip("httpx")
from conftest import check_sixteen_concurrent_greedy, cli_server, sse_events  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dspark.runtime.generate import Generator, Request  # noqa: E402
from dspark.serve.cluster import ClusterOptions, cluster_thread  # noqa: E402

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(qwen3_bundle):
    # a Ray instance of this test's own ("local"), 4 CPU slots on the 2 cores: two replicas of one thread each
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    try:
        with cluster_thread(qwen3_bundle, ClusterOptions(replicas=2), threads=1, max_batch=4, max_queue=16,
                            api_key=KEY, shutdown_timeout=5.0, log_level="warning") as (cs, url):
            yield cs, url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(base_url=cluster[1], headers=AUTH, timeout=60) as c:
        yield c


def replica_counts(client) -> dict[str, float]:
    """Finished requests per replica label, from one scrape of /metrics."""
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    counts: dict[str, float] = {}
    for s in families["vllm:request_success"].samples:
        if s.name.endswith("_total"):
            counts[s.labels["replica"]] = counts.get(s.labels["replica"], 0) + s.value
    return counts


def test_sixteen_concurrent_greedy_requests_on_two_replicas(client, qwen3_bundle):
    check_sixteen_concurrent_greedy(client, qwen3_bundle)
    # one scrape sees both replicas, each of which finished requests (another replica's series are at most a
    # push interval old)
    deadline = time.monotonic() + 10
    while sum((counts := replica_counts(client)).values()) < 16:
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)
    assert len(counts) == 2 and all(v > 0 for v in counts.values()), counts


def test_errors_are_the_single_servers(client):
    r = client.post("/v1/completions", json={"prompt": "w1", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(client.base_url.join("/v1/completions"), json={"prompt": "w1"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post("/v1/completions", content=b"x" * (1 << 21), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0]["id"] == "qwen3"


def test_overload_gives_429_with_retry_after(client):
    # 2 replicas x (4 rows + 16 waiting) = 40 places; 64 long requests at once overflow them
    body = {"prompt": "w1 w2", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/completions", json=body), range(64)))
    busy = [r for r in responses if r.status_code == 429]
    assert busy, [r.status_code for r in responses]
    assert all(r.status_code in (200, 429) for r in responses), [r.text for r in responses if r.status_code not in (200, 429)]
    assert busy[0].headers["retry-after"] == "1" and busy[0].json()["error"]["code"] == "server_busy"
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # greedy: every completed request has the same text


def replica_actor_names():
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::dspark#Replica"))


def test_killing_a_replica_under_load_loses_no_request_and_it_is_replaced(cluster, client, qwen3_bundle):
    cs, _ = cluster
    plain = Generator(qwen3_bundle, threads=1, use_draft=False)
    ref = plain.generate([Request(plain.tokenizer.encode("w3 w4"), 240, ignore_eos=True)])[0].text
    body = {"prompt": "w3 w4", "max_tokens": 240, "temperature": 0, "ignore_eos": True}

    def one(i):
        """'ok' (the full greedy text) or 'error ...' (a clean OpenAI error: the surviving replica may also be
        full, a 429); anything else (a cut connection, a stream without [DONE], a wrong text) fails the test."""
        if i % 2:
            with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                if r.status_code != 200:
                    assert r.status_code in (429, 500, 503) and "error" in json.loads(r.read()), r.read()
                    return f"error {r.status_code}"
                chunks, done = sse_events(r.iter_lines())
            assert done, "a stream ended without [DONE]"
            if "error" in chunks[-1]:
                return "error mid-stream"
            assert "".join(c["choices"][0]["text"] for c in chunks) == ref
            return "ok"
        r = client.post("/v1/completions", json=body)
        if r.status_code != 200:
            assert r.status_code in (429, 500, 503) and "error" in r.json(), r.text
            return f"error {r.status_code}"
        assert r.json()["choices"][0]["text"] == ref
        return "ok"

    before = replica_actor_names()
    assert len(before) == 2
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        time.sleep(0.3)
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        outcomes = [f.result(timeout=120) for f in futures]
    assert outcomes.count("ok") >= 1, outcomes
    assert cs.gateway.retried >= 1  # the kill did hit requests in flight, and those not started went elsewhere
    wait_for_two_replicas(cs, gone=before[0])  # the controller replaces the dead replica
    r = client.post("/v1/completions", json=dict(body, max_tokens=8))
    assert r.status_code == 200


def test_a_replica_whose_engine_died_answers_an_error_and_is_replaced(cluster, client):
    cs, _ = cluster

    def break_engine(replica_actor):  # defined here so Ray ships it by value to the replica's process
        """Run inside a replica's actor: its next engine step raises, which ends the engine thread."""
        replica = replica_actor._replica_impl._user_callable_wrapper._callable

        def step():
            raise RuntimeError("injected engine failure")

        replica.generator.step = step

    wait_for_two_replicas(cs)
    before = replica_actor_names()
    ray.get(ray.get_actor(before[0], namespace="serve").__ray_call__.remote(break_engine), timeout=30)
    # requests go to either replica: the broken one answers its one in-flight request with a 500 (the engine's
    # failure), and later ones are retried elsewhere by the gateway (its 503s say "unavailable")
    deadline, statuses = time.monotonic() + 30, set()
    while 500 not in statuses:
        assert time.monotonic() < deadline, statuses
        r = client.post("/v1/completions", json={"prompt": "w5", "max_tokens": 4, "temperature": 0})
        assert r.status_code in (200, 500) and (r.status_code == 200 or "engine failed" in r.json()["error"]["message"]), r.text
        statuses.add(r.status_code)
    # check_health reports it, and Ray Serve replaces it
    wait_for_two_replicas(cs, gone=before[0])
    assert client.post("/v1/completions", json={"prompt": "w5", "max_tokens": 4}).status_code == 200


def wait_for_two_replicas(cs, gone: str | None = None):
    deadline = time.monotonic() + 90
    while (cs.replica_states().get("RUNNING", 0) != 2 or len(now := replica_actor_names()) != 2 or gone in now):
        assert time.monotonic() < deadline, cs.replica_states()
        time.sleep(0.5)


def test_cli_replicas_drain_in_flight_streams_on_sigterm(qwen3_bundle):
    """`dspark serve --replicas 1` on a Ray instance of its own: SIGTERM lets a running stream finish, exit 0."""
    with cli_server(qwen3_bundle, "--replicas", "1", "--num-cpus", "2", "--threads", "1", "--shutdown-timeout", "20",
                    "--log-level", "warning") as (proc, url):
        body = {"prompt": "w7 w8", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            chunks, done = sse_events(lines)
        assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0


QUEUED = 48


def test_past_the_shutdown_timeout_every_replica_ends_its_responses(cluster, qwen3_bundle):
    """A second deployment (one replica, one row, so requests queue): the gateway's shutdown gives in-flight
    requests 0.1 s, then every replica's engine cancels the rest, and each response still ends cleanly."""
    body = {"prompt": "w9 w10", "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with cluster_thread(qwen3_bundle, ClusterOptions(replicas=1), threads=1, max_batch=1, max_queue=QUEUED,
                        shutdown_timeout=0.1, app_name="drain", log_level="warning") as (cs, url):
        with httpx.Client(base_url=url, timeout=60) as c:
            def one(i):
                if i % 2:
                    r = c.post("/v1/completions", json=body)
                    if r.status_code == 503:
                        assert r.json()["error"]["code"] == "unavailable", r.text
                        return "cancelled"
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]["finish_reason"]
                with c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
                    assert r.status_code == 200, r.read()
                    chunks, done = sse_events(r.iter_lines())
                assert done, "a stream ended without [DONE]"
                if "error" in chunks[-1]:
                    assert chunks[-1]["error"]["code"] == "unavailable"
                    assert chunks[-2]["choices"][0]["finish_reason"] == "cancelled"
                    return "cancelled"
                return chunks[-1]["choices"][0]["finish_reason"]

            # the replicas learn of the stop at their next metrics push (up to PUSH_INTERVAL_S after the grace), so
            # the queue must outlast that too: 16 requests of 240 tokens on one row did not always (a quiet machine
            # decoded all 3,840 tokens of the tiny test bundle in time)
            with ThreadPoolExecutor(QUEUED) as pool:
                futures = [pool.submit(one, i) for i in range(QUEUED)]
                deadline = time.monotonic() + 30
                while cs.gateway.active < QUEUED:  # all in flight
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                cs.server.should_exit = True
                outcomes = [f.result(timeout=60) for f in futures]
    assert set(outcomes) <= {"length", "cancelled"} and "cancelled" in outcomes, outcomes


def test_cli_without_ray_says_what_to_install(qwen3_bundle):
    hide_ray = "import sys; sys.modules['ray'] = None; from dspark.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", hide_ray, "serve", str(qwen3_bundle), "--replicas", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --replicas needs the 'cluster' extra (ray is missing): pip install 'dspark[cluster]'"]


@pytest.mark.parametrize("options,message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--min-replicas", "1"], "autoscaling needs both --min-replicas and --max-replicas"),
    (["--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"], "not both"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas <= --max-replicas"),
    (["--replicas", "1", "--address", "127.0.0.1:1"], "no Ray cluster answers at --address 127.0.0.1:1"),
    (["--num-cpus", "2"], "apply to replicas"),
    (["--replicas", "2", "--target-ongoing-requests", "3"], "steers autoscaling"),
])
def test_cli_refuses_bad_replica_options(qwen3_bundle, options, message):
    result = subprocess.run([sys.executable, "-m", "dspark.cli", "serve", str(qwen3_bundle), *options],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_kuberay_config_deploys_behind_rays_own_proxy(cluster, qwen3_bundle):
    """examples/rayservice.yaml's application (import_path build_app, its args), deployed beside the other one."""
    import yaml

    from dspark.serve.cluster import HUB_NAMESPACE, build_app, hub_name

    with pytest.raises(ValueError, match="bundle"):
        build_app({"replicas": 1})
    config = yaml.safe_load(yaml.safe_load(open("examples/rayservice.yaml"))["spec"]["serveConfigV2"])["applications"][0]
    assert config["import_path"] == "dspark.serve.cluster:build_app"
    args = dict(config["args"], bundle=str(qwen3_bundle), min_replicas=1, max_replicas=1, threads=1)
    serve.run(build_app(args), name="kuberay", route_prefix="/kuberay")
    try:
        http = serve.context._get_global_client().http_config
        with httpx.Client(base_url=f"http://127.0.0.1:{http.port}/kuberay", timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == "qwen3", r.text
            assert 'replica="' in c.get("/metrics").text  # the replica made its own hub
    finally:
        serve.delete("kuberay")
        ray.kill(ray.get_actor(hub_name("kuberay"), namespace=HUB_NAMESPACE))
