"""train.compile: auto's measured warm-up keeps the faster mode, on compiles and trains as eager does."""

import io
from types import SimpleNamespace

import pytest
import torch

import qlora.plan
from qlora import compile as qcompile
from qlora.errors import UserError


def blocks_compiled(model) -> list[bool]:
    return ["forward" in vars(block) for block in qcompile.compiled_blocks(model)]


def warm_up(model, step_seconds: list[float], max_steps: int = 1000, state=None) -> list[str]:
    """Drive auto's callback through len(step_seconds) optimizer steps of 100 tokens each, with a stand-in clock
    under which step i takes step_seconds[i]; what it said."""
    said, now = [], [0.0]
    callback = qcompile.CompileCallback(model, "auto", said.append, clock=lambda: now[0])
    state = state or SimpleNamespace(num_input_tokens_seen=0, global_step=0, max_steps=max_steps, stateful_callbacks={})
    callback.on_train_begin(None, state, None)
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


@pytest.mark.parametrize("eager_compiled", [(3, 2), (3, 4)], ids=["compiled", "eager"])
def test_a_resumed_run_takes_autos_decision_from_the_checkpoint(tiny, tmp_path, eager_compiled):
    """The decision travels in trainer_state.json, which every checkpoint carries: the resumed run runs the mode
    the uninterrupted one did from its first step, with no warm-up."""
    from transformers import TrainerState

    eager, compiled = eager_compiled
    state = TrainerState(max_steps=1000)
    warm_up(tiny, [5, eager, eager, 40, compiled, compiled], state=state)
    mode = "compiled" if compiled < eager else "eager"
    state.save_to_json(tmp_path / "trainer_state.json")
    qcompile.uncompile_blocks(tiny)

    resumed = TrainerState.load_from_json(tmp_path / "trainer_state.json")
    said = warm_up(tiny, [40, 3, 3, 3, 3, 3, 3], state=resumed)
    assert said[0] == f"train.compile auto: {mode}, as decided at step 6 before the resume"
    assert all(blocks_compiled(tiny)) if mode == "compiled" else not any(blocks_compiled(tiny))
    # then what compiling says (the blocks, the compiling step's time) and no second decision
    assert len(said) == (3 if mode == "compiled" else 1)


def test_auto_does_not_compile_a_run_too_short_to_repay_it(tiny):
    said = warm_up(tiny, [5, 3, 3, 3, 3, 3], max_steps=100)  # 97 steps x 3 s x 10% < 60 s
    assert not any(blocks_compiled(tiny))
    assert said == ["train.compile auto: eager, the 97 steps left would take ~291 s eager: too few to repay a compile "
                    "(~60 s) at a 10% gain"]


def lora_dropouts(model) -> list:
    return [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]


def compiled(module):
    return torch.compile(module, dynamic=True, options={"fallback_random": True})  # as compile_blocks compiles


def splitmix64_reference(state: int, count: int) -> list[int]:
    """SplitMix64 (Steele, Lea and Flood 2014) in Python's exact integers, as int64 values."""
    values, mask = [], (1 << 64) - 1
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        values.append(z - (1 << 64) if z >> 63 else z)
    return values


@pytest.mark.parametrize("seed", [0, 123456789, (1 << 62) - 1])
def test_splitmix64_is_the_reference_generator_eager_and_compiled(seed):
    """inductor computes 64-bit integer arithmetic in its own C++: an arange times a 64-bit constant came out wrong
    in half the values (torch 2.13), which made the checkpoint's recompute draw other masks."""
    expected = splitmix64_reference(seed * 0x9E3779B97F4A7C15, 1000)
    assert qcompile.splitmix64(torch.tensor(seed), 1000).tolist() == expected
    assert torch.compile(qcompile.splitmix64, dynamic=True)(torch.tensor(seed), 1000).tolist() == expected


def test_hashed_dropout_keeps_each_element_with_probability_1_minus_p_independently():
    torch.manual_seed(0)
    dropout, ones = compiled(qcompile.HashedDropout(0.1).train()), torch.ones(1000, 1000)
    first, second = (dropout(ones) != 0 for _ in range(2))
    assert dropout(ones).unique().tolist() == pytest.approx([0, 1 / 0.9])  # nn.Dropout's scale
    n, sigmas = ones.numel(), 5
    for fraction, p in ((first.float().mean(), 0.9), (second.float().mean(), 0.9),
                        ((first & second).float().mean(), 0.81),  # two calls draw independent masks
                        ((first[:, 1:] & first[:, :-1]).float().mean(), 0.81),  # so do neighbours
                        ((first[1:] & first[:-1]).float().mean(), 0.81)):
        assert abs(fraction.item() - p) < sigmas * (p * (1 - p) / n) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(dropout(ones) != 0, first)  # torch's seed decides the masks


