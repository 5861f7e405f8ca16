"""`keel check`'s comparisons on hand-made run results: each kind of break is found, at its first
step and layer, with the cause that usually makes it."""

import copy

import torch

from orchestrator.check.compare import NOISE_GRADIENT_SHARE, compare

MODULES = {"conv": "Conv2d", "bn": "BatchNorm2d", "noise": "RankNoise", "fc": "Linear"}


def result(batch=4, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"conv.weight": torch.randn(4, 1, 3, 3, generator=g), "bn.running_mean": torch.randn(4, generator=g),
             "bn.num_batches_tracked": torch.tensor(3), "fc.weight": torch.randn(10, 4, generator=g)}
    forward = {name: torch.randn(batch, 4, generator=g) for name in ("conv", "bn", "noise", "fc")}
    return {"steps": [{"loss": 2.0 - 0.1 * t, "grad_norm": 1.0 + t, "drift": 0.0, "skipped": False} for t in range(steps)],
            "state": state, "fingerprint": {k: [v.double().sum().item()] for k, v in state.items() if v.is_floating_point()},
            "first_forward": forward, "modules": MODULES, "dropout_layers": 0}


def two_ranks(one):
    """What a correct 2-worker run saves: each rank's half of every step-0 output; the same state."""
    ranks = []
    for r in range(2):
        rank = copy.deepcopy(one)
        rank["first_forward"] = {k: v[r * 2:(r + 1) * 2].clone() for k, v in one["first_forward"].items()}
        ranks.append(rank)
    return {"run": ranks, "repeat": [copy.deepcopy(one)], "resume": [copy.deepcopy(one)]}


def failures(report):
    return [line.name for line in report.lines if not line.ok]


def test_a_correct_run_matches_everywhere():
    one = result()
    report = compare(one, two_ranks(one), data_deterministic=True)
    assert report.ok and len(report.lines) == 8


def test_per_rank_batch_norm_is_named_at_step_0_with_the_fix():
    one = result()
    many = two_ranks(one)
    many["run"][1]["first_forward"]["bn"] += 0.5  # rank 1 normalised with its own statistics
    many["run"][1]["first_forward"]["noise"] += 0.5
    report = compare(one, many, True)
    line = report.first_failure
    assert line.name.startswith("forward, step 0") and "first differs at bn (BatchNorm2d)" in line.detail
    assert "stability.sync_batchnorm: true" in line.cause


def test_a_rank_dependent_layer_is_named():
    one = result()
    many = two_ranks(one)
    many["run"][1]["first_forward"]["noise"] += 1e-2
    line = compare(one, many, True).first_failure
    assert "first differs at noise (RankNoise)" in line.detail and "random numbers drawn per rank" in line.cause


def test_a_loss_that_differs_later_names_the_step():
    one = result()
    many = two_ranks(one)
    many["run"][0]["steps"][2]["loss"] = 1.9
    report = compare(one, many, True)
    assert failures(report) == ["loss, every step"] and "step 2" in report.first_failure.detail
    many["run"][0]["steps"][2]["loss"] = float("nan")
    assert failures(compare(one, many, True)) == ["loss, every step"]


def test_replica_drift_and_per_rank_buffers_are_caught():
    one = result()
    many = two_ranks(one)
    many["run"][0]["steps"][1]["drift"] = 1e-3
    assert "from step 1" in compare(one, many, True).first_failure.detail
    many = two_ranks(one)
    many["run"][1]["fingerprint"]["bn.running_mean"] = [9.0]
    line = compare(one, many, True).first_failure
    assert "bn.running_mean differs between rank 0 and rank 1" in line.detail and "sync_batchnorm" in line.cause


def test_determinism_and_resume_name_the_first_tensor_that_differs():
    one = result()
    many = two_ranks(one)
    many["resume"][0]["state"]["fc.weight"] = many["resume"][0]["state"]["fc.weight"] * (1 + 1e-4)
    report = compare(one, many, True)
    assert failures(report) == ["resume at k/2 from a Keel checkpoint"]
    assert "fc.weight (Linear)" in report.first_failure.detail and "checkpoint does not carry" in report.first_failure.cause
    many = two_ranks(one)
    many["repeat"][0]["state"]["conv.weight"] = many["repeat"][0]["state"]["conv.weight"] + 1e-3
    assert failures(compare(one, many, True)) == ["determinism (the same run twice)"]


def test_parameters_within_fp32_reordering_noise_match_but_a_real_difference_does_not():
    one = result()
    many = two_ranks(one)
    drifted = {k: v * (1 + 5e-4) if v.is_floating_point() else v for k, v in one["state"].items()}
    for trajectory in ("run", "repeat", "resume"):  # the N-worker runs agree with each other exactly
        many[trajectory][0]["state"] = drifted
    assert compare(one, many, True).ok  # 4e-4 measured after 20 steps of the main job
    drifted["conv.weight"] = one["state"]["conv.weight"] * 1.05
    assert failures(compare(one, many, True)) == ["parameters and buffers after k steps"]


