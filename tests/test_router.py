"""Router known-answer cases, worked by hand."""
import torch

from runtime.config import ModelConfig
from runtime.make_checkpoint import preset_config
from runtime.model import Router


def router(experts=8, top_k=2, n_group=4, topk_group=2, scale=2.5):
    cfg = dict(preset_config("tiny"), num_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
               topk_group=topk_group, routed_scaling_factor=scale)
    return Router(ModelConfig.from_dict(cfg))


def test_group_limiting():
    r = router()
    # groups of two: sums of the best two are 1.0, 1.5, 0.85, 0.6 -> groups 1 and 0 stay
    s = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.85, 0.0, 0.3, 0.3]])
    assert r.choose(s).tolist() == [[0, 2]]  # e4 (0.85) beats e2 but its group is out


def test_bias_chooses_but_does_not_weigh():
    r = router()
    s = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.85, 0.0, 0.3, 0.3]])
    with torch.no_grad():
        r.expert_bias[3] = 0.2  # e3 now 0.9 for choosing
    idx = r.choose(s)
    assert idx.tolist() == [[0, 3]] or idx.tolist() == [[3, 0]]
    w = r.weights(s, idx)
    expect = {0: 0.9 / (0.9 + 0.7) * 2.5, 3: 0.7 / (0.9 + 0.7) * 2.5}  # unbiased scores
    for e, v in zip(idx[0].tolist(), w[0].tolist()):
        assert abs(v - expect[e]) < 1e-6


def test_weights_are_normalised_then_scaled():
    r = router(experts=16, top_k=4, n_group=1, topk_group=1, scale=2.5)
    x = torch.randn(5, r.weight.shape[1])
    with torch.no_grad():
        r.weight.normal_()
    idx, w = r(x)
    assert torch.allclose(w.sum(-1), torch.full((5,), 2.5))
    scores = torch.sigmoid(x.float() @ r.weight.float().T)
    assert torch.equal(idx, torch.topk(scores, 4).indices)


def test_router_agrees_with_the_numpy_router_of_synthetic_workloads():
    from traces.workloads.routing import group_limited_topk
    r = router(experts=32, top_k=4, n_group=4, topk_group=2)
    s = torch.rand(50, 32)
    a = r.choose(s).numpy()
    b = group_limited_topk(s.numpy(), 4, 4, 2)
    assert (a == b).all()