def test_hashed_dropout_is_nn_dropout_outside_a_compiled_graph():
    ones = torch.ones(100, 100)
    torch.manual_seed(3)
    expected = torch.nn.Dropout(0.2).train()(ones)
    torch.manual_seed(3)
    assert torch.equal(qcompile.HashedDropout(0.2).train()(ones), expected)
    assert torch.equal(compiled(qcompile.HashedDropout(0.2).eval())(ones), ones)


def test_a_checkpointed_compiled_block_recomputes_the_forwards_masks():
    """transformers checkpoints each decoder layer around its compiled blocks: the recompute for the backward must
    draw the forward's masks, or every LoRA gradient is silently wrong."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 64), qcompile.HashedDropout(0.5), torch.nn.Linear(64, 64))
    block = compiled(block.train())
    x = torch.randn(8, 64)
    grads = []
    for checkpointed in (False, True):
        block.zero_grad()
        torch.manual_seed(1)
        torch.randn(3)  # the checkpoint restores the generator's state, whatever it was
        (checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)).square().sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)


@pytest.mark.compile
def test_compiled_blocks_hash_lora_dropout_and_generate_what_eager_does(tiny):
    """train.eval_problems generates with the model being trained: its compiled blocks, in eval mode without grad,
    compile once more (8 graphs) and give eager's tokens."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False))
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        eager = model.eval().generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    assert qcompile.compile_blocks(model) == 2 * len(model.base_model.model.model.layers)
    dropouts = lora_dropouts(model)
    assert dropouts and all(type(d) is qcompile.HashedDropout and d.p == 0.1 for d in dropouts)
    model.train()
    model(input_ids=prompt, labels=prompt).loss.backward()
    with torch.no_grad():
        assert torch.equal(model.eval().generate(input_ids=prompt, max_new_tokens=12, do_sample=False), eager)
    assert qcompile.graph_breaks() == []


def test_on_a_gpu_compile_keeps_peft_dropout_and_inductors_defaults(tiny_model, monkeypatch):
    """On CUDA inductor fuses dropout's masks into its Triton kernels with its own Philox numbers (its documented
    way): no HashedDropout, no fallback_random. A model on the meta device stands in for the GPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model("llama"))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    options = []
    monkeypatch.setattr(torch, "compile", lambda forward, **kwargs: options.append(kwargs) or forward)
    assert qcompile.compile_blocks(model) == len(options) == 2 * len(base.model.layers)
    assert all(o == {"dynamic": True, "options": {}} for o in options)
    dropouts = lora_dropouts(model)
    assert dropouts and all(type(d) is torch.nn.Dropout for d in dropouts)


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
def test_compiled_training_gives_eager_losses_and_resumes_bit_identical(make_recipe, tmp_path, capsys):
    """On the tiny Llama in bf16 with gradient checkpointing and qlora's chunked loss, as users train on CPU:
    compiled losses within 1% of eager's (without dropout: other masks send this tiny twin's few steps elsewhere,
    0.10-0.50 at step 3 across eager seeds), and a compiled run with LoRA dropout stopped after step 2 and resumed
    ends with the uninterrupted compiled run's adapter, bit for bit."""
    from test_reliability import SignalAt, adapter, metrics

    from qlora.errors import RunInterrupted
    from qlora.train import train

    def recipe(name, setting, dropout):
        return make_recipe(arch="llama", quantization={"compute_dtype": "bfloat16"}, lora={"dropout": dropout},
                           train={"compile": setting, "output_dir": str(tmp_path / name), "max_steps": 4,
                                  "batch_size": 1, "logging_steps": 1, "save_steps": 4})

    losses = {setting: [m["loss"] for m in metrics(train(recipe(setting, setting, 0))) if "loss" in m]
              for setting in ("off", "on")}
    assert len(losses["on"]) == 4
    assert losses["on"] == pytest.approx(losses["off"], rel=0.01)
    assert "train.compile: the compiling step took" in capsys.readouterr().err

    full = train(recipe("full", "on", 0.1))
    with pytest.raises(RunInterrupted, match="SIGINT after step 2"):
        train(recipe("resumed", "on", 0.1), callbacks=[SignalAt(2)])
    resumed = train(recipe("resumed", "on", 0.1))
    a, b = adapter(full / "adapter"), adapter(resumed / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
