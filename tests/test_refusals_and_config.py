"""Configurations that cannot be recorded exactly are refused before training, with clear errors."""

import dataclasses

import pytest
import torch
from tiny import TinyCNN, image_dataset, tiny_config
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_amnesia import (
    AmnesiaConfig,
    AmnesiacTrainer,
    ConfigError,
    StoreReader,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    UnsupportedTrainingError,
)
from hf_amnesia.store.journal import weights_fingerprint


def _args(tmp_path, **kw):
    return tiny_config(tmp_path, **kw)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("keep_fraction", 0.0, "keep_fraction"),
        ("keep_fraction", 1.5, "keep_fraction"),
        ("keep_fraction", -0.1, "keep_fraction"),
        ("store_dtype", "int8", "store_dtype"),
        ("keep_seed", -1, "keep_seed"),
        ("tail_tolerance", 0.0, "tail_tolerance"),
        ("id_column", "", "id_column"),
    ],
)
def test_config_validation_names_the_field(tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        _args(tmp_path, **{field: value})


def test_store_dir_default_is_private_to_uploads(tmp_path):
    args = _args(tmp_path)
    assert args.store_dir == str(tmp_path / "_amnesia_store")
    # Trainer.push_to_hub uploads output_dir with these ignore patterns; the store matches "_*".
    import fnmatch
    import inspect

    source = inspect.getsource(Trainer.push_to_hub)
    assert '"_*"' in source
    assert fnmatch.fnmatch("_amnesia_store/manifest.json".split("/")[0], "_*")


def test_plain_training_arguments_are_accepted(tmp_path):
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=3e-3)
    trainer = AmnesiacTrainer(model=TinyCNN(), args=plain)
    assert isinstance(trainer.args, AmnesiaConfig) and trainer.args.learning_rate == 3e-3


def test_gradient_checkpointing_is_refused(tmp_path):
    with pytest.raises(UnsupportedTrainingError, match="gradient_checkpointing"):
        AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path, gradient_checkpointing=True))


def test_batchnorm_is_refused_with_the_fix(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModelError, match="ModuleValidator.fix"):
        AmnesiacTrainer(model=model, args=_args(tmp_path))


def test_fsdp_is_refused(tmp_path):
    with pytest.raises(UnsupportedTrainingError, match="FSDP"):
        _args(tmp_path, fsdp="full_shard")


def test_deepspeed_is_refused(tmp_path):
    with pytest.raises(UnsupportedTrainingError, match="DeepSpeed"):
        _args(tmp_path, deepspeed={"zero_optimization": {"stage": 2}})
    args = _args(tmp_path)  # enabled after the config was made: the trainer checks again
    object.__setattr__(args, "deepspeed", {"zero_optimization": {"stage": 2}})
    with pytest.raises(UnsupportedTrainingError, match="DeepSpeed"):
        AmnesiacTrainer(model=TinyCNN(), args=args)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "SGD"),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01), "L2"),
        (lambda ps: torch.optim.AdamW(ps, lr=0.1, amsgrad=True), "amsgrad"),
    ],
    ids=["sgd", "adam_l2", "amsgrad"],
)
def test_unsupported_optimizers_are_refused_before_training(tmp_path, make, match):
    model = TinyCNN()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = AmnesiacTrainer(
        model=model, args=_args(tmp_path), train_dataset=image_dataset(8), optimizers=(make(model.parameters()), None)
    )
    with pytest.raises(UnsupportedOptimizerError, match=match):
        trainer.train()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters()))
    assert not (tmp_path / "_amnesia_store" / "shard-00000.rows").exists()


def test_adam_without_decay_and_adam_decoupled_are_accepted(tmp_path):
    for i, make in enumerate(
        [
            lambda ps: torch.optim.Adam(ps, lr=1e-2),
            lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        ]
    ):
        model = TinyCNN()
        trainer = AmnesiacTrainer(
            model=model,
            args=_args(tmp_path / str(i)),
            train_dataset=image_dataset(8),
            optimizers=(make(model.parameters()), None),
        )
        trainer.train()
        assert len(StoreReader(tmp_path / str(i) / "_amnesia_store").all_ids()) == 8


def test_manifest_wins_and_conflicts_are_errors(tmp_path):
    first = AmnesiacTrainer(
        model=TinyCNN(),
        args=_args(tmp_path, keep_fraction=0.2, store_dtype="bfloat16", keep_seed=5),
        train_dataset=image_dataset(8),
    )
    first.train()
    # Unset fields take the store's values (the recorded model trains further into its store).
    again = AmnesiacTrainer(model=first.model, args=_args(tmp_path), train_dataset=image_dataset(8))
    again.train()
    manifest = StoreReader(tmp_path / "_amnesia_store").manifest
    assert (manifest.keep_fraction, manifest.dtype, manifest.seed) == (0.2, "bfloat16", 5)
    for field, value in [("keep_fraction", 0.3), ("store_dtype", "float16"), ("keep_seed", 6)]:
        clash = AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path, **{field: value}), train_dataset=image_dataset(8))
        with pytest.raises(ConfigError, match=field):
            clash.train()


