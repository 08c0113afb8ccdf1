"""recipes/lm_canaries.py: exposure against a model whose preferences are known, and both regimes
end to end on tiny settings."""

import json
import math
from itertools import combinations

import pytest
import torch
from torch import nn

from recipes import lm_canaries

pytest.importorskip("peft")


class Prefers(nn.Module):
    """Logits that favour, at every position, the next character of one fixed text."""

    def __init__(self, tokenizer, text):
        super().__init__()
        self.target = torch.tensor(tokenizer.encode(text))
        self.vocab = len(tokenizer)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        length = input_ids.shape[1]
        logits = torch.zeros(len(input_ids), length, self.vocab)
        following = self.target[1:length]
        logits[:, torch.arange(len(following)), following] = 5.0
        return type("Out", (), {"logits": logits})()


def test_exposure_is_the_secrets_rank_among_every_candidate():
    """Against a model that prefers secret 1234: 1234 ranks first (exposure log2 10^4); 5678 differs
    in all four digits, so every candidate with fewer wrong digits ranks above it."""
    tokenizer = lm_canaries.CharTokenizer()
    model = Prefers(tokenizer, lm_canaries.canary_prefix(3) + lm_canaries.digits_text(1234))
    assert lm_canaries.exposure(model, tokenizer, 3, 1234) == pytest.approx(math.log2(10**4))
    better = sum(len(list(combinations(range(4), k))) * 9**k for k in range(4))  # 0-3 wrong digits
    assert better == 3439
    expected = math.log2(10**4) - math.log2(better + 1)
    assert lm_canaries.exposure(model, tokenizer, 3, 5678) == pytest.approx(expected)


TINY = ["--use_cpu", "--seq_len", "32", "--max_rows", "80", "--canaries", "2", "--canary_copies", "2",
        "--num_train_epochs", "1", "--hidden", "16", "--per_device_train_batch_size", "16"]  # fmt: skip


def test_the_canary_recipe_runs_every_method(tmp_path):
    argv = [*TINY, "--pretrain_epochs", "1", "--output_dir", str(tmp_path)]
    out = lm_canaries.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())["secrets"]
    assert set(results) == set(lm_canaries.METHODS) == set(out["results"])
    for name, row in results.items():
        assert 0 <= row["exposure"] <= row["exposure_max"] <= math.log2(10**4) + 1e-9, name
        assert math.isfinite(row["heldout_ppl"]) and row["heldout_ppl"] > 1, name
        assert row["seconds"] >= 0 and row["storage_bytes"] >= 0, name
    assert results["hf_amnesia_lora"]["scale"] > 0 and results["hf_amnesia"]["scale"] > 0
    assert results["hold_only"]["scale"] == 0 and results["hold_only"]["storage_bytes"] == 0
    assert results["hf_amnesia_lora"]["storage_bytes"] > 0
    facts = out["run"]
    assert facts["copies"] == [1, 2] and facts["canary_rows"] == 3
    assert facts["lora_trainable_params"] < facts["params"] / 2  # only the adapter is trained and recorded
    assert (tmp_path / "results.md").read_text().startswith("| method |")
    assert (tmp_path / "results.png").stat().st_size > 0
    assert results["retrain"]["exposure_gap"] == 0 and results["original"]["ppl_change_pct"] == 0
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 42
    agg = lm_canaries.write_aggregate([str(tmp_path), str(tmp_path)], str(tmp_path / "agg"))
    assert agg["hf_amnesia"]["exposure"]["n"] == 2
    paired = json.loads((tmp_path / "agg" / "paired.json").read_text())["secrets"]
    assert paired["finetune"]["n"] == 2 and "hf_amnesia_lora" not in paired  # the reference is not a baseline
