"""Shared fixtures: a tiny backdoored digits model (trained once per session) and the shared data path."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NETMEND_QUIET", "1")
# One intra-op thread for the whole session: the test machine's cores are shared (two threads beside another job
# are many times slower), and results that must not depend on batching (routing counts by chunk) are exact only
# when batched kernels do not split their sums across threads.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data folder {SHARED_DATA} (absent in a user's fresh clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits():
    from netmend.data.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def backdoored(digits):
    """(model, info) — a small CNN on 8×8 digits with a 2×2 BadNets trigger, target 0."""
    from netmend.data.triggers import TriggerSpec
    from netmend.train import TrainConfig, train_backdoored

    torch.manual_seed(0)
    return train_backdoored("digits", "small-cnn", TriggerSpec(kind="badnets", size=2), target=0, poison_rate=0.1,
                            cfg=TrainConfig(epochs=20, seed=0), data=digits)


@pytest.fixture()
def defect(backdoored, digits):
    from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info

    _, info = backdoored
    return backdoor_from_info(info, BackdoorOptions(pairs=2, repair_fraction=0.1), data=digits)


def import_user_module(root: Path, name: str, source: str):
    """Write a user's module `name`.py into `root` and import it, as `netmend repair NAME:factory` would find it
    (root on sys.path only while importing)."""
    (root / f"{name}.py").write_text(source)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(root))