def test_frozen_parameters_are_not_recorded(tmp_path):
    model = TinyCNN()
    model.conv.weight.requires_grad_(False)
    model.conv.bias.requires_grad_(False)
    trainer = AmnesiacTrainer(model=model, args=_args(tmp_path, keep_fraction=1.0), train_dataset=image_dataset(8))
    trainer.train()
    manifest = StoreReader(tmp_path / "_amnesia_store").manifest
    assert "conv.weight" not in manifest.layout.names
    assert manifest.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_duplicated_or_non_integer_id_column_is_refused(tmp_path):
    from datasets import Dataset

    data = image_dataset(8)[:8]
    dup = Dataset.from_dict({**{k: v.tolist() for k, v in data.items()}, "dataset_id": [1, 1, 2, 3, 4, 5, 6, 7]})
    with pytest.raises(UnsupportedTrainingError, match="duplicated"):
        AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path), train_dataset=dup)
    floats = Dataset.from_dict({**{k: v.tolist() for k, v in data.items()}, "dataset_id": [0.5] * 8})
    with pytest.raises(UnsupportedTrainingError, match="integer"):
        AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path), train_dataset=floats)


def test_config_fields_keep_their_names():
    names = {f.name for f in dataclasses.fields(AmnesiaConfig)}
    assert {"keep_fraction", "store_dir", "store_dtype", "id_column", "keep_seed"} <= names


def test_second_train_on_the_same_trainer_is_refused_and_a_new_trainer_continues(tmp_path):
    """The first run's Adam momentum would move the weights unattributed: refused before any step."""
    torch.manual_seed(0)
    model, data = TinyCNN(), image_dataset(16)
    args = _args(tmp_path, num_train_epochs=1)
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedTrainingError, match="new AmnesiacTrainer"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    AmnesiacTrainer(model=model, args=args, train_dataset=data).train()  # continues into the same store
    manifest = StoreReader(args.store_dir).manifest
    assert manifest.final_weights == weights_fingerprint(manifest.layout.params_of(model))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_every_problem_of_a_model_and_its_training_is_reported_at_once(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModelError) as caught:
        AmnesiacTrainer(model=model, args=_args(tmp_path, gradient_checkpointing=True))
    message = str(caught.value)
    assert message.startswith("3 problems:")
    assert "1. 1 is a BatchNorm1d" in message and "2. 3 is a BatchNorm1d" in message
    assert "3. gradient_checkpointing=True" in message


def test_every_problem_of_an_optimizer_is_reported_at_once():
    from hf_amnesia.validate import optimizer_problems

    layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
    groups = [{"params": layers[0].parameters()}, {"params": layers[1].parameters()}]
    problems = optimizer_problems(torch.optim.Adam(groups, lr=0.1, amsgrad=True, weight_decay=0.1))
    assert [p.error for p in problems] == [UnsupportedOptimizerError] * 2  # one line per kind, not per group
    assert "amsgrad" in problems[0].message and "L2 term" in problems[1].message


def test_forget_config_names_every_bad_field():
    from hf_amnesia import ForgetConfig, ForgetRequestError

    with pytest.raises(ForgetRequestError) as caught:
        ForgetConfig(max_harm="5", harm_retries=-1, neighbours=0, hold_unseen=1)
    message = str(caught.value)
    for field in ("max_harm", "harm_retries", "neighbours", "hold_unseen"):
        assert field in message
    for bad in ({"ceiling_factor": 0.0}, {"repair_share": -0.1}, {"class_accuracy_target": 100.0}):
        with pytest.raises(ForgetRequestError, match=next(iter(bad))):
            ForgetConfig(**bad)
    assert ForgetConfig(harm_retries=0).harm_retries == 0  # no retry is a valid policy


def test_the_launch_is_checked_after_the_trainer_set_it_up():
    from hf_amnesia.validate import launch_problems

    assert launch_problems(sharded=False, n_gpu=1) == []  # one process, one device (or a model placed across GPUs)
    (problem,) = launch_problems(sharded=False, n_gpu=2)
    assert problem.error is UnsupportedTrainingError and "2 GPUs in one process" in problem.message
    assert [p.message.split()[0] for p in launch_problems(sharded=True, n_gpu=2)] == ["FSDP", "2"]
