"""The adversarial suite's table (`adversary.PROMISES`) names every case, and every case is in it."""

import re
from pathlib import Path

from adversary import PROMISES


def test_the_promise_table_names_every_case():
    found = {}
    for path in sorted(Path(__file__).parent.glob("test_adversarial_k*.py")):
        for name, kind in re.findall(r"^def (test_k(\d+)_\w+)", path.read_text(), flags=re.M):
            assert path.name.startswith(f"test_adversarial_k{kind}_"), (path.name, name)
            found.setdefault(int(kind), []).append(name)
    assert sorted(PROMISES) == list(range(1, 12)) == sorted(found)
    for kind, (promise, names) in PROMISES.items():
        assert promise and sorted(names) == sorted(found[kind]), kind
