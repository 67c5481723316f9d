"""One settings object per process (env prefix SERVO_), built in main() and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servo import __version__

if TYPE_CHECKING:  # the serving stack (gRPC, ONNX Runtime) is imported by serving_config()
    from serving.server import ServingConfig


#: where Kubernetes mounts the pod's namespace
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_namespace() -> str:
    """The namespace of the pod this runs in (its service account's file), else "default"."""
    try:
        found = NAMESPACE_FILE.read_text().strip()
    except OSError:
        return "default"
    return found or "default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVO_", extra="forbid")

    host: str = Field("127.0.0.1", description="address both servers listen on")
    http_port: int = Field(8080, ge=0, le=65535, description="REST port (0: any free port)")
    grpc_port: int = Field(8081, ge=0, le=65535, description="gRPC port (0: any free port)")
    grpc_enabled: bool = True
    max_request_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="larger requests get 413 / RESOURCE_EXHAUSTED"
    )
    offloop_decode_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="REST bodies larger than this are decoded in a worker process, off the "
        "event loop (0: all on the loop)",
    )
    offloop_decode_workers: int = Field(
        1, ge=1, description="worker processes decoding big bodies (started on the first)"
    )
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime threads per session")
    inline_max_us: float = Field(
        300.0, ge=0, description="models whose warm-up call is slower run on worker threads"
    )
    executor_threads: int = Field(4, ge=1)
    shadow_max_pending: int = Field(64, ge=1, description="more pending shadow copies are dropped")
    shadow_timeout_s: float = Field(
        5.0, gt=0, description="a slower shadow copy counts as an error"
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="wait for in-flight work before unloading"
    )
    remote_timeout_s: float = Field(
        10.0, gt=0, description="a remote version's (route url) answer waited for at most"
    )
    remote_failures: int = Field(
        5, ge=1, description="consecutive remote failures that open its circuit breaker"
    )
    remote_cooldown_s: float = Field(
        5.0, gt=0, description="an open circuit fails fast this long, then one request probes"
    )
    remote_metadata_timeout_s: float = Field(
        10.0, gt=0, description="a remote version's metadata is tried again this long at load"
    )
    remote_batches_in_flight: int = Field(
        4, ge=1, description="merged requests (batching at the edge) sent to a remote at once"
    )
    batching: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: batch the models that run off the event loop"
    )
    batch_max_rows: int = Field(32, ge=1, description="rows merged into one ONNX Runtime call")
    batch_max_delay_us: float = Field(500.0, ge=0, description="longest wait for more rows")
    payload_log_dir: Path | None = Field(
        None, description="folder of the payload and feedback logs (Parquet); unset: off"
    )
    payload_log_sample: float = Field(1.0, ge=0, le=1, description="share of requests logged")
    payload_log_capacity: int = Field(10_000, ge=1, description="queued records before drops")
    payload_log_flush_s: float = Field(2.0, gt=0, description="longest time between writes")
    feedback_index_size: int = Field(100_000, ge=1, description="recent predictions by id")
    http_server: Literal["native", "uvicorn"] = Field(
        "native", description="the REST server: Servo's own HTTP/1.1 server, or uvicorn"
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="complete request headers must arrive within this time"
    )
    http_min_body_rate: float = Field(
        1024.0, ge=0, description="bytes/s a request body must keep up (0: no minimum)"
    )
    http_body_rate_window_s: float = Field(
        5.0, gt=0, description="the window the minimum body rate is measured over"
    )
    max_connections: int = Field(
        0, ge=0, description="open REST connections at most, 503 past it (0: RLIMIT_NOFILE/2)"
    )
    http_max_line_bytes: int = Field(
        16 * 1024, ge=256, description="longest request line or header line (414 / 431)"
    )
    http_max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="longest request head in all (431)"
    )
    http_keepalive_s: float = Field(65.0, gt=0, description="idle keep-alive connections close")
    http_stall_timeout_s: float = Field(
        30.0, gt=0, description="a body or an unread answer making no progress this long closes"
    )
    http_linger_s: float = Field(
        5.0, ge=0, description="after an error and close, read and drop the rest this long"
    )
    http_linger_bytes: int = Field(
        128 * 1024 * 1024, ge=0, description="the most bytes read and dropped in a lingering close"
    )
    http_trim_after_bytes: int = Field(
        4 * 1024 * 1024, ge=0, description="trim the heap after bodies this large (0: never)"
    )
    grpc_server: Literal["threaded", "aio"] = Field(
        "threaded", description="grpcio's threaded server (faster) or its asyncio server"
    )
    grpc_workers: int = Field(
        128, ge=1, description="gRPC worker threads: the most gRPC calls in flight"
    )
    monitor_every_s: float = Field(
        60.0, ge=0, description="embedded monitors: seconds between reports (0: off)"
    )
    monitor_window_s: float = Field(900.0, gt=0, description="embedded monitors' window")
    monitor_detector: Literal["ucb", "ddm", "adwin", "none"] = "ucb"
    metrics: bool = Field(True, description="record metrics (off only to measure their cost)")
    routes_poll_s: float = Field(0.5, gt=0, description="how often a routes file is checked")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line (servo up's decisions too)"
    )
    admin_port: int = Field(
        8082, ge=0, le=65535, description="servo up's admin API port on 127.0.0.1 (0: any free)"
    )
    console_https: bool = Field(
        False,
        description="the ops console (/console on the admin port) is reached over https (a "
        "TLS proxy in front): its session cookie says Secure",
    )
    prometheus_url: str | None = Field(
        None, description="servo up's monitors read this Prometheus (unset: embedded)"
    )
    policy_file: Path | None = Field(
        None, description="servo up's loop policy (YAML; unset: ./servo.yaml if it exists)"
    )
    registry_url: str = Field(
        "sqlite:///.servo/registry.db", description="SQLAlchemy URL of the model registry"
    )
    deployer: Literal["embedded", "kubernetes"] = Field(
        "embedded",
        description="where servo up runs model versions: in its gateway, or one KServe "
        "InferenceService each (the gateway calls them once Ready)",
    )
    k8s_namespace: str = Field(
        default_factory=pod_namespace,
        description="the namespace of the InferenceServices (default: the pod's, else default)",
    )
    k8s_runtime: str = Field(
        "", description="the ServingRuntime of the InferenceServices (empty: KServe's own)"
    )
    k8s_storage_prefix: str = Field(
        "",
        description="storageUri prefix replacing servo up's data folder in an artifact's "
        "file:// URI (e.g. pvc://servo-data/)",
    )
    k8s_ready_timeout_s: float = Field(
        600.0, gt=0, description="a candidate's InferenceService must be Ready this soon"
    )
    k8s_reconcile_s: float = Field(
        5.0, gt=0, description="how often routed versions and InferenceServices are reconciled"
    )
    k8s_unrouted_grace_s: float = Field(
        60.0, ge=0, description="an InferenceService unrouted this long is deleted"
    )

    steps: Literal["local", "kubernetes"] = Field(
        "local",
        description="where the loop's pipeline steps run: in its training worker, or each "
        "as a Kubernetes Job running the same image (servo step)",
    )
    k8s_job_image: str = Field("", description="the image of the steps' Jobs")
    k8s_job_claim: str = Field(
        "",
        description="the PersistentVolumeClaim holding servo up's data folder, mounted at "
        "the same path in the steps' Jobs",
    )
    k8s_job_service_account: str = Field(
        "", description="the steps' pods' service account (empty: the namespace's default)"
    )
    k8s_job_timeout_s: int = Field(3600, gt=0, description="a step Job's deadline (seconds)")

    @model_validator(mode="after")
    def _steps_as_jobs(self) -> Settings:
        missing = [name for name, value in (("SERVO_K8S_JOB_IMAGE", self.k8s_job_image),
                                            ("SERVO_K8S_JOB_CLAIM", self.k8s_job_claim))
                   if self.steps == "kubernetes" and not value]  # fmt: skip
        if missing:
            raise ValueError(
                f"SERVO_STEPS=kubernetes needs {' and '.join(missing)}: the image the "
                f"steps' Jobs run, and the claim of servo up's data folder (mounted at the "
                f"same path in the Jobs)"
            )
        return self

    def serving_config(self) -> ServingConfig:
        from serving.batcher import BatchingConfig
        from serving.httplimits import HttpLimits
        from serving.payload_log import PayloadLogConfig
        from serving.runtime import RemoteOptions, RuntimeOptions
        from serving.server import ServingConfig

        return ServingConfig(
            host=self.host,
            http_port=self.http_port,
            grpc_port=self.grpc_port,
            grpc_enabled=self.grpc_enabled,
            max_request_bytes=self.max_request_bytes,
            offloop_decode_bytes=self.offloop_decode_bytes,
            offloop_decode_workers=self.offloop_decode_workers,
            runtime=RuntimeOptions(
                intra_op_threads=self.intra_op_threads, inline_max_us=self.inline_max_us
            ),
            executor_threads=self.executor_threads,
            remote=RemoteOptions(
                timeout_s=self.remote_timeout_s,
                failures=self.remote_failures,
                cooldown_s=self.remote_cooldown_s,
                metadata_timeout_s=self.remote_metadata_timeout_s,
                batches_in_flight=self.remote_batches_in_flight,
            ),
            server_version=__version__,
            shadow_max_pending=self.shadow_max_pending,
            shadow_timeout_s=self.shadow_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            recording=self.metrics,
            http_server=self.http_server,
            http_limits=HttpLimits(
                header_timeout_s=self.http_header_timeout_s,
                min_body_rate=self.http_min_body_rate,
                body_rate_window_s=self.http_body_rate_window_s,
                max_connections=self.max_connections,
                max_line_bytes=self.http_max_line_bytes,
                max_header_bytes=self.http_max_header_bytes,
                keepalive_s=self.http_keepalive_s,
                stall_timeout_s=self.http_stall_timeout_s,
                linger_s=self.http_linger_s,
                linger_bytes=self.http_linger_bytes,
                trim_after_bytes=self.http_trim_after_bytes,
            ),
            grpc_server=self.grpc_server,
            grpc_workers=self.grpc_workers,
            payload_log=(
                PayloadLogConfig(
                    root=self.payload_log_dir,
                    sample=self.payload_log_sample,
                    capacity=self.payload_log_capacity,
                    flush_s=self.payload_log_flush_s,
                )
                if self.payload_log_dir is not None
                else None
            ),
            feedback_index_size=self.feedback_index_size,
            batching=BatchingConfig(
                enabled={"auto": None, "on": True, "off": False}[self.batching],
                max_rows=self.batch_max_rows,
                max_delay_us=self.batch_max_delay_us,
            ),
        )
