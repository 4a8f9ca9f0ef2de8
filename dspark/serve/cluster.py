"""Many replicas of the server on Ray Serve (``pip install dspark[cluster]``): ``dspark serve BUNDLE --replicas N``.

Each replica is a Ray Serve deployment replica that owns one ``Generator`` and one engine thread and answers
HTTP through the very app ``create_app`` builds (``@serve.ingress`` with the app built at replica start), so
requests are handled by one code path in both modes. Ray's proxy routes each request to the replica with the
shortest queue; autoscaling follows ongoing requests per replica.

In front of Ray's proxy, the ``dspark serve`` process runs a small gateway on the public port, the same
uvicorn server as the single-process mode. It exists for what Ray's proxy cannot do for an OpenAI client: when
a replica dies under a request, Ray's proxy answers a plain-text 500 or cuts the stream. The gateway retries
once when nothing has reached the client yet and otherwise ends the response as the single-process server
would on a failure (a JSON error, or an error event and ``[DONE]``). It also drives the graceful shutdown.

Replicas push their Prometheus exposition to a small actor (``MetricsHub``) every second; ``/metrics`` on any
replica answers with every live replica's series, each with a ``replica`` label. The hub doubles as the
channel that tells every replica to stop its engine when the shutdown timeout has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray import serve

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.generate import Generator
from dspark.serve.app import _json, _sse, create_app, default_request_bytes, make_server, request_too_large, run_server
from dspark.serve.protocol import APIError

log = logging.getLogger("dspark.serve")

APP_NAME = "dspark"
HUB_NAMESPACE = "dspark"
PUSH_INTERVAL_S = 1.0  # how often a replica pushes its metrics (and learns whether to stop its engine)
STALE_S = 15.0  # a replica silent this long is gone (killed): its series leave the scrape
RETRY_DELAY_S = 0.5  # before the one retry of a request whose replica failed: Ray marks the replica dead meanwhile
HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade",
              "proxy-connection", "date", "server"}
REPLICA_FAILED = "the replica serving the request failed"


@dataclass
class ClusterOptions:
    """How many replicas and where: a fixed count, or autoscaling between min and max replicas."""

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    address: str | None = None  # an existing Ray cluster; None starts a local one
    num_cpus: int | None = None  # CPUs of a local Ray instance (None: all)

    def check(self) -> None:
        autoscale = self.min_replicas is not None or self.max_replicas is not None
        if autoscale and self.replicas is not None:
            raise DsparkError("give --replicas N or --min-replicas/--max-replicas, not both")
        if autoscale and (self.min_replicas is None or self.max_replicas is None):
            raise DsparkError("autoscaling needs both --min-replicas and --max-replicas")
        if autoscale and not (0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1):
            raise DsparkError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                              f"{self.min_replicas} and {self.max_replicas}")
        if not autoscale and (self.replicas is None or self.replicas < 1):
            raise DsparkError(f"--replicas must be at least 1, got {self.replicas}")
        if self.target_ongoing_requests <= 0:
            raise DsparkError(f"--target-ongoing-requests must be positive, got {self.target_ongoing_requests}")

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.replicas is None else self.replicas

    def scaling(self) -> dict:
        if self.replicas is not None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                       "initial_replicas": max(1, self.min_replicas),
                                       "target_ongoing_requests": self.target_ongoing_requests}}


# ----------------------------------------------------------------------------------------------- metrics
@ray.remote(num_cpus=0)
class MetricsHub:
    """The latest exposition of every replica, and the flag that tells replicas to stop their engines."""

    def __init__(self):
        self.latest: dict[str, tuple[str, float]] = {}
        self.stopping = False

    def push(self, replica: str, text: str) -> bool:
        self.latest[replica] = (text, time.monotonic())  # the hub's clock: replicas on other nodes may drift
        return self.stopping

    def drop(self, replica: str) -> None:
        self.latest.pop(replica, None)

    def collect(self) -> dict[str, str]:
        now = time.monotonic()
        self.latest = {r: (t, at) for r, (t, at) in self.latest.items() if now - at < STALE_S}
        return {r: t for r, (t, _) in self.latest.items()}

    def stop_engines(self) -> None:
        self.stopping = True


def hub_name(app_name: str) -> str:
    return f"{app_name}-metrics"


def merge_expositions(texts: dict[str, str]) -> bytes:
    """One exposition with every replica's samples, each labelled ``replica``; families keep their help and type."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.samples.append(Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected(list(families.values())))
    return generate_latest(registry)


