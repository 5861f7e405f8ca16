"""Trial-iterations spent by the divergence-aware sweep vs. the same sweep under plain ASHA.

Runs jobs/digits-sweep.yaml twice in one process: Keel's divergence stopping on (composed with ASHA),
then off (stock ASHA, which lets NaN/exploded trials run until their rung). Reports each trial's stop
iteration, the totals and their ratio (lower is better: budget spent on healthy trials).

    python -m benchmarks.sweep_budget [--sweep jobs/digits-sweep.yaml] [--epochs N]
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import machine, save, table
from orchestrator.sweep.driver import run_sweep
from orchestrator.sweep.spec import load_sweep


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default="jobs/digits-sweep.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="override the base job's epochs (and ASHA max_t)")
    args = parser.parse_args(argv)
    storage = tempfile.mkdtemp(prefix="keel-sweep-bench-")
    outcomes = {}
    for label, enabled in (("keel", "true"), ("asha", "false")):
        overrides = [f"name=bench-{label}", f"storage_path={storage}", f"divergence.enabled={enabled}"]
        if args.epochs:
            overrides.append(f"scheduler.max_t={args.epochs}")
        sweep, base = load_sweep(args.sweep, overrides)
        if args.epochs:
            base["run"]["epochs"] = args.epochs
        outcomes[label] = {str(r.config): r for r in run_sweep(sweep, base).rows}
    keys = sorted(outcomes["keel"], key=lambda k: outcomes["keel"][k].config.get("optimizer.lr", 0))
    rows, totals = [], {"keel": 0, "asha": 0}
    for key in keys:
        k, a = outcomes["keel"][key], outcomes["asha"].get(key)
        totals["keel"] += k.iterations
        totals["asha"] += a.iterations if a else 0
        params = ", ".join(f"{p.split('.')[-1]}={v}" for p, v in k.config.items())
        rows.append([params, f"{k.iterations} ({k.status})", f"{a.iterations} ({a.status})" if a else "-"])
    ratio = totals["keel"] / max(totals["asha"], 1)
    rows.append(["**total trial-iterations**", f"**{totals['keel']}**", f"**{totals['asha']}**"])
    result = {"sweep": args.sweep, "totals": totals, "ratio_keel_over_asha": ratio,
              "per_trial": [{"trial": r[0], "keel": r[1], "asha": r[2]} for r in rows[:-1]]}
    print(f"sweep budget on {args.sweep} ({machine()})\n")
    print(table(["trial", "Keel: stopped at report", "plain ASHA: stopped at report"], rows))
    print(f"\nratio Keel / ASHA: **{ratio:.2f}**\nwrote {save('sweep_budget', result)}")
    return result


if __name__ == "__main__":
    main()
