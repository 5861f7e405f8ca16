"""`keel cluster validate k8s/rayjob.yaml`: a KubeRay RayJob checked offline.

The models below carry the fields and types of KubeRay's `ray.io/v1` RayJob (KubeRay 1.5+, whose
`authOptions` turns on Ray's token authentication). Unknown keys are refused down to the worker groups,
so a typo is caught before `kubectl apply` (Kubernetes would silently drop it under a lenient CRD
setting, or reject it cluster-side). Pod templates are Kubernetes' own PodTemplateSpec: only the parts Keel
relies on (containers with a name and an image) are checked here; `kubectl apply --dry-run=server` checks
the rest against the live CRD.

Keel's own rules on top, as for cluster.yaml: token authentication on, and the head's dashboard / job API
not exposed outside the Kubernetes cluster (serviceType ClusterIP; reach it with `kubectl port-forward`).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.errors import BadInput


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Container(BaseModel):  # core/v1 Container: many more fields, checked by Kubernetes itself
    model_config = ConfigDict(extra="allow")
    name: str
    image: str


class PodSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    containers: list[Container] = Field(min_length=1)


class PodTemplate(BaseModel):
    model_config = ConfigDict(extra="allow")
    metadata: dict = {}
    spec: PodSpec


StartParams = dict[str, str]  # KubeRay's rayStartParams is map[string]string: `num-cpus: 0` must be "0"


class AuthOptions(Strict):
    mode: Literal["disabled", "token"] = "token"
    secretName: Optional[str] = None
    enableK8sTokenAuth: Optional[bool] = None


class AutoscalerOptions(Strict):
    upscalingMode: Optional[Literal["Default", "Aggressive", "Conservative"]] = None
    idleTimeoutSeconds: Optional[int] = None
    version: Optional[Literal["v1", "v2"]] = None
    image: Optional[str] = None
    imagePullPolicy: Optional[str] = None
    resources: Optional[dict] = None
    securityContext: Optional[dict] = None
    env: Optional[list[dict]] = None
    envFrom: Optional[list[dict]] = None
    volumeMounts: Optional[list[dict]] = None


class GroupSpec(Strict):
    """The fields the head group and the worker groups share."""
    template: PodTemplate
    rayStartParams: StartParams = {}
    resources: Optional[dict[str, str]] = None
    labels: Optional[dict[str, str]] = None


class HeadGroupSpec(GroupSpec):
    serviceType: Optional[str] = None
    enableIngress: Optional[bool] = None
    headService: Optional[dict] = None


class WorkerGroupSpec(GroupSpec):
    groupName: str
    replicas: Optional[int] = Field(None, ge=0)
    minReplicas: Optional[int] = Field(None, ge=0)
    maxReplicas: Optional[int] = Field(None, ge=0)
    numOfHosts: Optional[int] = Field(None, ge=1)
    idleTimeoutSeconds: Optional[int] = None
    scaleStrategy: Optional[dict] = None
    suspend: Optional[bool] = None


class RayClusterSpec(Strict):
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = []
    rayVersion: Optional[str] = None
    enableInTreeAutoscaling: Optional[bool] = None
    autoscalerOptions: Optional[AutoscalerOptions] = None
    authOptions: Optional[AuthOptions] = None
    gcsFaultToleranceOptions: Optional[dict] = None
    headServiceAnnotations: Optional[dict[str, str]] = None
    managedBy: Optional[str] = None
    suspend: Optional[bool] = None


class RayJobSpec(Strict):
    entrypoint: str = ""
    rayClusterSpec: Optional[RayClusterSpec] = None
    clusterSelector: Optional[dict[str, str]] = None
    runtimeEnvYAML: Optional[str] = None
    shutdownAfterJobFinishes: Optional[bool] = None
    ttlSecondsAfterFinished: Optional[int] = Field(None, ge=0)
    activeDeadlineSeconds: Optional[int] = Field(None, gt=0)
    backoffLimit: Optional[int] = Field(None, ge=0)
    submissionMode: Optional[Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]] = None
    submitterPodTemplate: Optional[dict] = None
    submitterConfig: Optional[dict] = None
    entrypointNumCpus: Optional[float] = None
    entrypointNumGpus: Optional[float] = None
    entrypointResources: Optional[str] = None
    jobId: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    managedBy: Optional[str] = None
    suspend: Optional[bool] = None
    deletionStrategy: Optional[dict] = None

    @field_validator("entrypointNumCpus", "entrypointNumGpus", mode="before")
    @classmethod
    def number(cls, value):  # the CRD's `type: number` takes integers too
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class RayJob(Strict):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayJob"]
    metadata: dict
    spec: RayJobSpec


def is_rayjob(config: dict) -> bool:
    return config.get("kind") == "RayJob" or str(config.get("apiVersion", "")).startswith("ray.io/")


def validate_rayjob(path, config: dict) -> RayJob:
    try:
        job = RayJob.model_validate(config)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "top level"
        message = "unknown field (not in KubeRay's RayJob)" if error["type"] == "extra_forbidden" else error["msg"]
        raise BadInput(f"{path}: {where}: {message}") from None
    spec, cluster = job.spec, job.spec.rayClusterSpec
    if not job.metadata.get("name"):
        raise BadInput(f"{path}: metadata.name: required")
    if cluster is None:
        raise BadInput(f"{path}: spec.rayClusterSpec: required (Keel's RayJob brings its own cluster)")
    if cluster.authOptions is None or cluster.authOptions.mode != "token":
        raise BadInput(f"{path}: spec.rayClusterSpec.authOptions.mode: set it to token (Ray's token authentication)")
    if not _at_least(cluster.rayVersion, (2, 52)):
        raise BadInput(f"{path}: spec.rayClusterSpec.rayVersion: {cluster.rayVersion!r}; token authentication needs Ray 2.52 or newer")
    if cluster.headGroupSpec.serviceType not in (None, "ClusterIP"):
        raise BadInput(f"{path}: spec.rayClusterSpec.headGroupSpec.serviceType: {cluster.headGroupSpec.serviceType} exposes the "
                       "dashboard and job API outside the cluster; keep ClusterIP and use kubectl port-forward")
    if "keel " not in f"{spec.entrypoint} ":
        raise BadInput(f"{path}: spec.entrypoint: {spec.entrypoint!r} does not run keel")
    for i, group in enumerate(cluster.workerGroupSpecs):
        low, high = group.minReplicas, group.maxReplicas
        if low is not None and high is not None and low > high:
            raise BadInput(f"{path}: spec.rayClusterSpec.workerGroupSpecs.{i}.minReplicas: {low} above maxReplicas {high}")
    return job


def _at_least(version: Optional[str], minimum: tuple[int, int]) -> bool:
    try:
        return tuple(int(p) for p in str(version).split(".")[:2]) >= minimum
    except ValueError:
        return False
