"""forget()'s automatic choice under ForgetConfig(criterion="loss"): nats of held-out loss, not accuracy points."""

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import trained_tiny_cnn

from hf_amnesia import ForgetConfig, ForgetRequestError
from hf_amnesia.forgetting import Measurer

LOSS = ForgetConfig(criterion="loss", max_loss_harm=0.5, neighbour_vote=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny_cnn(tmp_path_factory.mktemp("loss"))


def _reset(trainer, theta):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.clone(), trainer.model.parameters())


def _mean_loss(trainer, rows) -> float:
    measure = Measurer(trainer.model, trainer.data_collator, 8, "dataset_id", trainer._rows)
    return float(np.mean(measure.row_losses(rows)))


def test_the_loss_criterion_bounds_the_held_out_loss_the_scale_adds(trained):
    """The calibration trace holds nats: each probed scale's held-out loss minus the original's,
    measured here again at the chosen scale (no repair) within the budget."""
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    _reset(trainer, theta)
    base = _mean_loss(trainer, holdout)
    report = trainer.forget(ids, repair_steps=0, config=LOSS)
    assert 0 < report.scale and report.repair_steps == 0
    chosen = [h for s, h in report.calibration if s == report.scale]
    assert chosen and chosen[0] <= LOSS.max_loss_harm
    assert math.isclose(_mean_loss(trainer, holdout) - base, chosen[0], rel_tol=1e-4, abs_tol=1e-6)
    # a scale whose loss exceeded the budget is above the chosen one
    assert all(s > report.scale for s, h in report.calibration if h > LOSS.max_loss_harm)


def test_the_loss_criterions_repair_ends_when_the_retained_loss_is_back(trained):
    """The repair stops at a check where the retained rows' mean loss is at most the original's
    (or its budget ran out), and the choice is deterministic."""
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    retained = train.select(range(6, len(train)))
    _reset(trainer, theta)
    before = _mean_loss(trainer, retained)
    config = replace(LOSS, repair_share=1.0)  # a budget of a whole training: room to get back
    first = trainer.forget(ids, config=config)
    after = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().clone()
    budget = config.repair_budget(trainer._planned_training_steps())
    assert 0 < first.repair_steps < budget, (
        first.repair_steps,
        budget,
    )  # stopped at a check, before the budget ran out
    assert _mean_loss(trainer, retained) <= before + 1e-9
    _reset(trainer, theta)
    second = trainer.forget(ids, config=config)
    assert (second.scale, second.repair_steps) == (first.scale, first.repair_steps)
    assert torch.equal(torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach(), after)
    _reset(trainer, theta)


@pytest.mark.parametrize("bad", [{"criterion": "acc"}, {"max_loss_harm": 0.0}, {"max_loss_harm": float("nan")}])
def test_a_bad_criterion_or_loss_budget_is_refused(bad):
    with pytest.raises(ForgetRequestError, match="ForgetConfig"):
        ForgetConfig(**bad)


def test_a_repair_that_cannot_get_the_loss_back_halves_the_loss_budget(trained, caplog):
    """With a budget of a tenth of training the repair does not get the retained loss back here:
    the policy starts again with max_loss_harm halved, and its warnings say so in nats."""
    trainer, train, holdout, theta = trained
    _reset(trainer, theta)
    with caplog.at_level(logging.WARNING, logger="hf_amnesia"):
        trainer.forget([int(i) for i in train["dataset_id"][:6]], config=LOSS)
    assert "(max_loss_harm 0.5); trying again from the original weights with max_loss_harm 0.25" in caplog.text
    assert "max_harm" not in caplog.text.replace("max_loss_harm", "")
    _reset(trainer, theta)
