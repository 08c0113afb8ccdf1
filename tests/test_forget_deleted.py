"""forget(ids) after the user deleted the ids' rows: the store does the forgetting, no forgotten row is read."""

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, tiny_config
from torch.utils.data import Dataset

from hf_amnesia import AmnesiacTrainer, ForgetConfig, ForgetRequestError
from hf_amnesia.forgetting import Measurer
from hf_amnesia.forgetting.hold import unseen_targets
from hf_amnesia.forgetting.prepare import gather


class GuardedRows(Dataset):
    """Rows `indices` of `base`; once `armed`, reading a row whose id is in `deleted` fails the test."""

    def __init__(self, base, indices, deleted=(), armed=False):
        self.base, self.indices, self.deleted, self.armed = base, list(indices), set(deleted), armed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        row = self.base[self.indices[index]]
        if self.armed and int(row["dataset_id"]) in self.deleted:
            raise AssertionError(f"forget read the deleted row {int(row['dataset_id'])}")
        return row


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("deleted")
    torch.manual_seed(0)
    data = image_dataset(96, classes=3, seed=0, with_ids=True)
    train, holdout = data.select(range(72)), data.select(range(72, 96))
    seen = GuardedRows(train, range(len(train)))  # what training read; armed once rows are deleted
    args = tiny_config(out, keep_fraction=0.2, num_train_epochs=3, learning_rate=1e-2, per_device_train_batch_size=8)
    trainer = AmnesiacTrainer(model=TinyCNN(), args=args, train_dataset=seen, eval_dataset=holdout)
    trainer.train()
    return trainer, seen, train, holdout, _weights(trainer)


def _weights(trainer):
    return torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().cpu().clone()


def _reset(trainer, theta):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.clone(), trainer.model.parameters())


def _after_deletion(trainer, train, ids, **kwargs):
    """A trainer serving the same model, whose training data no longer holds the rows of `ids`."""
    keep = np.flatnonzero(~np.isin(np.asarray(train["dataset_id"]), ids))
    retained = GuardedRows(train, keep, deleted=ids, armed=True)
    return AmnesiacTrainer(model=trainer.model, args=trainer.args, train_dataset=retained, **kwargs)


def test_a_fixed_forget_is_the_same_with_the_rows_deleted(trained):
    trainer, seen, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][:6]]
    _reset(trainer, theta)
    present = trainer.forget(ids, scale=0.5, repair_steps=3)
    with_rows = _weights(trainer)
    _reset(trainer, theta)
    seen.armed, seen.deleted = True, set(ids)
    try:
        deleted = _after_deletion(trainer, train, ids).forget(ids, scale=0.5, repair_steps=3)
    finally:
        seen.armed = False
    assert deleted.forgotten == present.forgotten == sorted(ids)
    assert deleted.repair_steps == present.repair_steps == 3
    assert torch.equal(_weights(trainer), with_rows)


def test_the_automatic_forget_after_deletion_reads_no_deleted_row_and_is_deterministic(trained):
    trainer, seen, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][10:16]]
    # the dataset training read stays alive beside the new trainer: armed, it fails on any read of a
    # deleted row, so nothing cached from training (or reached through the store) serves their data
    seen.armed, seen.deleted = True, set(ids)
    try:
        results = []
        for _ in range(2):
            _reset(trainer, theta)
            report = _after_deletion(trainer, train, ids, eval_dataset=holdout).forget(ids)
            results.append((report, _weights(trainer)))
    finally:
        seen.armed = False
    (first, after), (second, again) = results
    assert first.forgotten == sorted(ids) and first.scale > 0
    assert (second.scale, second.repair_steps) == (first.scale, first.repair_steps)
    assert torch.equal(after, again) and not torch.equal(after, theta)


