"""forget()'s automatic scale and repair: the search, its data, determinism and its refusals."""

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, text_dataset, tiny_bert, tiny_config, trained_tiny_cnn

from hf_amnesia import AmnesiacTrainer, ForgetConfig, ForgetRequestError, StoreReader
from hf_amnesia.forgetting import ForgetPolicy, Measurer
from hf_amnesia.forgetting import repair as repair_module
from hf_amnesia.forgetting.attempts import ModelAttempts
from hf_amnesia.forgetting.hold import (
    forgotten_classes,
    misfit_loss,
    retained_sample,
    unseen_targets,
    unsupported_by_neighbours,
)
from hf_amnesia.forgetting.prepare import gather, prepare_unseen_hold
from hf_amnesia.forgetting.repair import HoldUnseenLoss, repair_until_restored
from hf_amnesia.forgetting.scale import ScaleChoice, largest_safe_scale
from hf_amnesia.forgetting.subtraction import forget_update, kept_share_weights

DEFAULTS = ForgetConfig()
CLASS_RETRIES, HARM_RETRIES = DEFAULTS.class_retries, DEFAULTS.harm_retries
scale_ceiling, repair_budget = DEFAULTS.scale_ceiling, DEFAULTS.repair_budget
UNWEIGHTED = ForgetConfig(weight_by_kept_share=False)  # the raw stored sum, as a fixed scale subtracts it

# -- the search (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", [0.05, 0.7, 3.0, 17.0])
def test_bisection_finds_the_largest_safe_scale(boundary):
    calls = []

    def harm(scale):  # grows with the scale; crosses max_harm = 5 at `boundary`
        calls.append(scale)
        return 5.0 * scale / boundary

    choice = largest_safe_scale(harm, 5.0, ceiling=40.0, octaves=10, steps=7)
    assert choice.scale <= boundary * (1 + 1e-12)  # never above the boundary
    assert choice.scale >= boundary * 2 ** (-10 / 2**7) * (1 - 1e-12)  # within the resolution below it
    assert len(calls) == 9 and [s for s, _ in choice.trace] == calls
    assert all(h <= 5.0 for s, h in choice.trace if s <= choice.scale)


def test_bisection_edges():
    assert (
        largest_safe_scale(lambda s: 0.0, 5.0, ceiling=40.0, octaves=10, steps=7).scale == 40.0
    )  # harmless: the ceiling
    none = largest_safe_scale(lambda s: 100.0, 5.0, ceiling=40.0, octaves=10, steps=7)
    assert none.scale == 0.0 and len(none.trace) == 2  # harmful even at ceiling / 2**10: subtract nothing


def test_rules_of_thumb():
    assert scale_ceiling(1.0) == 4.0 and math.isclose(scale_ceiling(0.01), 40.0)
    assert repair_budget(600) == 60 and repair_budget(3) == 1
    assert forgotten_classes(np.array([0, 1, 1, 2, 2]), np.array([True, True, False, True, True])) == [0, 2]
    assert forgotten_classes(np.array([0, 1]), np.array([False, False])) == []
    a, b = retained_sample(5000, seed=3, size=1024), retained_sample(5000, seed=3, size=1024)
    assert np.array_equal(a, b) and len(a) == 1024 and len(np.unique(a)) == 1024
    assert np.array_equal(retained_sample(10, seed=0, size=1024), np.arange(10))


class _ScriptedAttempts:
    """`policy.Attempts` with no model: harm grows linearly with the scale, each repair returns the
    next of `repairs`, and the "weights" are the scale last subtracted."""

    has_classes, sampled, ceiling = False, 0, 40.0

    def __init__(self, repairs, harm_per_scale=10.0):
        self.repairs, self.harm_per_scale = iter(repairs), harm_per_scale
        self.weights, self.subtracted = 0.0, []

    def harm(self, scale):
        return self.harm_per_scale * scale

    def subtract(self, scale):
        self.weights = scale
        self.subtracted.append(scale)

    def repair(self):
        return next(self.repairs)

    def recognised(self, steps):
        return None

    def keep(self):
        return self.weights

    def restore(self, kept):
        self.weights = kept


def test_the_policy_halves_the_harm_budget_until_a_repair_mends_the_subtraction():
    attempts = _ScriptedAttempts(repairs=[(9, False), (9, False), (4, True)])
    outcome = ForgetPolicy(ForgetConfig(max_harm=40.0), attempts).run("auto", "auto", count=3)
    # harm is 10 per unit of scale, so max_harm 40, 20, 10 allow scales 4, 2, 1 (the search lands within its resolution)
    for scale, boundary in zip(attempts.subtracted, (4.0, 2.0, 1.0), strict=True):
        assert boundary * 2 ** (-10 / 2**7) <= scale <= boundary
    assert outcome.repair_steps == 4 and outcome.scale == attempts.subtracted[-1] == attempts.weights
    assert all(harm <= 40.0 for scale, harm in outcome.trace if scale <= attempts.subtracted[0])
    # no retries allowed: the first attempt stays, however its repair went
    attempts = _ScriptedAttempts(repairs=[(9, False)])
    outcome = ForgetPolicy(ForgetConfig(harm_retries=0), attempts).run("auto", "auto", count=3)
    assert len(attempts.subtracted) == 1 and outcome.repair_steps == 9
    # a fixed scale is subtracted as given, and a request of no new ids is not repaired
    attempts = _ScriptedAttempts(repairs=[])
    assert ForgetPolicy(DEFAULTS, attempts).run(2.5, "auto", count=0).scale == 2.5 and attempts.weights == 2.5


