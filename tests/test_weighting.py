import math

import pytest
import torch

from steper_dspy.errors import SteperError
from steper_dspy.training.weighting import StageWeighting, stage_token_losses

STAGES = ("init", "expand", "aggregate")


def _adaptive(log_vars):
    weighting = StageWeighting(STAGES, "adaptive")
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor(log_vars))
    return weighting


def test_adaptive_loss_matches_the_formula_on_a_hand_computed_case():
    losses = torch.tensor([2.0, 1.0, 0.5])
    weighting = _adaptive([0.0, math.log(4.0), -math.log(2.0)])
    # sigma^2 = (1, 4, 1/2): L/(2 sigma^2) + log sigma = (1 + 0) + (0.125 + log 2) + (0.5 - 0.5 log 2)
    expected = 1.0 + 0.125 + math.log(2.0) + 0.5 - 0.5 * math.log(2.0)
    assert weighting.combine(losses).item() == pytest.approx(expected, abs=1e-6)
    sigmas = weighting.sigmas()
    assert sigmas == pytest.approx({"init": 1.0, "expand": 2.0, "aggregate": math.sqrt(0.5)})
    assert weighting.effective_weights() == pytest.approx({"init": 0.5, "expand": 0.125, "aggregate": 1.0})


def test_adaptive_gradient_wrt_log_variance():
    losses = torch.tensor([2.0, 1.0, 0.5])
    log_vars = torch.tensor([0.0, math.log(4.0), -math.log(2.0)])
    weighting = _adaptive(log_vars.tolist())
    weighting.combine(losses).backward()
    expected = 0.5 - 0.5 * losses * torch.exp(-log_vars)  # (-0.5, 0.375, 0.0)
    assert torch.allclose(weighting.log_vars.grad, expected, atol=1e-6)


def test_token_losses_are_grouped_by_stage_and_absent_stages_contribute_nothing():
    token_losses = torch.tensor([1.0, 3.0, 4.0, 2.0])
    token_stages = torch.tensor([0, 0, 2, 2])  # no "expand" token in this batch
    weighting = _adaptive([0.3, -0.7, 0.1])
    loss = weighting(token_losses, token_stages)
    s = weighting.log_vars.detach()
    expected = 0.5 * torch.exp(-s[0]) * 2.0 + 0.5 * s[0] + 0.5 * torch.exp(-s[2]) * 3.0 + 0.5 * s[2]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert weighting.log_vars.grad[1].item() == 0.0

    means, counts = stage_token_losses(token_losses, token_stages, 3)
    assert means.tolist() == [2.0, 0.0, 3.0]
    assert counts.tolist() == [2.0, 0.0, 2.0]


def test_uniform_is_the_token_mean_and_has_nothing_to_learn():
    token_losses = torch.tensor([1.0, 3.0, 4.0, 2.0, 10.0])
    token_stages = torch.tensor([0, 0, 1, 2, 2])
    weighting = StageWeighting(STAGES, "uniform")
    assert weighting(token_losses, token_stages).item() == pytest.approx(4.0)
    assert not weighting.log_vars.requires_grad
    assert weighting.sigmas() == {"init": 1.0, "expand": 1.0, "aggregate": 1.0}


def test_fixed_is_the_weighted_sum_of_stage_means():
    token_losses = torch.tensor([1.0, 3.0, 4.0, 2.0, 10.0])
    token_stages = torch.tensor([0, 0, 1, 2, 2])
    weighting = StageWeighting(STAGES, "fixed", {"init": 1.0, "expand": 0.5, "aggregate": 2.0})
    # stage means (2, 4, 6): 1*2 + 0.5*4 + 2*6
    assert weighting(token_losses, token_stages).item() == pytest.approx(16.0)
    assert weighting.combine(torch.tensor([2.0, 4.0, 6.0])).item() == pytest.approx(16.0)
    assert not weighting.log_vars.requires_grad


def test_fixed_needs_a_weight_per_stage():
    with pytest.raises(SteperError, match="aggregate"):
        StageWeighting(STAGES, "fixed", {"init": 1.0, "expand": 1.0})
    with pytest.raises(SteperError, match="bogus"):
        StageWeighting(STAGES, "bogus")


def test_save_and_load_round_trip_through_safetensors(tmp_path):
    saved = _adaptive([0.25, -0.5, 1.5])
    path = saved.save(tmp_path)
    assert path.suffix == ".safetensors"
    restored = StageWeighting(STAGES, "adaptive")
    assert restored.load(tmp_path)
    assert torch.equal(restored.log_vars.detach(), saved.log_vars.detach())
    assert not StageWeighting(STAGES).load(tmp_path / "missing")
    with pytest.raises(SteperError, match="stages"):
        StageWeighting(("init", "aggregate")).load(tmp_path)
