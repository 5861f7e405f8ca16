import pytest
import torch
from torch import nn

from orchestrator.errors import BadInput
from orchestrator.models import build_model, init_weights, make_activation
from orchestrator.spec import parse_spec
from tests.unit.test_spec import MINIMAL


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_each_model_gives_logits_and_trains(kind, batch_norm):
    spec = parse_spec({**MINIMAL, "model": {"kind": kind, "batch_norm": batch_norm, "channels": [8, 16], "hidden": [32]}})
    model = build_model(spec.model, spec.data)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    assert model(x).shape == (16, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5  # can fit a tiny batch
    has_bn = any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
    assert has_bn == batch_norm


@pytest.mark.parametrize("name, probe", [
    ("relu", (-1.0, 0.0)), ("leaky_relu", (-1.0, -0.01)), ("elu", (-1.0, torch.expm1(torch.tensor(-1.0)).item())),
    ("silu", (-1.0, -1.0 * torch.sigmoid(torch.tensor(-1.0)).item())), ("swish", (2.0, 2.0 * torch.sigmoid(torch.tensor(2.0)).item())),
    ("gelu", (1.0, 0.8413447)),
])
def test_activations(name, probe):
    x, expected = probe
    assert make_activation(name)(torch.tensor([x])).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scheme, expected_std", [
    ("kaiming_normal", (2 / 256) ** 0.5), ("kaiming_uniform", (2 / 256) ** 0.5),
    ("xavier_normal", 2 ** 0.5 * (2 / (256 + 512)) ** 0.5), ("xavier_uniform", 2 ** 0.5 * (2 / (256 + 512)) ** 0.5),
    ("orthogonal", None),
])
def test_init_schemes(scheme, expected_std):
    layer = nn.Linear(256, 512)
    init_weights(layer, scheme, "relu")
    w = layer.weight.detach()
    assert torch.count_nonzero(layer.bias) == 0
    if expected_std is None:  # orthogonal rows (gain sqrt(2) for relu)
        torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(256), atol=1e-4, rtol=1e-4)
    else:
        assert w.std().item() == pytest.approx(expected_std, rel=0.05)


def test_zero_init_residual_makes_blocks_start_as_identity():
    spec = parse_spec({**MINIMAL, "model": {"kind": "resnet", "channels": [8], "blocks_per_stage": 2, "zero_init_residual": True}})
    model = build_model(spec.model, spec.data)
    assert all(torch.count_nonzero(block.bn2.weight) == 0 for block in model.blocks)
    spec = parse_spec({**MINIMAL, "model": {"kind": "resnet", "channels": [8], "zero_init_residual": False}})
    assert all(torch.count_nonzero(block.bn2.weight) > 0 for block in build_model(spec.model, spec.data).blocks)


def test_gcn_normalized_adjacency_and_permutation_invariance():
    from orchestrator.models.graph import GCN, normalized_adjacency

    a = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert torch.allclose(normalized_adjacency(a), torch.full((1, 2, 2), 0.5))  # D^-1/2 (A+I) D^-1/2, degrees 2
    torch.manual_seed(0)
    net = GCN(5, 3, [8, 8], 3, activation="relu", leaky_slope=0.0, dropout=0.0)
    adj = (torch.rand(1, 5, 5) > 0.5).float()
    adj = ((adj + adj.transpose(1, 2)) > 0).float()
    feats = torch.randn(1, 5, 3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    x = torch.cat([adj, feats], 2)
    x_perm = torch.cat([adj[:, perm][:, :, perm], feats[:, perm]], 2)
    assert torch.allclose(net(x), net(x_perm), atol=1e-5)  # relabelling the nodes changes nothing


def test_lstm_classifier_reads_the_whole_sequence():
    from orchestrator.models.sequence import LSTMClassifier

    torch.manual_seed(0)
    net = LSTMClassifier(1, [8, 4], 2, dropout=0.1).eval()
    x = torch.randn(3, 20, 1)
    y = net(x)
    assert y.shape == (3, 2)
    x2 = x.clone()
    x2[:, 0] += 5.0  # changing only the first step must change the output: gradients reach step 0
    assert not torch.allclose(net(x2), y)


def test_auto_init_is_kaiming_without_normalisation_and_torch_default_with_it():
    from orchestrator.models.init import resolve_init

    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(512, 512))
    default_std = wide[0].weight.std().item()  # torch's default: kaiming_uniform(a=sqrt(5)) ~ 1/sqrt(3 fan_in)
    init_weights(wide, "auto")
    assert wide[0].weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05) and default_std < 0.03
    normed = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512))
    before = normed[0].weight.detach().clone()
    init_weights(normed, "auto")
    assert torch.equal(before, normed[0].weight) and resolve_init(normed, "auto") == "default"