# -- forget(ids) with its defaults ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny_cnn(tmp_path_factory.mktemp("auto"))


def _reset(trainer, theta):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.to(trainer.args.device).clone(), trainer.model.parameters())


def _measure(trainer) -> Measurer:
    """What forget measures the trainer's model with."""
    return Measurer(
        trainer.model, trainer.data_collator, trainer.args.per_device_eval_batch_size, "dataset_id", trainer._rows
    )


def _data(trainer, ids, need_holdout, hold_unseen=False, whole_class=None, holdout=None):
    """The data forget's automatic choice gathers for `ids`."""
    return gather(
        trainer.train_dataset,
        id_column="dataset_id",
        seed=trainer.args.seed,
        planned_steps=trainer._planned_training_steps(),
        ids=np.asarray(ids),
        todo=np.asarray(ids),
        forgotten=trainer.forgotten_ids(),
        holdout=trainer.eval_dataset if holdout is None else holdout,
        whole_class=whole_class,
        need_holdout=need_holdout,
        hold_unseen=hold_unseen,
        config=DEFAULTS,
        sequence_rows=_measure(trainer).sequence_rows,
    )


def _hold(trainer, data, ids):
    prepare_unseen_hold(
        data,
        _measure(trainer),
        train_dataset=trainer.train_dataset,
        id_column="dataset_id",
        seed=trainer.args.seed,
        todo=np.asarray(ids),
        config=DEFAULTS,
    )


def _repair(trainer, data, after_subtraction=None):
    return repair_until_restored(trainer.model, data, after_subtraction, _measure(trainer), trainer.args, DEFAULTS)


def _weights(trainer):
    return torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().cpu().clone()


def test_auto_keeps_its_promise_and_is_deterministic(trained):
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    _reset(trainer, theta)
    first = trainer.forget(ids)
    after = _weights(trainer)
    assert first.forgotten == sorted(ids) and first.calibration
    assert 0 < first.scale <= scale_ceiling(0.2)
    chosen = [h for s, h in first.calibration if s == first.scale]
    assert chosen and chosen[0] <= 40.0  # the chosen scale cost at most max_harm (default 40) points on the holdout
    planned = math.ceil(72 / 8) * 3
    assert 0 <= first.repair_steps <= repair_budget(planned)
    _reset(trainer, theta)
    second = trainer.forget(ids)
    assert second.scale == first.scale and second.repair_steps == first.repair_steps
    assert torch.equal(_weights(trainer), after)


def test_kept_share_weights_equalise_the_tensors_shares(trained):
    trainer, *_ = trained
    manifest = StoreReader(trainer.args.store_dir).manifest
    assert manifest.keep_layout == "rows"
    weights = kept_share_weights(manifest)
    assert weights.dtype == torch.float64 and len(weights) == manifest.num_params
    average = manifest.k / manifest.num_params
    offset = 0
    for shape, numel in zip(manifest.layout.shapes, manifest.layout.numels):
        rows = shape[0] if len(shape) else 1
        kept = min(rows, max(1, round(0.2 * rows)))  # e.g. 1 of 4 conv channels, 1 of 3 head rows
        assert torch.all(weights[offset : offset + numel] == average * rows / kept)
        offset += numel
    assert len(set(weights.tolist())) > 1  # TinyCNN's tensors keep different shares at p = 0.2
    assert torch.equal(kept_share_weights(replace(manifest, keep_layout="entries")), torch.ones(manifest.num_params))
    assert torch.equal(kept_share_weights(replace(manifest, keep_fraction=1.0)), torch.ones(manifest.num_params))


def test_auto_subtracts_the_weighted_sum_and_a_fixed_scale_the_raw_one(trained):
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    reader = StoreReader(trainer.args.store_dir)
    raw = forget_update(reader, np.array(sorted(ids)))
    _reset(trainer, theta)
    auto = trainer.forget(ids, repair_steps=0)
    expected = auto.scale * raw * kept_share_weights(reader.manifest)
    assert torch.allclose((theta - _weights(trainer)).double(), expected, rtol=1e-5, atol=1e-6)
    _reset(trainer, theta)
    trainer.forget(ids, scale=1.0, repair_steps=0)  # the exact subtraction: the stored sum as it is
    assert torch.allclose((theta - _weights(trainer)).double(), raw, rtol=1e-5, atol=1e-6)


