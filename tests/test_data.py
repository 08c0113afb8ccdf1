import random

import numpy as np
import torch
from torch.utils.data import Dataset

from hf_amnesia.data import dataset_ids, ids_of_label, labels_of, with_dataset_ids


class _RandomTransform(Dataset):
    """Dict rows whose reading draws from Python's, NumPy's and torch's global random streams,
    as a random augmentation does."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        noise = torch.rand(1) + np.random.rand() + random.random()
        return {"x": noise, "labels": index % 2}


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_reading_the_ids_of_a_torch_dataset_leaves_the_random_streams_as_they_were():
    dataset = with_dataset_ids(_RandomTransform(), "dataset_id")
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = _draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert dataset_ids(dataset, "dataset_id").tolist() == list(range(6))
    assert ids_of_label(_RandomTransform(), 1, label_column="labels").tolist() == [1, 3, 5]
    assert labels_of(dataset).tolist() == [0, 1, 0, 1, 0, 1]
    assert _draws() == expected
    # reading rows directly still draws (the streams are kept only while the ids are read)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    dataset[0]
    assert _draws() != expected
