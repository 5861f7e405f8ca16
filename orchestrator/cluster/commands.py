"""`keel submit`, `keel jobs ...` and `keel cluster validate`: the cluster commands of the CLI."""

from __future__ import annotations

from rich.console import Console

from orchestrator.errors import BadInput, RunFailed


def cmd_submit(args, console: Console) -> int:
    from orchestrator.cluster import jobs

    say = lambda text: console.print(text, highlight=False, soft_wrap=True)
    client, sid = jobs.submit(args.job, args.overrides, args.address, args.working_dir,
                              runtime_env_json=args.runtime_env_json, submission_id=args.submission_id,
                              entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
                              say=say)
    say(f"submitted {sid}")
    where = f" --address {args.address}" if args.address else ""
    commands = (f"follow: keel jobs logs {sid} --follow{where}    status: keel jobs status {sid}{where}    "
                f"stop: keel jobs stop {sid}{where}")
    if args.no_wait:
        say(commands)
        return 0
    try:
        status = jobs.follow(client, sid, write=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    except KeyboardInterrupt:  # the job belongs to the cluster now: leave it running, say how to reach it
        say(f"\nstopped following; job {sid} keeps running on the cluster\n{commands}")
        return 130
    say(f"job {sid}: {status}")
    if status != "SUCCEEDED":
        raise RunFailed(f"job {sid} ended {status}")
    return 0


def cmd_jobs(args, console: Console) -> int:
    import json

    from rich.table import Table

    from orchestrator.cluster import jobs

    client = jobs.connect(args.address)
    if args.jobs_command == "list":
        infos = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
        if args.json:
            print(json.dumps([jobs.job_record(i) for i in infos], indent=1))
            return 0
        table = Table()
        for header in ("submission id", "status", "run", "user"):
            table.add_column(header, no_wrap=True)  # ids must stay copyable
        table.add_column("entrypoint", overflow="fold")
        for info in infos:
            meta = info.metadata or {}
            table.add_row(info.submission_id or info.job_id or "-", str(info.status.value), meta.get("keel_run", "-"),
                          meta.get("user", "-"), info.entrypoint)
        console.print(table)
        return 0
    try:
        if args.jobs_command == "status":
            info = client.get_job_info(args.id)
            if args.json:
                print(json.dumps(jobs.job_record(info), indent=1))
            else:
                console.print(f"{args.id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), highlight=False)
        elif args.jobs_command == "logs":
            if args.follow:
                jobs.follow(client, args.id, write=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
            else:
                console.print(client.get_job_logs(args.id), highlight=False, markup=False, end="")
        elif args.jobs_command == "stop":
            client.stop_job(args.id)
            console.print(f"{args.id}: {jobs.wait_terminal(client, args.id)}", highlight=False)
    except RuntimeError as exc:
        raise BadInput(f"job {args.id}: {str(exc).strip().splitlines()[0][:300]}") from None
    return 0


def cmd_cluster_validate(args, console: Console) -> int:
    from orchestrator.cluster.config import validate_cluster_config
    from orchestrator.cluster.kuberay import is_rayjob, validate_rayjob
    from orchestrator.spec_text import read_yaml

    tree = read_yaml(args.config)
    if is_rayjob(tree):  # a KubeRay RayJob (k8s/rayjob.yaml) rather than a cluster-launcher config
        job = validate_rayjob(args.config, tree).spec
        groups = ", ".join(f"{g.groupName} {g.minReplicas or 0}-{g.maxReplicas or g.replicas or 0}"
                           for g in job.rayClusterSpec.workerGroupSpecs)
        console.print(f"{args.config}: ok (RayJob {tree['metadata']['name']}, Ray {job.rayClusterSpec.rayVersion}, "
                      f"token auth, worker groups: {groups or 'none'})", highlight=False, soft_wrap=True)
        return 0
    config = validate_cluster_config(args.config)
    console.print(f"{args.config}: ok (cluster {config['cluster_name']}, node types "
                  f"{', '.join(config['available_node_types'])})", highlight=False)
    return 0