def test_a_subtraction_the_repair_cannot_mend_is_retried_with_half_the_harm(trained, monkeypatch):
    """When the bounded repair does not bring retained accuracy back, forget starts again from the
    original weights with max_harm halved, and ends exactly where that request alone would."""
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    _reset(trainer, theta)
    alone = trainer.forget(ids, config=ForgetConfig(max_harm=10.0))
    expected = _weights(trainer)
    _reset(trainer, theta)
    limits, outcomes = [], []
    choose, repair = ForgetPolicy.choose_scale, ModelAttempts.repair

    def spy_choose(self, max_harm):
        limits.append(max_harm)
        return choose(self, max_harm)

    def failing_first_repair(self):  # the first attempt's repair reports failure
        steps, restored = repair(self)
        outcomes.append(restored)
        return steps, restored and len(outcomes) > 1

    monkeypatch.setattr(ForgetPolicy, "choose_scale", spy_choose)
    monkeypatch.setattr(ModelAttempts, "repair", failing_first_repair)
    report = trainer.forget(ids, config=ForgetConfig(max_harm=20.0))
    assert limits == [20.0, 10.0]
    assert report.scale == alone.scale and report.repair_steps == alone.repair_steps
    assert torch.equal(_weights(trainer), expected)
    # never more than HARM_RETRIES halvings, and the last attempt is kept
    _reset(trainer, theta)
    limits.clear()
    monkeypatch.setattr(ModelAttempts, "repair", lambda self: (repair(self)[0], False))
    trainer.forget(ids, config=ForgetConfig(max_harm=40.0))
    assert limits == [40.0 / 2**k for k in range(HARM_RETRIES + 1)]
    assert sorted(trainer.forgotten_ids()) == sorted(ids)


def test_a_retry_that_cannot_lower_the_scale_keeps_the_failed_attempt(trained, monkeypatch):
    """When halving max_harm gives no smaller scale (the ceiling, or a class's fallback scale),
    forget does not repeat the same attempt: it keeps trying smaller budgets, then keeps the one
    attempt it made."""
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    limits, repairs = [], []
    repair = ModelAttempts.repair

    def fixed_choice(self, max_harm):
        limits.append(max_harm)
        return ScaleChoice(scale=1.5, trace=[(1.5, 0.0)])

    def failing_repair(self):
        repairs.append(1)
        return repair(self)[0], False

    _reset(trainer, theta)
    monkeypatch.setattr(ForgetPolicy, "choose_scale", fixed_choice)
    monkeypatch.setattr(ModelAttempts, "repair", failing_repair)
    # unweighted tensors, so that the automatic attempt and the direct call below subtract the same sum
    report = trainer.forget(ids, config=UNWEIGHTED)
    after = _weights(trainer)
    assert limits == [40.0 / 2**k for k in range(HARM_RETRIES + 1)] and len(repairs) == 1
    assert report.scale == 1.5
    # the same single attempt, made directly
    _reset(trainer, theta)
    direct = trainer.forget(ids, scale=1.5, repair_steps="auto")
    assert direct.repair_steps == report.repair_steps
    assert torch.equal(_weights(trainer), after)


def test_a_class_the_repair_brings_back_is_reported(trained, monkeypatch, caplog):
    trainer, train, holdout, theta = trained
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    auto = _data(trainer, class_ids, need_holdout=False)

    # The real repair: the warning appears exactly when the class rows are recognised again.
    _reset(trainer, theta)
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids)
    back = _measure(trainer).accuracy(auto.class_rows) > 1.0
    assert ("the class is not forgotten" in caplog.text) == (back and report.repair_steps > 0)

    # A repair that restores everything, the class included, is reported. (To within 1e-6: weights
    # equal to the original bit for bit would be, for the store, the original having forgotten them.)
    def repair_to_original(self):
        with torch.no_grad():
            restored = theta.to(self.args.device) * (1 + 1e-6)
            torch.nn.utils.vector_to_parameters(restored, self.model.parameters())
        return 5, True

    _reset(trainer, theta)
    assert _measure(trainer).accuracy(auto.class_rows) > 1.0  # the original recognises the class
    caplog.clear()
    monkeypatch.setattr(ModelAttempts, "repair", repair_to_original)
    with caplog.at_level(logging.WARNING):
        trainer.forget(class_ids)
    assert "after 5 repair steps" in caplog.text and "the class is not forgotten" in caplog.text

    # The same when every attempt's repair fails and forget keeps its one attempt (no smaller scale).
    def failing_repair_to_original(self):
        return repair_to_original(self)[0], False

    def fixed_choice(self, max_harm):
        return ScaleChoice(scale=1.5, trace=[(1.5, 0.0)])

    _reset(trainer, theta)
    caplog.clear()
    monkeypatch.setattr(ForgetPolicy, "choose_scale", fixed_choice)
    monkeypatch.setattr(ModelAttempts, "repair", failing_repair_to_original)
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids)
    assert report.scale == 1.5 and "keeps the attempt at scale" in caplog.text
    assert "the class is not forgotten" in caplog.text