def test_values_with_a_rounding_noise_gradient_are_left_out_and_named_but_only_those():
    """A key bias before softmax gets ~1e-10 of the gradient; Adam makes that noise a full step, different on 1
    and N workers (the shipped transformer's k_norm.bias ended 1.4x apart; nn.MultiheadAttention packs its key
    bias with the query and value ones in in_proj_bias). Those values are not compared, and are named; a value
    with a real gradient that differs still fails, and so does any difference between two runs of the same
    world size (determinism, resume)."""
    one = result()
    one["state"]["kbias"] = torch.full((4,), 1e-3)
    one["state"]["in_proj_bias"] = torch.full((6,), 1e-3)
    one["gradient_shares"] = {"conv.weight": torch.full((4, 1, 3, 3), 0.3), "fc.weight": torch.full((10, 4), 0.1),
                              "kbias": torch.full((4,), 8e-10), "in_proj_bias": torch.tensor([1e-4, 1e-4, 2e-10, 1e-10, 1e-4, 1e-4])}
    flipped = one["state"]["in_proj_bias"].clone()
    flipped[2:4] *= -1  # the key part only
    noisy = {**one["state"], "kbias": -one["state"]["kbias"], "in_proj_bias": flipped}
    many = two_ranks(one)
    for trajectory in ("run", "repeat", "resume"):
        many[trajectory][0]["state"] = noisy
    report = compare(one, many, True)
    assert report.ok, failures(report)
    assert ("not compared, their gradient is rounding noise (the loss does not depend on them): kbias, "
            "in_proj_bias (2 of 6 values)") in report.lines[4].detail, report.lines[4].detail
    for changed in ({"conv.weight": one["state"]["conv.weight"] * 1.05},  # a real gradient's parameter
                    {"in_proj_bias": flipped * torch.tensor([1.05, 1, 1, 1, 1, 1])}):  # a real value beside noise
        many = two_ranks(one)
        for trajectory in ("run", "repeat", "resume"):  # the N-worker runs agree: only 1 vs N differs
            many[trajectory][0]["state"] = {**noisy, **changed}
        assert failures(compare(one, many, True)) == ["parameters and buffers after k steps"], changed
    many = two_ranks(one)
    many["repeat"][0]["state"] = noisy
    assert failures(compare(one, many, True)) == ["determinism (the same run twice)"]


def test_a_nondeterministic_pipeline_fails_first():
    one = result()
    report = compare(one, two_ranks(one), data_deterministic=False)
    assert report.first_failure.name == "data pipeline deterministic" and "seeded" in report.first_failure.cause


def test_a_time_major_output_is_not_mistaken_for_a_batch():
    one = result()
    one["first_forward"]["lstm"] = torch.randn(3, 4, 5)  # (time, batch, hidden): dim 0 is not the batch
    many = two_ranks(one)
    for r, rank in enumerate(many["run"]):
        rank["first_forward"]["lstm"] = one["first_forward"]["lstm"][:, r * 2:(r + 1) * 2].clone()
    assert compare(one, many, True).ok


def test_the_worker_measures_a_key_bias_before_softmax_at_rounding_level_and_real_parameters_far_above():
    from orchestrator.check.worker import gradient_shares

    torch.manual_seed(0)
    q, k, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)  # k.bias shifts every logit alike
    model = torch.nn.ModuleDict({"q": q, "k": k, "head": head})
    x = torch.randn(16, 5, 8)
    attention = torch.softmax(q(x) @ k(x).transpose(1, 2), -1)
    torch.nn.functional.cross_entropy(head((attention @ x).mean(1)), torch.randint(0, 3, (16,))).backward()
    shares = {}
    gradient_shares(model, shares)
    assert shares["k.bias"].max() <= NOISE_GRADIENT_SHARE / 10 and shares["q.bias"].min() >= NOISE_GRADIENT_SHARE * 10, shares


def test_during_training_the_shipped_transformers_key_norm_bias_is_measured_as_rounding_noise():
    """The real step (guards, clipping, Adam) of jobs/sequence-transformer.yaml's model: its k_norm biases, which
    only shift every key's logit alike, get a rounding-level share; every other parameter a real one."""
    from orchestrator.check.worker import track_gradient_shares
    from orchestrator.spec import load_spec
    from orchestrator.train.components import build_components
    from orchestrator.train.loop import train_step
    from tests.helpers import ROOT

    spec = load_spec(ROOT / "jobs/sequence-transformer.yaml")
    comps = build_components(spec, 4, torch.device("cpu"))
    shares = track_gradient_shares(comps)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        train_step(comps, {"x": torch.randn(16, *spec.data.shape, generator=g),
                           "y": torch.randint(0, spec.data.num_classes, (16,), generator=g)}, spec)
    noise = sorted(n for n, share in shares.items() if (share <= NOISE_GRADIENT_SHARE).all())
    assert noise == ["blocks.0.attention.k_norm.bias", "blocks.1.attention.k_norm.bias"], noise
    assert all(shares[n].max() <= 1e-8 for n in noise)  # 100x under the line
    assert not any((share <= NOISE_GRADIENT_SHARE).any() for n, share in shares.items() if n not in noise)


def test_only_dropout_that_drops_is_turned_off_and_counted_in_the_note():
    import torch

    from orchestrator.check.worker import dropout_layers, dropout_off
    from orchestrator.models import build_model
    from orchestrator.spec import parse_spec

    def mlp(dropout: float) -> torch.nn.Module:
        spec = parse_spec({"model": {"kind": "mlp", "dropout": dropout}, "run": {"name": "x"},
                           "data": {"train": "t", "val": "v", "shape": [4], "num_classes": 2}})
        return build_model(spec.model, spec.data)
    assert dropout_layers(mlp(0.0)) == []  # the default MLP: nothing to turn off, no note
    with_dropout = mlp(0.3)
    assert dropout_off(with_dropout) == 2  # what the note counts: taken as they are turned off, not after
    assert all(m.p == 0.0 for m in with_dropout.modules() if isinstance(m, torch.nn.Dropout))
