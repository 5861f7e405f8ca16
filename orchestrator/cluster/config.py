"""`keel cluster validate`: check a Ray cluster-launcher YAML offline against Ray's own schema."""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import BadInput
from orchestrator.spec import read_yaml


def validate_cluster_config(path: str | Path) -> dict:
    """Ray's own checks (`prepare_config` fills defaults, `validate_config` applies the jsonschema, which
    rejects unknown keys), plus the ones Keel promises: token auth on and the dashboard on localhost only."""
    import logging

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # its INFO lines would break the one-line rule

    config = read_yaml(path)
    try:
        config = prepare_config(config)
        validate_config(config)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "top level"
        raise BadInput(f"{path}: {where}: {exc.message}") from None
    except KeyError as exc:  # prepare_config reads required sections directly
        raise BadInput(f"{path}: {exc.args[0]}: missing; a Ray cluster-launcher config needs it "
                       "(or give a KubeRay RayJob)") from None
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    head_commands = " ".join(config.get("head_start_ray_commands", []))
    if "RAY_AUTH_MODE=token" not in head_commands:
        raise BadInput(f"{path}: head_start_ray_commands: start Ray with RAY_AUTH_MODE=token (token authentication)")
    if "--dashboard-host=0.0.0.0" in head_commands:
        raise BadInput(f"{path}: head_start_ray_commands: --dashboard-host=0.0.0.0 exposes the job API; "
                       "keep it on 127.0.0.1 and use `ray dashboard`")
    return config