def test_auto_reads_only_the_holdout_and_training_rows(trained, monkeypatch):
    trainer, train, holdout, theta = trained
    _reset(trainer, theta)
    test_split = image_dataset(30, classes=3, seed=99)  # a test split the user reports TA on
    test_rows = {tuple(np.round(np.asarray(x).ravel(), 5)) for x in test_split["pixel_values"]}
    allowed = {tuple(np.round(np.asarray(x).ravel(), 5)) for x in train["pixel_values"]} | {
        tuple(np.round(np.asarray(x).ravel(), 5)) for x in holdout["pixel_values"]
    }
    seen = []
    measure = Measurer.batches

    def spy(self, dataset):  # observes what forget reads
        seen.extend(tuple(np.round(np.asarray(dataset[i]["pixel_values"]).ravel(), 5)) for i in range(len(dataset)))
        yield from measure(self, dataset)

    monkeypatch.setattr(Measurer, "batches", spy)
    trainer.forget([int(train["dataset_id"][0])], holdout=holdout)
    assert seen and set(seen) <= allowed and not set(seen) & test_rows


def test_unseen_targets_match_held_out_quantiles_capped_by_the_subtraction():
    held_out = np.sort(np.random.default_rng(0).exponential(1.0, 1000))
    losses = np.array([0.1, 5.0, 0.2, 0.3])  # ranks 0, 3, 1, 2 in the batch
    levels = np.array([0.125, 0.875, 0.375, 0.625])
    uncapped = unseen_targets(losses, np.full(4, np.inf), held_out)
    assert np.allclose(uncapped, np.quantile(held_out, levels))
    after = np.array([0.0, 10.0, 0.5, 0.05])
    assert np.allclose(unseen_targets(losses, after, held_out), np.minimum(after, uncapped))
    # the rank, not the loss, picks the quantile: shifting every loss keeps the targets
    assert np.allclose(unseen_targets(losses + 7.0, np.full(4, np.inf), held_out), uncapped)


def test_neighbours_outvote_a_mislabeled_row_and_not_a_typical_one():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    retained_labels = np.repeat(np.arange(3), 40)
    retained = centres[retained_labels] + rng.normal(size=(120, 8))
    rows = centres[[0, 1, 2, 2]] + rng.normal(size=(4, 8))
    labels = np.array([0, 1, 2, 0])  # the last row lies among the 2s but carries label 0
    flagged = unsupported_by_neighbours(rows, labels, retained, retained_labels, k=10)
    assert flagged.tolist() == [False, False, False, True]
    # chunking changes nothing; scale does not matter (cosine similarity)
    assert np.array_equal(unsupported_by_neighbours(rows, labels, retained, retained_labels, k=10, chunk=1), flagged)
    assert np.array_equal(unsupported_by_neighbours(rows * 3, labels, retained, retained_labels, k=10), flagged)
    # fewer than half of the votes is too little support; half is enough
    near = np.zeros((10, 2))
    near[:, 0] = 1.0
    assert unsupported_by_neighbours(
        np.array([[1.0, 0.0]]), np.array([0]), near, np.array([0] * 4 + [1] * 6), k=10
    ).all()
    assert not unsupported_by_neighbours(
        np.array([[1.0, 0.0]]), np.array([0]), near, np.array([0] * 5 + [1] * 5), k=10
    ).any()
    assert not unsupported_by_neighbours(rows, labels, np.zeros((0, 8)), np.zeros(0), k=10).any()


def test_misfit_loss_and_the_targets_of_unsupported_rows():
    losses = np.array([0.1, 2.0, 0.3, 4.0, 3.0])
    correct = np.array([True, False, True, False, False])
    assert misfit_loss(losses, correct) == 3.0  # the median over the misclassified rows
    assert misfit_loss(losses, np.ones(5, dtype=bool)) == 4.0  # none misclassified: the largest loss
    held_out = np.sort(np.random.default_rng(0).exponential(1.0, 1000))
    batch, after = np.array([0.1, 5.0, 0.2, 0.3]), np.array([0.0, 10.0, 0.5, 0.05])
    plain = unseen_targets(batch, after, held_out)
    flagged = np.array([True, True, False, False])
    held = unseen_targets(batch, after, held_out, flagged, misfit=1.0)
    assert np.allclose(held, np.where(flagged, np.maximum(plain, 1.0), plain))
    assert held[0] == 1.0 and held[1] == plain[1] > 1.0  # a flagged row is never held lower than before