def test_a_class_whose_rows_were_deleted_is_told_by_the_holdout(trained):
    trainer, seen, train, holdout, theta = trained
    _reset(trainer, theta)
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    server = _after_deletion(trainer, train, class_ids, eval_dataset=holdout)

    def classes_of(ids=class_ids, whole_class=None):
        """What forget gathers for `ids` (all of them deleted or requested) on the deleted trainer."""
        return gather(
            server.train_dataset,
            id_column="dataset_id",
            seed=0,
            planned_steps=27,
            ids=ids,
            todo=ids,
            forgotten=[],
            holdout=holdout,
            whole_class=whole_class,
            need_holdout=True,
            hold_unseen=True,
            config=ForgetConfig(),
            sequence_rows=lambda dataset: False,  # rows of one class label each
        )

    told = classes_of(whole_class=None)
    assert told.classes == [1]
    measure = Measurer(trainer.model, trainer.data_collator, 8, "dataset_id", trainer._rows)
    assert set(measure.predict(told.class_rows)[1].tolist()) == {1}  # held-out rows of the class
    assert 1 not in set(np.asarray(told.holdout["labels"]).tolist())
    assert classes_of(whole_class=False).classes == []
    # class 1 deleted, class 2's rows present and requested: both classes' rows come from the holdout
    both = np.concatenate([class_ids, np.asarray(train["dataset_id"])[labels == 2]])
    mixed = classes_of(both)
    assert mixed.classes == [1, 2] and set(measure.predict(mixed.class_rows)[1].tolist()) == {1, 2}
    assert classes_of(whole_class=True).classes == [1]
    report = server.forget(class_ids)
    assert report.forgotten == sorted(class_ids.tolist())
    # a class's repair runs its whole budget: a share of the training's steps, not of the rows left
    full = ForgetConfig().repair_budget(trainer._planned_training_steps())
    assert report.repair_steps == full > ForgetConfig().repair_budget(server._planned_training_steps())
    held_out_class = holdout.filter(lambda r: int(r["labels"]) == 1)
    assert measure.accuracy(held_out_class) <= 100.0 / len(held_out_class) + 1e-9  # the class is no longer predicted


def test_deleted_rows_without_a_labelled_holdout_get_a_clear_error_and_change_nothing(trained):
    trainer, seen, train, holdout, theta = trained
    _reset(trainer, theta)
    labels = np.asarray(train["labels"])
    class_ids = np.asarray(train["dataset_id"])[labels == 1]
    no_holdout = _after_deletion(trainer, train, class_ids)
    for kwargs in ({}, {"scale": 1.0}, {"whole_class": True, "scale": 1.0}):
        with pytest.raises(ForgetRequestError, match="have no row in train_dataset.*whole_class=False"):
            no_holdout.forget(class_ids, **kwargs)
    unlabeled = _after_deletion(trainer, train, class_ids, eval_dataset=holdout.remove_columns("labels"))
    with pytest.raises(ForgetRequestError, match="no `labels` or `label` column"):
        unlabeled.forget(class_ids, scale=1.0)
    assert torch.equal(_weights(trainer), theta) and no_holdout.forgotten_ids() == []
    # said to be no class, deleted rows need no holdout: there is nothing of theirs to hold
    report = no_holdout.forget(class_ids[:3], scale=1.0, whole_class=False)
    assert report.forgotten == sorted(class_ids[:3].tolist())
    _reset(trainer, theta)
    assert no_holdout.forget(class_ids, scale=1.0, repair_steps=0).repair_steps == 0  # the exact subtraction
    _reset(trainer, theta)


def test_without_the_cap_the_hold_targets_each_rows_held_out_rank():
    losses = np.array([0.1, 0.5, 0.2, 0.05])
    held_out = np.sort(np.random.default_rng(0).exponential(1.0, size=50))
    quantiles = np.quantile(held_out, (np.argsort(np.argsort(losses)) + 0.5) / 4)
    assert np.allclose(unseen_targets(losses, np.full(4, np.inf), held_out), quantiles)
    assert np.allclose(unseen_targets(losses, losses, held_out), np.minimum(losses, quantiles))


def test_the_store_free_twin_raises_the_forget_rows_loss_toward_held_out_ones(trained):
    """Nothing subtracted: with the cap (and no neighbour vote) the hold has nothing to do; without
    it, the repair runs and raises the forget rows' loss toward their held-out targets, unless it
    stops as soon as retained accuracy is back (`hold_until_met=False`)."""
    trainer, seen, train, holdout, theta = trained
    ids = [int(i) for i in train["dataset_id"][20:30]]
    measure = Measurer(trainer.model, trainer.data_collator, 8, "dataset_id", trainer._rows)
    rows = train.select(range(20, 30))
    _reset(trainer, theta)
    before = measure.row_losses(rows).mean()
    capped = trainer.forget(ids, scale=0.0, config=ForgetConfig(neighbour_vote=False))
    assert capped.repair_steps == 0 and torch.equal(_weights(trainer), theta)
    assert capped.forgotten == [] and trainer.forgotten_ids() == []  # unchanged weights are still the original's
    _reset(trainer, theta)
    twin = trainer.forget(ids, scale=0.0, config=ForgetConfig(hold_cap=False, neighbour_vote=False))
    assert twin.scale == 0.0 and twin.repair_steps > 0
    assert measure.row_losses(rows).mean() > before
    _reset(trainer, theta)
    # stopping as soon as accuracy is back: at scale 0 it never left, so the twin takes no step
    early = dict(hold_cap=False, neighbour_vote=False, hold_until_met=False)
    assert trainer.forget(ids, scale=0.0, config=ForgetConfig(**early)).repair_steps == 0
    assert torch.equal(_weights(trainer), theta)
    _reset(trainer, theta)
