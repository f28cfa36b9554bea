"""Every optimizer a recipe may name checkpoints pickle-free and resumes exactly where it stopped.

Each run is the user's: the recipe's optimizer trains the tiny twin (bitsandbytes' 8-bit and paged
optimizers run on CPU), a real SIGINT stops it after a checkpoint, and the resumed run must end
bit-for-bit where an uninterrupted one does.
"""

import copy
import pickle
import typing

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import recipe_for
from qlora.checkpoint import load_state, save_state
from qlora.config import TrainSection
from qlora.errors import RunInterrupted
from qlora.train import train
from test_reliability import ROWS, SignalAt, adapter, metrics

BNB = "__bnb_optimizer_quant_state__"
# the state each optimizer must keep: (a key its checkpoint holds, that tensor's dtype), so a test of
# "adamw_8bit" fails if the trainer silently ran another optimizer
SIGNATURE = {
    "adamw_torch": ("exp_avg", torch.float32),
    "adamw_8bit": (f"{BNB}.state1", torch.uint8),
    "paged_adamw_8bit": (f"{BNB}.state1", torch.uint8),
    "paged_adamw_32bit": (f"{BNB}.state1", torch.float32),
    "adafactor": ("exp_avg_sq_row", torch.float32),  # factored second moment of a matrix
}


def bits(tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a, b, path="state_dict"):
    """Same structure, types, tensor dtypes, shapes and bits, all the way down."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        assert torch.equal(bits(a), bits(b)), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"  # NaN equals NaN here


class OptimizerStates(TrainerCallback):
    """Copies of the optimizer's state_dict: as each checkpoint is saved, and as a run (re)starts its loop."""

    def __init__(self):
        self.saved, self.first = {}, None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.first is None:  # a resumed run has loaded its checkpoint by now
            self.first = copy.deepcopy(optimizer.state_dict())

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self.saved[state.global_step] = copy.deepcopy(optimizer.state_dict())


def test_every_optimizer_the_schema_allows_is_tested():
    allowed = typing.get_args(TrainSection.model_fields["optimizer"].annotation)
    assert set(allowed) - {"auto"} == set(SIGNATURE)  # auto resolves to one of them


def test_save_state_round_trips_any_nesting_exactly(tmp_path):
    shared = torch.arange(6, dtype=torch.float32)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3, dtype=torch.bfloat16),
                      "nested": {"q": torch.arange(4, dtype=torch.uint8), "map": shared, "n": None}},
                  1: {"step": 7, "map": shared, "ids": torch.tensor(5, dtype=torch.int64), "empty": torch.zeros(0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "eps": (1e-30, 1e-3), "flag": True, "name": "a.b",
                          "t_alpha": None, "nan": float("nan"), "params": [0, 1]}],
        "tricky": {"__tensor__": "not a reference", (1, "x"): [()], None: -0.0},
    }
    save_state(state, tmp_path / "s.safetensors", tmp_path / "s.json")
    loaded = load_state(tmp_path / "s.safetensors", tmp_path / "s.json")
    assert_identical(state, loaded)
    assert loaded["state"][0]["nested"]["map"] is loaded["state"][1]["map"]  # stored once, shared again
    assert len(load_file(tmp_path / "s.safetensors")) == 6


@pytest.mark.parametrize("optimizer", list(SIGNATURE))
def test_interrupted_and_resumed_equals_uninterrupted(optimizer, tmp_path, tiny_model, monkeypatch):
    def recipe(name):
        (tmp_path / name).mkdir(exist_ok=True)
        # 6 rows, batch 2: an epoch is 3 steps, so the stop at step 4 is mid-epoch
        return recipe_for(tmp_path / name, tiny_model("gemma"), ROWS,
                          train={"optimizer": optimizer, "max_steps": 6, "save_steps": 3, "logging_steps": 1})

    full = train(recipe("full"))
    stopped = OptimizerStates()
    with pytest.raises(RunInterrupted, match="SIGINT after step 4"):
        train(recipe("resumed"), callbacks=[SignalAt(4), stopped])
    checkpoint = tmp_path / "resumed/run/checkpoints/checkpoint-4"

    files = list(checkpoint.iterdir())
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".md"}
    assert not [p for p in files if p.read_bytes()[:1] == b"\x80" or p.read_bytes()[:2] == b"PK"]  # pickle, torch zip
    key, dtype = SIGNATURE[optimizer]
    tensors = load_file(checkpoint / "optimizer.safetensors")
    assert [name for name, t in tensors.items() if name.endswith(key) and t.dtype == dtype], sorted(tensors)

    def refuse(*args, **kwargs):
        raise AssertionError("resuming used pickle")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    resumed_states = OptimizerStates()
    resumed = train(recipe("resumed"), callbacks=[resumed_states])
    assert_identical(stopped.saved[4], resumed_states.first)

    a, b = adapter(full / "adapter"), adapter(resumed / "adapter")
    assert a.keys() == b.keys()
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{optimizer}: max abs difference between the adapters: {difference:.3g}")
    assert difference == 0.0
    assert [m["step"] for m in metrics(resumed)] == list(range(1, 7))
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(full)]