class Collected:
    """Metric families already gathered, as a collector a registry can hold."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


# ----------------------------------------------------------------------------------------------- replica
@serve.deployment
@serve.ingress()
class Replica:
    """One engine behind the app of ``create_app``; Ray Serve calls ``check_health`` every few seconds."""

    def __init__(self, bundle_dir: str, generator_options: dict, app_options: dict):
        self.generator = Generator(bundle_dir, **generator_options)
        context = serve.get_replica_context()
        self.app_options, self.hub_name = app_options, hub_name(context.app_name)
        self.replica = context.replica_id.unique_id
        self.stopping = False

    async def __serve_build_asgi_app__(self):
        self.asgi = create_app(self.generator, **self.app_options)
        self.engine, self.metrics = self.asgi.state.engine, self.asgi.state.metrics
        self.asgi.state.exposition = self.exposition
        # the driver made the hub; under KubeRay (no driver of ours) the first replica makes it
        self.hub = MetricsHub.options(name=self.hub_name, namespace=HUB_NAMESPACE, get_if_exists=True,
                                      lifetime="detached").remote()
        self.pusher = asyncio.get_running_loop().create_task(self.push_forever())
        return self.asgi

    async def push(self) -> None:
        if await self.hub.push.remote(self.replica, self.metrics.exposition().decode()) and not self.stopping:
            log.warning("replica %s: the server is shutting down; cancelling %d in-flight request(s)", self.replica,
                        self.engine.in_flight())
            self.stopping = True
            await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    async def push_forever(self) -> None:
        while True:
            try:
                await self.push()
            except Exception as e:  # the hub is gone for a moment: metrics must never take a replica down
                log.warning("replica %s: pushing metrics failed: %s", self.replica, e)
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def exposition(self) -> bytes:
        """Every live replica's metrics (this one's fresh), or this one's alone when the hub cannot answer."""
        try:
            await self.push()
            texts = await self.hub.collect.remote()
        except Exception as e:
            log.warning("replica %s: the metrics hub did not answer: %s", self.replica, e)
            texts = {}
        texts[self.replica] = self.metrics.exposition().decode()
        return merge_expositions(texts)

    def check_health(self) -> None:
        """Unhealthy once the engine thread has died (Ray Serve then replaces this replica)."""
        if not self.engine.alive and not self.stopping:
            raise RuntimeError(f"the engine thread has stopped: {self.engine.error!r}")

    def __del__(self):
        pusher = getattr(self, "pusher", None)
        if pusher is not None:
            pusher.cancel()
            self.hub.drop.remote(self.replica)


