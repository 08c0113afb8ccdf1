"""Kind 7: ids are taken as plain integers only, and an empty request changes nothing.

The CLI takes plain decimal digits (`int()` would also take "1_5", "+3", " 7" or "٣"): anything
else exits 2 with a message naming the token, as does an unreadable ids file. The API refuses
every malformed collection with `ForgetRequestError` naming the element at fault. Refused or
empty requests leave every file as it was; duplicated ids collapse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adversary import (
    assert_model_equals_clean_forget,
    audit_records,
    cli,
    copy_case,
    forget_argv,
    hashes,
    load,
    params,
    trainer_for,
)

from hf_amnesia.errors import ForgetRequestError

TOKENS = {
    "underscore": "1_5",
    "plus_sign": "+3",
    "leading_space": " 7",
    "trailing_space": "7 ",
    "arabic_indic_digit": "\u0663",
    "fullwidth_digit": "\uff11",
    "superscript_two": "\u00b2",
    "hex": "0x10",
    "exponent": "1e3",
    "negative": "-1",
    "float": "5.0",
    "word": "seven",
}


@pytest.mark.parametrize("name", list(TOKENS))
def test_k7_cli_refuses_token(tmp_path, capsys, name):
    case = copy_case(tmp_path)
    before = hashes(case.root)
    result = cli(capsys, *forget_argv(case, 2, TOKENS[name]))
    assert result.code == 2 and repr(TOKENS[name]) in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


FILES = {
    "utf16": ("1 2 3".encode("utf-16"), "cannot read the ids file"),
    "latin1_bytes": (b"1 2 \xe9", "cannot read the ids file"),
    "underscore_in_file": (b"2\n1_5\n", "'1_5'"),
    "missing": (None, "cannot read the ids file"),
    "directory": ("dir", "cannot read the ids file"),
}


@pytest.mark.parametrize("name", list(FILES))
def test_k7_cli_refuses_ids_file(tmp_path, capsys, name):
    case = copy_case(tmp_path)
    content, message = FILES[name]
    ids_file = case.out / "ids.txt"
    if content == "dir":
        ids_file.mkdir()
    elif content is not None:
        ids_file.write_bytes(content)
    before = hashes(case.root)
    argv = ["forget", "--model", case.model, "--store", case.store, "--ids-file", ids_file]
    result = cli(capsys, *argv)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


@pytest.mark.parametrize("name", ["no_ids_flag", "empty_ids_file", "blank_ids_file"])
def test_k7_cli_no_ids(tmp_path, capsys, name):
    case = copy_case(tmp_path)
    argv = ["forget", "--model", case.model, "--store", case.store]
    if name == "no_ids_flag":
        argv.append("--ids")
    else:
        ids_file = case.out / "ids.txt"
        ids_file.write_text("" if name == "empty_ids_file" else " \n,\n")
        argv += ["--ids-file", ids_file]
    before = hashes(case.root)
    result = cli(capsys, *argv)
    assert result.code == 2 and "no ids" in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


MALFORMED = {
    "none": None,
    "string": "12",
    "bytes": b"12",
    "list_of_strings": ["3"],
    "float_in_list": [5.0],
    "fraction": [1.5],
    "bool": True,
    "bool_in_list": [True],
    "float": 3.0,
    "nested": [[1, 2], [3, 4]],
    "ragged": [[1], [2, 3]],
    "none_in_list": [None],
    "negative": [-1],
    "float_tensor": torch.tensor([1.0, 2.0]),
    "bool_tensor": torch.tensor([True]),
    "float_array": np.array([1.0, 2.0]),
    "uint64_two_to_63": np.array([2**63], dtype=np.uint64),
    "uint64_max": np.array([2**64 - 1], dtype=np.uint64),
    "two_dimensional_array": np.arange(4).reshape(2, 2),
    "object": object(),
    "dict": {"ids": [1, 2]},
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_k7_api_refuses_malformed_ids(tmp_path, name):
    case = copy_case(tmp_path)
    model = load(case.model)
    trainer = trainer_for(model, case.store, case.out)
    weights = params(model)
    before = hashes(case.root)
    with pytest.raises(ForgetRequestError):
        trainer.forget(MALFORMED[name], scale=1.0, repair_steps=0, save_to=case.model)
    assert hashes(case.root) == before
    assert all(torch.equal(weights[k], v) for k, v in params(model).items())
    assert trainer.forgotten_ids() == []


MIXED = {
    "float_after_int": ([3, 5.0], "5.0", "3.0"),
    "string_after_int": ([1, "7"], "'7'", "1"),
    "float_after_numpy_int": ([np.int64(2), 2.5], "2.5", "2.0"),
    "none_after_int": ([4, None], "None", "4"),
}
BOOL_AFTER_INT = ([4, True], "True", "4")  # np.asarray makes it [4, 1]: id 1 would be forgotten


@pytest.mark.parametrize(
    "mixed",
    [
        *(pytest.param(value, id=name) for name, value in MIXED.items()),
        pytest.param(BOOL_AFTER_INT, id="bool_after_int"),
    ],
)
def test_k7_mixed_list_names_the_culprit(tmp_path, mixed):
    """The review's case: a refused mixed list blamed the wrong element ("float 5.0")."""
    ids, culprit, innocent = mixed
    case = copy_case(tmp_path)
    trainer = trainer_for(load(case.model), case.store, case.out)
    with pytest.raises(ForgetRequestError) as refused:
        trainer.forget(ids, scale=1.0, repair_steps=0, save_to=case.model)
    blamed = str(refused.value).split("got ", 1)[-1].split(" (dtype")[0]  # e.g. "float 5.0"
    assert culprit in blamed and innocent not in blamed, blamed


@pytest.mark.parametrize(
    "ids", [[], np.zeros(0, dtype=np.int64), torch.zeros(0, dtype=torch.int64)], ids=["list", "array", "tensor"]
)
def test_k7_empty_request_changes_nothing(tmp_path, ids):
    case = copy_case(tmp_path)
    model = load(case.model)
    weights = params(model)
    before = hashes(case.root)
    report = trainer_for(model, case.store, case.out).forget(ids, scale=1.0, repair_steps=0, save_to=case.model)
    assert not report.committed and report.request is None and report.forgotten == []
    assert hashes(case.root) == before and audit_records(case.store) == []
    assert all(torch.equal(weights[k], v) for k, v in params(model).items())


@pytest.mark.parametrize("route", ["api", "cli"])
def test_k7_duplicates_collapse(tmp_path, capsys, route):
    case = copy_case(tmp_path)
    if route == "api":
        report = trainer_for(load(case.model), case.store, case.out).forget(
            [3, 3, np.int64(3)], scale=1.0, repair_steps=0, save_to=case.model
        )
        assert report.forgotten == [3] and report.already_forgotten == []
    else:
        result = cli(capsys, *forget_argv(case, 3, 3, "03"))
        assert result.code == 0 and result.json()["forgotten"] == 1, result
    assert_model_equals_clean_forget(case.model, [3])
    assert len(audit_records(case.store)) == 1


def test_k7_cli_commas_and_newlines_served(tmp_path, capsys):
    case = copy_case(tmp_path)
    ids_file = case.out / "ids.txt"
    ids_file.write_text("2, 5\n11\n")
    result = cli(capsys, "forget", "--model", case.model, "--store", case.store, "--ids-file", ids_file)
    assert result.code == 0 and result.json()["forgotten"] == 3, result
    assert_model_equals_clean_forget(case.model, [2, 5, 11])
    assert len(audit_records(case.store)) == 1