def test_features_are_the_classifier_layers_input(trained):
    trainer, train, holdout, theta = trained
    _reset(trainer, theta)
    features, labels = _measure(trainer).features(holdout)
    model = trainer.model
    with torch.no_grad():
        x = torch.stack([torch.as_tensor(r) for r in holdout["pixel_values"]]).to(next(model.parameters()).device)
        expected = torch.nn.functional.max_pool2d(torch.relu(model.norm(model.conv(x))), 2).flatten(1)
    assert np.allclose(features, expected.cpu().numpy(), atol=1e-6)
    assert np.array_equal(labels, np.asarray(holdout["labels"]))


class _TokenwiseHead(TinyCNN):
    """TinyCNN whose classifier layer sees a sequence of one position per row (a 3-D input)."""

    def forward(self, pixel_values, labels=None):
        x = torch.relu(self.norm(self.conv(pixel_values)))
        logits = self.head(torch.nn.functional.max_pool2d(x, 2).flatten(1)[:, None, :]).mean(1)
        return {"loss": None, "logits": logits}


def test_the_neighbour_check_is_skipped_with_a_warning_when_features_are_not_one_vector_per_row(tmp_path, caplog):
    data = image_dataset(40, classes=3, seed=0, with_ids=True)
    train, holdout = data.select(range(30)), data.select(range(30, 40))
    trainer = AmnesiacTrainer(
        model=_TokenwiseHead(), args=tiny_config(tmp_path), train_dataset=train, eval_dataset=holdout, record=False
    )
    features, labels = _measure(trainer).features(holdout)
    assert features is None and np.array_equal(labels, np.asarray(holdout["labels"]))
    ids = np.asarray(train["dataset_id"][:3])
    auto = _data(trainer, ids, need_holdout=True, hold_unseen=True)
    with caplog.at_level(logging.WARNING):
        _hold(trainer, auto, ids)
    assert auto.unsupported is None and len(auto.held_out_losses) == 10  # the quantile hold stays
    assert "does not take one feature vector per row" in caplog.text


def test_the_automatic_repair_holds_forget_rows_unseen_unless_a_class_goes(trained, monkeypatch):
    trainer, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    repairs = []
    finetune = repair_module.finetune

    def spy(*args, compute_loss_func=None, **kwargs):  # observes which loss each repair trains with
        repairs.append(compute_loss_func)
        return finetune(*args, compute_loss_func=compute_loss_func, **kwargs)

    monkeypatch.setattr(repair_module, "finetune", spy)
    _reset(trainer, theta)
    measure = _measure(trainer)
    auto = _data(trainer, ids, need_holdout=True, hold_unseen=True)
    auto.original_accuracy = measure.accuracy(auto.retained_sample)
    _hold(trainer, auto, ids)
    assert sorted(np.asarray(auto.forget_rows["dataset_id"]).tolist()) == sorted(ids)
    assert np.array_equal(auto.held_out_losses, np.sort(measure.row_losses(holdout)))
    features, labels = measure.features(auto.forget_rows)
    retained_features, retained_labels = measure.features(auto.retained)  # fewer rows than neighbour_rows: all
    assert np.array_equal(
        auto.unsupported, unsupported_by_neighbours(features, labels, retained_features, retained_labels, k=10)
    )
    logits, held_labels = measure.predict(holdout)
    assert auto.misfit_loss == misfit_loss(
        measure.row_losses(holdout), logits.argmax(-1).numpy() == held_labels.numpy()
    )
    auto.unsupported = np.array([True, False, False, True, False, False])  # known flags for the loss below
    auto.misfit_loss = 5.0
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a damaged model, so that the repair runs
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=noise).to(p.device) * p.abs().mean())
    assert measure.accuracy(auto.retained_sample) < auto.original_accuracy - 5
    after_subtraction = measure.row_losses(auto.forget_rows)
    _repair(trainer, auto, after_subtraction)
    assert repairs and isinstance(repairs[-1], HoldUnseenLoss) and repairs[-1].data is auto

    # the repair's loss: the retained rows' loss plus the hinge on a batch of forget rows
    hold = HoldUnseenLoss(
        trainer.model, auto, after_subtraction, measure, trainer.args.per_device_train_batch_size, trainer.args.seed
    )
    retained = trainer.data_collator([trainer._rows(auto.retained)[i] for i in range(8)])
    retained.pop("dataset_id", None)  # the repair keeps the ids out of the model
    retained = trainer._prepare_inputs(retained)  # onto the model's device
    total = hold(trainer.model(pixel_values=retained["pixel_values"]), retained["labels"])
    base = torch.nn.functional.cross_entropy(
        trainer.model(pixel_values=retained["pixel_values"])["logits"], retained["labels"]
    )
    order = torch.randperm(6, generator=torch.Generator().manual_seed(trainer.args.seed)).tolist()
    rows = [auto.forget_rows[i] for i in order]
    losses = torch.nn.functional.cross_entropy(
        trainer.model(pixel_values=torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]).to(base.device))[
            "logits"
        ],
        torch.tensor([int(r["labels"]) for r in rows], device=base.device),
        reduction="none",
    )
    targets = unseen_targets(
        losses.detach().cpu().numpy(),
        after_subtraction[order],
        auto.held_out_losses,
        auto.unsupported[order],
        auto.misfit_loss,
    )
    assert (targets[auto.unsupported[order]] >= 5.0).all()
    hinge = torch.relu(torch.as_tensor(targets, dtype=losses.dtype, device=losses.device) - losses).mean()
    assert torch.allclose(total, base + hinge, rtol=1e-5, atol=1e-6)

    # a class request: no held-out counterpart, a plain repair
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    _reset(trainer, theta)
    auto = _data(trainer, class_ids, need_holdout=True, hold_unseen=True)  # as forget asks
    _hold(trainer, auto, class_ids)
    assert auto.classes == [1] and auto.forget_rows is None
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=noise).to(p.device) * p.abs().mean())
    repairs.clear()
    auto.original_accuracy = 0.0  # back from the start: a class's repair still runs its whole budget
    steps, back = _repair(trainer, auto)
    assert repairs and all(kind is None for kind in repairs)
    assert steps == repair_budget(auto.planned_steps) and back