def test_an_lstm_model_starts_with_orthogonal_recurrent_gates_and_a_forget_bias_of_one_unless_init_is_default():
    spec = parse_spec({**MINIMAL, "model": {"kind": "lstm", "hidden": [8, 6]}, "data": {**MINIMAL["data"], "shape": [20, 3]}})
    net = build_model(spec.model, spec.data)                                # init: auto, as a user gets it
    for lstm in (net.layers[0], net.layers[1]):
        hidden = lstm.hidden_size
        for gate in lstm.weight_hh_l0.detach().split(hidden):            # each gate's recurrent block
            assert torch.allclose(gate @ gate.T, torch.eye(hidden), atol=1e-5)
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().split(hidden)  # torch adds the two biases
        assert torch.equal(bias[1], torch.ones(hidden))                    # the forget gate remembers at first
        assert all(torch.equal(b, torch.zeros(hidden)) for i, b in enumerate(bias) if i != 1)
        bound = (6 / (lstm.input_size + hidden)) ** 0.5                    # Xavier-uniform per gate
        assert lstm.weight_ih_l0.abs().max() <= bound and lstm.weight_ih_l0.abs().max() > bound / 2
    torch.manual_seed(0)
    kept = torch.nn.LSTM(3, 8)
    before = [p.detach().clone() for p in kept.parameters()]
    init_weights(kept, "default")                                          # torch's init, as the user asked
    assert all(torch.equal(a, b) for a, b in zip(before, kept.parameters()))


def test_a_transformers_position_embedding_starts_at_its_token_embeddings_scale():
    spec = parse_spec({**MINIMAL, "model": {"kind": "transformer", "width": 64, "layers": 1, "heads": 4},
                       "data": {**MINIMAL["data"], "shape": [12, 16]}})
    torch.manual_seed(0)
    net = build_model(spec.model, spec.data)
    tokens, positions = net.embed.weight.std().item(), net.position.std().item()
    assert positions == pytest.approx(tokens, rel=0.15)  # neither signal drowns the other at the first step


def test_transformer_attends_across_positions_and_qk_norm_bounds_the_logits():
    from orchestrator.models.transformer import SelfAttention

    # a transformer gets QK-layernorm by default (model.qk_norm: auto); other models have no use for it
    spec = parse_spec({**MINIMAL, "model": {"kind": "transformer", "width": 16, "layers": 2, "heads": 4},
                       "data": {**MINIMAL["data"], "shape": [6, 5], "num_classes": 3}})
    assert spec.model.qk_norm is True and parse_spec(MINIMAL).model.qk_norm is False
    off = parse_spec({**MINIMAL, "model": {**spec.model.model_dump(), "qk_norm": False},
                      "data": {**MINIMAL["data"], "shape": [6, 5], "num_classes": 3}})
    assert not any(isinstance(m, nn.LayerNorm) for name, m in build_model(off.model, off.data).named_modules()
                   if name.endswith(("q_norm", "k_norm")))
    torch.manual_seed(0)
    net = build_model(spec.model, spec.data).eval()
    x = torch.randn(2, 6, 5)
    assert net(x).shape == (2, 3)
    x2 = x.clone()
    x2[:, 5] += 3.0  # the last position changes every output: attention mixes positions
    assert not torch.allclose(net(x2), net(x))
    assert sum(isinstance(m, SelfAttention) for m in net.modules()) == 2
    assert all(isinstance(m.q_norm, nn.LayerNorm) and isinstance(m.k_norm, nn.LayerNorm)
               for m in net.modules() if isinstance(m, SelfAttention))

    # QK-layernorm: queries and keys scaled up 100x leave the attention output unchanged (without it, the
    # attention logits grow 10,000x and the softmax saturates)
    for qk_norm, unchanged in ((True, True), (False, False)):
        torch.manual_seed(0)
        attention = SelfAttention(16, 4, 0.0, qk_norm).eval()
        h = torch.randn(2, 6, 16)
        before = attention(h)
        with torch.no_grad():
            attention.qkv.weight[:32] *= 100.0
            attention.qkv.bias[:32] *= 100.0
        assert torch.allclose(attention(h), before, atol=1e-4) == unchanged


def test_transformer_spec_errors_name_the_field():
    with pytest.raises(BadInput, match="model.heads"):
        parse_spec({**MINIMAL, "model": {"kind": "transformer", "width": 30, "heads": 4}, "data": {**MINIMAL["data"], "shape": [6, 5]}})
    with pytest.raises(BadInput, match="data.shape: model.kind transformer needs"):
        parse_spec({**MINIMAL, "model": {"kind": "transformer"}})


def test_tokens_dataset_labels_whether_the_first_token_comes_back(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from orchestrator.data.generators import make_tokens

    train, _ = make_tokens(tmp_path, rows=500, length=12, vocab=16)
    table = pq.read_table(train)
    x = np.stack(table["tokens"].to_numpy(zero_copy_only=False)).reshape(-1, 12, 16)
    tokens, y = x.argmax(2), table["label"].to_numpy()
    assert (x.sum(2) == 1).all()  # one-hot
    assert ((tokens[:, 1:] == tokens[:, :1]).any(1) == y.astype(bool)).all()
    assert 0.4 < y.mean() < 0.6