# ----------------------------------------------------------------------------------------------- gateway
class Gateway:
    """The public ASGI app: each request goes to Ray's proxy; a replica failure becomes a retry or an OpenAI error."""

    def __init__(self, upstream: str, max_request_bytes: int, hub):
        self.upstream, self.max_request_bytes, self.hub = upstream, max_request_bytes, hub
        self.client: httpx.AsyncClient | None = None
        self.active = self.retried = 0
        self.stopping = False
        # what make_server's graceful shutdown calls when the grace period has passed ("stop the engine")
        self.state = SimpleNamespace(engine=SimpleNamespace(stop=self.stop_engines, in_flight=lambda: self.active))

    def stop_engines(self) -> None:
        """Every replica cancels what it still runs (each handler ends its response) within a push interval."""
        self.stopping = True  # from now on a 503 is the answer, not a reason to retry
        ray.get(self.hub.stop_engines.remote())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        self.active += 1
        try:
            try:
                body = await self.read_body(scope, receive)
            except ClientGone:
                return
            if body is None:
                return await self.send_error(send, request_too_large(self.max_request_bytes))
            forward = asyncio.create_task(self.forward(scope, body, send))
            gone = asyncio.create_task(self.wait_disconnect(receive))
            await asyncio.wait({forward, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not forward.done():  # the client went away: closing the upstream stream cancels the replica's request
                forward.cancel()
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forward
        finally:
            self.active -= 1

    async def lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(None, connect=10.0),
                                                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body (a retry must resend it), or None past the bound the replicas enforce too."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            body += message.get("body", b"")
            if len(body) > self.max_request_bytes:
                return None
            if not message.get("more_body", False):
                return bytes(body)

    @staticmethod
    async def wait_disconnect(receive):
        while (await receive())["type"] != "http.disconnect":
            pass

    async def forward(self, scope, body: bytes, send) -> None:
        path = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope["query_string"] else "")
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
        for attempt in (1, 2):
            started = sse = False
            try:
                request = self.client.build_request(scope["method"], path, headers=headers, content=body)
                response = await self.client.send(request, stream=True)
                try:
                    if await replica_failed(response, app_errors=attempt == 1 and not self.stopping):
                        detail = (await response.aread()).decode("utf-8", "replace")[:200]
                        raise UpstreamFailed(response.status_code, detail, response.headers.get("retry-after"))
                    sse = response.headers.get("content-type", "").startswith("text/event-stream")
                    out = [(k.lower(), v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
                    # the status goes out with the first bytes: until then a failure can still be retried
                    async for chunk in body_of(response):
                        if not started:
                            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
                            started = True
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if not started:
                        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
                    await send({"type": "http.response.body", "body": b""})
                    return
                finally:
                    await response.aclose()
            except (httpx.TransportError, UpstreamFailed) as e:
                if started:
                    log.warning("%s %s: the replica failed mid-response: %s", scope["method"], scope["path"], e)
                    if sse:  # as the app ends a stream on an engine failure: an error event, then [DONE]
                        error = APIError(500, f"{REPLICA_FAILED} mid-stream; the output is incomplete", type="server_error")
                        tail = (_sse(error.body()) + _sse("[DONE]")).encode()
                        await send({"type": "http.response.body", "body": tail, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                    return
                if attempt == 1 and not self.stopping:
                    self.retried += 1
                    log.warning("%s %s: retrying once on another replica: %s", scope["method"], scope["path"], e)
                    if not (isinstance(e, UpstreamFailed) and e.status == 429):
                        await asyncio.sleep(RETRY_DELAY_S)
                    continue
                busy = isinstance(e, UpstreamFailed) and e.status == 429
                message = f"the deployment is at capacity ({e})" if busy else f"{REPLICA_FAILED} ({e})"
                error = APIError(429 if busy else 503, f"{message}; retry later",
                                 type="rate_limit_error" if busy else "server_error",
                                 code="server_busy" if busy else "unavailable",
                                 headers={"Retry-After": getattr(e, "retry_after", None) or "1"})
                return await self.send_error(send, error)

    @staticmethod
    async def send_error(send, error: APIError) -> None:
        body = _json(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class UpstreamFailed(Exception):
    def __init__(self, status: int, detail: str, retry_after: str | None):
        super().__init__(f"HTTP {status} from Ray Serve: {detail.strip()}")
        self.status, self.retry_after = status, retry_after


async def body_of(response: httpx.Response):
    """The raw body as it arrives, or all of it when ``replica_failed`` has already read it."""
    if response.is_stream_consumed:
        yield response.content
        return
    async for chunk in response.aiter_raw():
        yield chunk


async def replica_failed(response: httpx.Response, app_errors: bool) -> bool:
    """A failure another replica may not have: Ray's own answers (every error of the app is OpenAI's JSON, so
    plain text at 429 or 5xx is a dead replica, back-pressure or no replica yet), and with ``app_errors`` the
    app's 503 from a replica whose engine has stopped or its 429 from a full replica (Ray's router balances on
    queue lengths it caches, so another replica may have room). Without it the app's errors go out as they are."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return response.status_code == 429 or response.status_code >= 500
    if not app_errors or response.status_code not in (429, 503):
        return False
    await response.aread()  # a short JSON error
    return response.json().get("error", {}).get("code") in ("unavailable", "server_busy")


# ----------------------------------------------------------------------------------------------- driver
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_resources(threads: int, most_replicas: int) -> tuple[dict, int]:
    """Ray actor options and ONNX Runtime threads per replica: one GPU each where the cluster has GPUs, else
    ``threads`` CPU slots (0: the cluster's CPUs shared out among the most replicas there can be)."""
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": max(1, threads)}, threads
    cpus = threads or max(1, int(resources.get("CPU", 1)) // most_replicas)
    return {"num_cpus": cpus}, cpus


def application(bundle_dir: str | Path, cluster: ClusterOptions, *, model_name: str | None = None,
                api_key: str | None = None, max_batch: int | None = None, max_queue: int = 64, scheduler: str = "auto",
                threshold: float = 0.5, num_draft_tokens: int | None = None, use_draft: bool = True,
          block_schedule: dict[int, int] | str | None = "auto", lookup: int = 0, threads: int = 0,
                chat_template: str | None = None, shutdown_timeout: float = 30.0, max_request_bytes: int | None = None,
                backend: str = "ort", device: str = "cpu"):
    """The Ray Serve application of ``cluster``'s replicas of ``bundle_dir`` (Ray must be initialized), and the
    request body bound its replicas enforce."""
    bundle = Bundle.open(bundle_dir, verify=False)  # each replica verifies the files when it opens the bundle
    actor_options, threads = replica_resources(threads, cluster.most_replicas)
    rows = min(max_batch or bundle.limits.max_batch, bundle.limits.max_batch)
    max_request_bytes = max_request_bytes or default_request_bytes(bundle.limits.max_context)
    deployment = Replica.options(
        name="Replica", ray_actor_options=actor_options,
        # above the engine's own capacity, so a full replica answers its own 429 (with Retry-After) instead of
        # requests piling up unseen in Ray's router
        max_ongoing_requests=2 * (rows + max_queue),
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=shutdown_timeout + 5.0, **cluster.scaling())
    generator_options = dict(threads=threads, use_draft=use_draft, num_draft_tokens=num_draft_tokens,
                             scheduler=scheduler, threshold=threshold, block_schedule=block_schedule,
                             lookup=lookup, max_batch=max_batch, backend=backend, device=device)
    app_options = dict(model_name=model_name or Path(bundle_dir).name, api_key=api_key, max_queue=max_queue,
                       chat_template=chat_template, max_request_bytes=max_request_bytes)
    return deployment.bind(str(Path(bundle_dir).resolve()), generator_options, app_options), max_request_bytes


def build_app(args: dict):
    """Ray Serve's application builder, for ``serve run``/``serve deploy`` configs and KubeRay's RayService:
    ``import_path: dspark.serve.cluster:build_app`` with ``args`` holding ``bundle`` and any keyword of
    ``application`` or ``ClusterOptions`` (``replicas``, ``min_replicas``, ``max_replicas``, ...)."""
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("args must name the bundle folder: {bundle: /path/to/bundle}")
    bundle = args.pop("bundle")
    autoscale = "min_replicas" in args or "max_replicas" in args
    cluster = ClusterOptions(replicas=args.pop("replicas", None if autoscale else 1),
                             **{k: args.pop(k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
                                if k in args})
    cluster.check()
    return application(bundle, cluster, **args)[0]


def connect(cluster: ClusterOptions) -> None:
    """Join the cluster at ``cluster.address``, or start a Ray instance of our own ("local": even where another
    one runs on this machine). An address nobody answers at is refused at once: Ray itself would retry for
    minutes."""
    address = cluster.address
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit() and "://" not in address:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise DsparkError(f"no Ray cluster answers at --address {address} ({e.strerror or e}); start one there "
                              "with 'ray start --head' or fix the address") from None
    try:
        ray.init(address=address or "local", num_cpus=None if address else cluster.num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    except ConnectionError as e:
        raise DsparkError(f"cannot join the Ray cluster at --address {address}: {e}") from None


class ClusterServer:
    """A deployment of ``Replica`` on Ray Serve plus the gateway's uvicorn server (not yet running)."""

    def __init__(self, bundle_dir: str | Path, cluster: ClusterOptions, host: str = "127.0.0.1", port: int = 8000, *,
                 shutdown_timeout: float = 30.0, keep_alive_timeout: float = 5.0, log_level: str = "info",
                 app_name: str = APP_NAME, **options):
        cluster.check()
        Bundle.open(bundle_dir, verify=False)  # bad input is refused before Ray starts
        self.app_name, self.started_ray = app_name, False
        if not ray.is_initialized():
            connect(cluster)
            self.started_ray = True
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
            http = serve.context._get_global_client().http_config  # a cluster already serving keeps its own
            # the default application owns "/"; another one (a second deployment on the same cluster) its own prefix
            prefix = "/" if app_name == APP_NAME else f"/{app_name}"
            upstream = f"http://{'127.0.0.1' if http.host in ('0.0.0.0', '::', '') else http.host}:{http.port}{prefix.rstrip('/')}"
            with contextlib.suppress(ValueError):  # a hub left by an earlier run may still say "stop"
                ray.kill(ray.get_actor(hub_name(app_name), namespace=HUB_NAMESPACE))
            self.hub = MetricsHub.options(name=hub_name(app_name), namespace=HUB_NAMESPACE, lifetime="detached").remote()
            app, max_request_bytes = application(bundle_dir, cluster, shutdown_timeout=shutdown_timeout, **options)
            serve.run(app, name=app_name, route_prefix=prefix)
            self.gateway = Gateway(upstream, max_request_bytes, self.hub)
            self.server = make_server(self.gateway, host, port, shutdown_timeout, keep_alive_timeout, log_level)
        except BaseException:
            self.close()
            raise

    def replica_states(self) -> dict[str, int]:
        app = serve.status().applications.get(self.app_name)
        return dict(app.deployments["Replica"].replica_states) if app else {}

    def close(self) -> None:
        """Take the deployment down (Ray drains each replica), the hub, and the Ray instance this started."""
        with contextlib.suppress(Exception):
            serve.delete(self.app_name)
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(hub_name(self.app_name), namespace=HUB_NAMESPACE))
        if self.started_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def serve_cluster(bundle_dir: str | Path, cluster: ClusterOptions, host: str = "127.0.0.1", port: int = 8000,
                  **options) -> None:
    """Deploy ``cluster``'s replicas of ``bundle_dir`` and serve them on ``host:port`` until SIGTERM/SIGINT."""
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # replica logs go to Ray's log files, not our terminal
    cluster_server = ClusterServer(bundle_dir, cluster, host, port, **options)
    try:
        run_server(cluster_server.server)
    finally:
        cluster_server.close()
    log.info("dspark serve: shut down")


@contextlib.contextmanager
def cluster_thread(bundle_dir, cluster: ClusterOptions, **options):
    """A ``ClusterServer`` on a free loopback port, its gateway in a daemon thread (tests, benchmarks): yields
    (cluster server, url); stops the gateway and takes the deployment down at exit."""
    cs = ClusterServer(bundle_dir, cluster, "127.0.0.1", free_port(), **options)
    thread = threading.Thread(target=cs.server.run, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while not cs.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        yield cs, f"http://127.0.0.1:{cs.server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        cs.server.should_exit = True
        thread.join(30)
        cs.close()