def test_the_unseen_hold_on_a_text_model(tmp_path):
    """Padded token rows go through the hold's own batches (the trainer's collator, ids dropped)."""
    train = text_dataset(24, seed=0).add_column("dataset_id", list(range(24)))
    holdout = text_dataset(12, seed=1)
    args = tiny_config(tmp_path, num_train_epochs=2, learning_rate=5e-3)
    trainer = AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=train, eval_dataset=holdout)
    trainer.train()
    ids = np.array([1, 4, 9])
    measure = _measure(trainer)
    auto = _data(trainer, ids, need_holdout=True, hold_unseen=True)
    _hold(trainer, auto, ids)
    after_subtraction = measure.row_losses(auto.forget_rows)
    assert len(after_subtraction) == 3 and len(auto.held_out_losses) == 12
    hold = HoldUnseenLoss(trainer.model, auto, after_subtraction, measure, 4, trainer.args.seed)
    retained = trainer.data_collator([trainer._rows(auto.retained)[i] for i in range(4)])
    retained.pop("dataset_id", None)
    retained = trainer._prepare_inputs(retained)  # onto the model's device
    labels = retained.pop("labels")
    outputs = trainer.model(**retained)
    base = torch.nn.functional.cross_entropy(outputs.logits, labels)
    total = hold(outputs, labels)
    assert torch.isfinite(total) and total >= base
    report = trainer.forget(ids)
    assert report.forgotten == [1, 4, 9] and trainer.forgotten_ids() == [1, 4, 9]


def test_whole_class_is_detected_and_held_out_harm_counts_only_kept_classes(trained):
    trainer, train, holdout, theta = trained
    _reset(trainer, theta)
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    auto = _data(trainer, class_ids, need_holdout=True)
    assert auto.classes == [1]
    assert 1 not in set(np.asarray(auto.holdout["labels"]).tolist())
    assert len(auto.retained) == int((labels != 1).sum())
    assert _data(trainer, class_ids, need_holdout=True, whole_class=False).classes == []
    assert _data(trainer, class_ids[:-1], need_holdout=True).classes == []


def test_auto_refuses_without_its_data_and_changes_nothing(trained, tmp_path):
    trainer, train, holdout, theta = trained
    _reset(trainer, theta)
    no_holdout = AmnesiacTrainer(model=trainer.model, args=trainer.args, train_dataset=train)
    with pytest.raises(ForgetRequestError, match="holdout"):
        no_holdout.forget([int(train["dataset_id"][0])])
    no_train = AmnesiacTrainer(model=trainer.model, args=trainer.args, eval_dataset=holdout)
    with pytest.raises(ForgetRequestError, match="train_dataset"):
        no_train.forget([int(train["dataset_id"][0])])
    unlabeled = train.remove_columns("labels")
    with pytest.raises(ForgetRequestError, match="labels"):
        AmnesiacTrainer(model=trainer.model, args=trainer.args, train_dataset=unlabeled).forget([100], holdout=holdout)
    with pytest.raises(ForgetRequestError, match="whole_class=True"):
        trainer.forget([int(train["dataset_id"][0])], whole_class=True)
    for bad in (-1, 100, "5", True):
        with pytest.raises(ForgetRequestError, match="max_harm"):
            trainer.forget([int(train["dataset_id"][0])], config=ForgetConfig(max_harm=bad))
    with pytest.raises(ForgetRequestError, match="config must be a ForgetConfig"):
        trainer.forget([int(train["dataset_id"][0])], config={"max_harm": 10})
    with pytest.raises(ForgetRequestError, match="scale must be"):
        trainer.forget([int(train["dataset_id"][0])], scale="Auto")
    with pytest.raises(ForgetRequestError, match="repair_steps must be"):
        trainer.forget([int(train["dataset_id"][0])], repair_steps="later")
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    only_that_class = holdout.filter(lambda r: int(r["labels"]) == 1)
    with pytest.raises(ForgetRequestError, match="no rows of the classes the request keeps"):
        trainer.forget(class_ids, holdout=only_that_class)
    with pytest.raises(ForgetRequestError, match="no training row"):
        trainer.forget(train["dataset_id"])
    assert torch.equal(_weights(trainer), theta) and trainer.forgotten_ids() == []
    # the automatic repair holds a per-sample request's rows to held-out ones; a class needs no holdout
    with pytest.raises(ForgetRequestError, match='repair_steps="auto" measures held-out rows'):
        no_holdout.forget([int(train["dataset_id"][0])], scale=1.0)
    assert torch.equal(_weights(trainer), theta) and trainer.forgotten_ids() == []
    no_holdout.forget(class_ids, scale=1.0)
    _reset(trainer, theta)
    # the exact subtraction needs none of that data
    report = no_holdout.forget([int(train["dataset_id"][0])], scale=1.0, repair_steps=0)
    assert report.scale == 1.0 and report.repair_steps == 0 and report.calibration == []


