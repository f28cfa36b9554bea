"""train.compile: auto's measured warm-up keeps the faster mode, on compiles and trains as eager does."""

import io
import json
from types import SimpleNamespace

import pytest

import qlora.plan
from qlora import compile as qcompile
from qlora.errors import UserError


def blocks_compiled(model) -> list[bool]:
    return [block._compiled_call_impl is not None for block in qcompile.compiled_blocks(model)]


def warm_up(model, step_seconds: list[float], max_steps: int = 1000) -> list[str]:
    """Drive auto's callback through len(step_seconds) optimizer steps of 100 tokens each, with a stand-in clock
    under which step i takes step_seconds[i]; what it said."""
    said, now = [], [0.0]
    callback = qcompile.CompileCallback(model, "auto", said.append, clock=lambda: now[0])
    state = SimpleNamespace(num_input_tokens_seen=0, global_step=0, max_steps=max_steps)
    for seconds in step_seconds:
        callback.on_step_begin(None, state, None)
        now[0] += seconds
        state.num_input_tokens_seen += 100
        state.global_step += 1
        callback.on_step_end(None, state, None)
    return said


@pytest.fixture
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model("llama"))


def test_auto_goes_back_to_eager_when_compiled_steps_are_slower(tiny):
    said = warm_up(tiny, [5, 3, 3, 40, 4, 4])  # a stand-in where compile loses: 4 s per step against eager's 3
    assert not any(blocks_compiled(tiny))
    assert said[-1].startswith("train.compile auto: eager, compiled steps ran at 0.75x")


def test_auto_keeps_compile_when_compiled_steps_are_faster(tiny):
    said = warm_up(tiny, [5, 3, 3, 40, 2, 2])
    assert blocks_compiled(tiny) and all(blocks_compiled(tiny))
    # the compiling step cost 40 - 3 = 37 s more than eager; each compiled step saves 1 s
    assert said[-1] == "train.compile auto: compiled, 1.50x eager's tokens/s; compiling took ~37 s, repaid after ~37 steps"
    assert said[0].startswith("train.compile: the compiling step took 40.0 s; graph breaks: ")


def test_auto_does_not_compile_a_run_too_short_to_repay_it(tiny):
    said = warm_up(tiny, [5, 3, 3, 3, 3, 3], max_steps=100)  # 97 steps x 3 s x 10% < 60 s
    assert not any(blocks_compiled(tiny))
    assert said == ["train.compile auto: eager, the 97 steps left would take ~291 s eager: too few to repay a compile "
                    "(~60 s) at a 10% gain"]


def test_check_says_what_compile_does_and_on_is_refused_without_a_compiler(make_recipe, monkeypatch):
    from rich.console import Console

    from qlora.check import check, print_report

    recipe = make_recipe()  # off by default: only eager resumes bit-identical
    out = io.StringIO()
    print_report(check(recipe), recipe, Console(file=out, width=300))
    assert "train.compile eager\n" in out.getvalue()
    assert check(make_recipe(train={"compile": "auto"})).resolved["compile"].startswith(
        "auto: 3 optimizer steps eager; if the rest of the run would take over 600 s eager")
    monkeypatch.setattr(qlora.plan.shutil, "which", lambda name: None)
    assert check(make_recipe(train={"compile": "auto"})).resolved["compile"] == \
        "eager (inductor needs a C++ compiler on CPU: apt-get install g++)"
    with pytest.raises(UserError, match=r"^train.compile: on, but inductor needs a C\+\+ compiler on CPU: apt-get "
                                        r"install g\+\+; or set it to auto or off$"):
        check(make_recipe(train={"compile": "on"}))


@pytest.mark.compile
def test_compiled_training_gives_eager_losses(make_recipe, tmp_path, capsys):
    """On the tiny Llama in bf16 with gradient checkpointing and qlora's chunked loss, as users train on CPU."""
    from qlora.train import train

    losses = {}
    for setting in ("off", "on"):
        recipe = make_recipe(arch="llama", quantization={"compute_dtype": "bfloat16"},
                             train={"compile": setting, "output_dir": str(tmp_path / setting), "max_steps": 3,
                                    "batch_size": 1, "logging_steps": 1, "save_steps": 3})
        run = train(recipe)
        losses[setting] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                           if "loss" in r]
    assert len(losses["on"]) == 3
    assert losses["on"] == pytest.approx(losses["off"], rel=0.01)
    assert "train.compile: the compiling step took" in capsys.readouterr().err