def _script_attempts(monkeypatch, outcomes, recognised, limits=None):
    """Script forget's attempts (run them with `config=UNWEIGHTED`): scale 1.5 * max_harm / 40, each
    repair returns the next (steps, restored) of `outcomes` without touching the weights, and the
    class check after it the next of `recognised`; every max_harm tried is appended to `limits`."""
    outcomes, recognised = iter(outcomes), iter(recognised)

    def choice_by_harm(self, max_harm):
        if limits is not None:
            limits.append(max_harm)
        return ScaleChoice(scale=max_harm / 40.0 * 1.5, trace=[])

    monkeypatch.setattr(ForgetPolicy, "choose_scale", choice_by_harm)
    monkeypatch.setattr(ModelAttempts, "repair", lambda self: next(outcomes))
    monkeypatch.setattr(ModelAttempts, "recognised", lambda self, steps: next(recognised) if steps else None)


def test_an_attempt_that_brings_the_class_back_yields_to_an_earlier_one_that_kept_it_forgotten(
    trained, monkeypatch, caplog
):
    """Attempt 1's repair runs out of budget with the class still forgotten; attempt 2 (half the
    harm) is repaired but brings the class back: forget keeps attempt 1, exactly as made directly."""
    trainer, train, holdout, theta = trained
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    # the class after each attempt's repair: forgotten, then back
    _script_attempts(monkeypatch, outcomes=[(7, False), (3, True)], recognised=[0.0, 50.0])
    _reset(trainer, theta)
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids, config=UNWEIGHTED)
    kept = _weights(trainer)
    assert report.scale == 1.5 and report.repair_steps == 7
    assert "brought the removed class back" in caplog.text and "keeps the earlier attempt at scale 1.5" in caplog.text
    _reset(trainer, theta)
    trainer.forget(class_ids, scale=1.5, repair_steps=0)  # attempt 1, made directly (its repair changed nothing)
    assert torch.equal(_weights(trainer), kept)

    # with no earlier attempt that kept the class forgotten, the repaired attempt is tried again at
    # twice the scale (below); when every doubling brings the class back too, it stays, with the warning
    _script_attempts(monkeypatch, outcomes=[(7, False)] + [(3, True)] * 4, recognised=[30.0, 50.0, 40.0, 40.0, 40.0])
    _reset(trainer, theta)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids, config=UNWEIGHTED)
    assert report.scale == 0.75 and report.repair_steps == 3
    assert "keeps the earlier attempt" not in caplog.text and "the class is not forgotten" in caplog.text
    tried = [f"trying again from the original weights at scale {s:.3g}." in caplog.text for s in (1.5, 3.0, 6.0)]
    assert tried == [True] * CLASS_RETRIES


def test_a_class_the_mended_repair_brings_back_is_tried_again_at_twice_the_scale(trained, monkeypatch, caplog):
    """Attempt 1's repair brings retained accuracy back and the removed class with it: forget tries
    again from the original weights at twice the scale until the class stays forgotten, and keeps
    that attempt, exactly as made directly, even though its repair ran out of budget (warned)."""
    trainer, train, holdout, theta = trained
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    _script_attempts(monkeypatch, outcomes=[(3, True), (4, True), (5, False)], recognised=[50.0, 20.0, 0.0])
    _reset(trainer, theta)
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids, config=UNWEIGHTED)
    kept = _weights(trainer)
    assert report.scale == 6.0 and report.repair_steps == 5
    assert "trying again from the original weights at scale 3." in caplog.text
    assert "keeps the attempt at scale 6, which keeps the class forgotten" in caplog.text
    assert "the class is not forgotten" not in caplog.text
    _reset(trainer, theta)
    trainer.forget(class_ids, scale=6.0, repair_steps=0)  # the doubled attempt, made directly
    assert torch.equal(_weights(trainer), kept)

    # never above the ceiling: from 5, one try at the ceiling (8.94 at keep_fraction 0.2), then the first attempt stays
    ceiling = scale_ceiling(0.2)
    _script_attempts(monkeypatch, outcomes=[(3, True)] * 2, recognised=[50.0, 50.0])
    monkeypatch.setattr(ForgetPolicy, "choose_scale", lambda *args: ScaleChoice(scale=5.0, trace=[]))
    _reset(trainer, theta)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids, config=UNWEIGHTED)
    assert math.isclose(report.scale, 5.0) and f"at scale {ceiling:.3g}." in caplog.text
    assert caplog.text.count("trying again from the original weights at scale") == 1
    assert "the class is not forgotten" in caplog.text


def test_the_search_stops_at_the_first_attempt_that_brings_the_class_back(trained, monkeypatch, caplog):
    """Attempts 1 and 2 run out of repair budget with the class forgotten, attempt 3 (a smaller
    scale) brings it back: forget makes no fourth attempt and keeps attempt 2, the latest that
    kept the class forgotten, exactly as made directly."""
    trainer, train, holdout, theta = trained
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    limits = []
    outcomes = [(7, False), (6, False), (5, False), (3, True)]
    _script_attempts(monkeypatch, outcomes, recognised=[0.0, 0.0, 6.4, 7.2], limits=limits)
    _reset(trainer, theta)
    with caplog.at_level(logging.WARNING):
        report = trainer.forget(class_ids, config=UNWEIGHTED)
    kept = _weights(trainer)
    assert limits == [40.0, 20.0, 10.0]
    assert report.scale == 0.75 and report.repair_steps == 6
    assert "the repair at scale 0.375 brought the removed class back" in caplog.text
    assert "keeps the earlier attempt at scale 0.75" in caplog.text
    assert "the class is not forgotten" not in caplog.text
    _reset(trainer, theta)
    trainer.forget(class_ids, scale=0.75, repair_steps=0)  # attempt 2, made directly
    assert torch.equal(_weights(trainer), kept)


@pytest.mark.parametrize("with_loss_func", [False, True], ids=["model_loss", "compute_loss_func"])
def test_the_repair_divides_its_loss_by_the_accumulation_steps(tmp_path, with_loss_func):
    """One repair step of 2 microbatches of 4 rows moves the weights as one batch of 8 does, with the
    model's own loss and with a per-batch mean given as `compute_loss_func` (as the hold's is)."""

    def mean_cross_entropy(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs["logits"], labels)

    rows = image_dataset(8, classes=3, seed=0, with_ids=True)
    moved = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = TinyCNN()
        args = tiny_config(
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
            max_grad_norm=0.0,
        )
        repair_module.finetune(model, rows, 1, args, compute_loss_func=mean_cross_entropy if with_loss_func else None)
        moved.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu())
    assert torch.allclose(moved[0], moved[1], rtol=1e-5, atol=1e-6)


def test_the_holds_retained_term_is_label_smoothed_as_the_trainer_would(trained):
    """With the hinge at zero (targets far below every loss), the hold's loss is the retained batch's
    cross-entropy, smoothed with `label_smoothing_factor` exactly as the Trainer smooths its own."""
    from transformers.trainer_pt_utils import LabelSmoother

    trainer, train, holdout, theta = trained
    _reset(trainer, theta)
    measure = _measure(trainer)
    ids = [int(i) for i in train["dataset_id"][:6]]
    auto = _data(trainer, ids, need_holdout=True, hold_unseen=True)
    _hold(trainer, auto, ids)
    auto.unsupported, auto.misfit_loss = None, 0.0
    auto.held_out_losses = np.zeros_like(auto.held_out_losses)  # every target 0: the hinge is 0
    retained = trainer.data_collator([trainer._rows(auto.retained)[i] for i in range(8)])
    retained.pop("dataset_id", None)
    retained = trainer._prepare_inputs(retained)
    labels = retained.pop("labels")
    with torch.no_grad():
        outputs = trainer.model(**retained)
        for smoothing in (0.0, 0.1):
            hold = HoldUnseenLoss(trainer.model, auto, np.zeros(6), measure, 4, 0, label_smoothing=smoothing)
            expected = LabelSmoother(epsilon=0.1)(outputs, labels) if smoothing else None
            if expected is None:
                expected = torch.nn.functional.cross_entropy(outputs["logits"], labels)
            assert torch.allclose(hold(outputs, labels), expected, rtol=1e-6, atol=1e-7)
            assert torch.allclose(hold(outputs["logits"], labels), expected, rtol=1e-6, atol=1e-7)  # a bare tensor
