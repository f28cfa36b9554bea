"""train.compile: torch.compile of the decoder layers' attention and MLP blocks, and auto's measured warm-up."""

from __future__ import annotations

import os
import time

import torch
from transformers import TrainerCallback

from qlora.plan import COMPILED_STEPS, COMPILE_SECONDS, EAGER_STEPS, EXPECTED_GAIN, Plan, inductor_cache

BLOCKS = ("self_attn", "mlp")


def compiled_blocks(model) -> list:
    """The attention and MLP blocks of every decoder layer: they hold all of the LoRA path (4-bit dequantize, matmul,
    dropout, LoRA A/B and scale). The blocks are compiled rather than the layers, as transformers checkpoints a
    layer's forward and dynamo cannot trace the kernels hub's global write inside a checkpoint (one graph break per
    layer, measured); the checkpoint then recomputes the compiled blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [block for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer)
            for name, block in layer.named_children() if name in BLOCKS]


def signed64(value: int) -> int:
    """A 64-bit constant as the int64 torch computes with (wrapping arithmetic, as uint64 would)."""
    return value - (1 << 64) if value >= 1 << 63 else value


SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2 = map(signed64, (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """uint64's logical right shift of int64 values (torch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(seed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` outputs, as int64, of the SplitMix64 generator whose state starts at seed x gamma: each a
    function of its index alone, so inductor computes them in one vectorized, parallel loop."""
    # (seed + i) x gamma rather than seed x gamma + i x gamma: inductor folds arange x constant into an index
    # expression and gets its 64-bit wraparound wrong (torch 2.13: half of the values differ)
    z = (seed + 1 + torch.arange(count, device=seed.device)) * SPLITMIX_GAMMA
    z = (z ^ shift_right(z, 30)) * SPLITMIX_M1
    z = (z ^ shift_right(z, 27)) * SPLITMIX_M2
    return z ^ shift_right(z, 31)


class HashedDropout(torch.nn.Dropout):
    """LoRA dropout for compiled blocks on CPU: each element kept with probability 1 - p (to 2^-32) and scaled by
    1 / (1 - p), as nn.Dropout; the mask comes from SplitMix64 seeded by one draw of torch's generator, so seeding
    and the checkpoint's recompute (which restores the generator) give the same mask. aten's CPU random numbers
    are drawn one at a time under a lock: its masks took 16-19% of a SmolLM2-360M or Qwen2.5-0.5B step at batch 1
    (docs/performance.md). Outside a compiled graph it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p and torch.compiler.is_compiling()):
            return super().forward(x)
        seed = torch.randint(0, 1 << 62, (), device=x.device)
        keep = (splitmix64(seed, x.numel()) & 0xFFFFFFFF) >= round(self.p * (1 << 32))
        return x * keep.view(x.shape) * (1 / (1 - self.p))


def hash_lora_dropout(block) -> None:
    """Swap the block's LoRA dropout modules (peft's nn.Dropout, one per adapter) for HashedDropout."""
    for module in block.modules():
        dropouts = getattr(module, "lora_dropout", None)
        for name, dropout in (dropouts.items() if isinstance(dropouts, torch.nn.ModuleDict) else ()):
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = HashedDropout(dropout.p).train(dropout.training)


def compile_blocks(model) -> int:
    """Compile the blocks in place (shapes dynamic: every micro-batch has its own length); returns how many."""
    from torch._inductor.utils import clear_caches

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache()
    clear_caches()  # the paths derived from the cache directory so far
    blocks = compiled_blocks(model)
    for block in blocks:
        on_cpu = next(block.parameters()).device.type == "cpu"
        if on_cpu:
            hash_lora_dropout(block)
        # the instance's forward, not nn.Module.compile: undoing that means resetting a private attribute.
        # On CPU aten's random numbers (HashedDropout's seeds), not inductor's own: its C++ Philox dropout masks made
        # the compiled MLP of SmolLM2 slower than eager under checkpointing (168 vs 159 ms). On CUDA inductor's own
        # defaults, which fuse dropout's Philox masks into its Triton kernels.
        block.forward = torch.compile(block.forward, dynamic=True, options={"fallback_random": True} if on_cpu else {})
    return len(blocks)


def uncompile_blocks(model) -> None:
    """Undo compile_blocks: the blocks run their class's forward again (the compiled code stays cached)."""
    for block in compiled_blocks(model):
        vars(block).pop("forward", None)


def compile_callbacks(plan: Plan, model, say) -> list:
    """The CompileCallback of the plan's train.compile, if any."""
    return [] if plan.compile.startswith("eager") else [CompileCallback(model, plan.recipe.train.compile, say)]


def graph_breaks() -> list[str]:
    """dynamo's graph-break reasons so far in this process, each once (their first line)."""
    from torch._dynamo.utils import counters

    return sorted({reason.splitlines()[0] for reason in counters["graph_break"]})


DECISION = "qlora.compile"  # auto's decision in the trainer state, which every checkpoint carries


class CompileCallback(TrainerCallback):
    """train.compile on: compile before the first optimizer step. auto: steps 1..EAGER_STEPS run eager; if the rest of
    the run could repay a compile, the next COMPILED_STEPS run compiled, and compile stays on only if they took less
    time per token (the first step of each mode is not timed: allocator warm-up, then the compile). The decision, the
    compile's time and dynamo's graph breaks are printed once. The decision goes into the trainer state, so a
    resumed run takes it without warming up again (and runs eager or compiled from its first step, as the
    uninterrupted run would)."""

    def __init__(self, model, setting: str, say, clock=time.perf_counter):
        self.model, self.setting, self.say, self.clock = model, setting, say, clock
        self.step = 0
        self.started = self.tokens = 0
        self.timed = {"eager": [0.0, 0], "compiled": [0.0, 0]}
        self.compiling = None  # (seconds, tokens) of the step that compiled

    def on_train_begin(self, args, state, control, **kwargs):
        if self.setting == "auto" and DECISION in state.stateful_callbacks:
            decided = state.stateful_callbacks[DECISION]["attributes"]
            self.setting = "on" if decided["mode"] == "compiled" else "off"
            self.say(f"train.compile auto: {decided['mode']}, as decided at step {decided['step']} before the resume")
        if self.setting == "on":
            self.say(f"train.compile: compiling {compile_blocks(self.model)} attention and MLP blocks")

    def on_step_begin(self, args, state, control, **kwargs):
        self.step += 1
        if self.setting == "auto" and self.step == EAGER_STEPS + 1:
            compile_blocks(self.model)
        self.started, self.tokens = self.clock(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.setting == "off":
            return
        seconds, tokens = self.clock() - self.started, state.num_input_tokens_seen - self.tokens
        first_compiled = EAGER_STEPS + 1 if self.setting == "auto" else 1
        if self.step == first_compiled:
            self.compiling = (seconds, tokens)
            breaks = graph_breaks()
            self.say(f"train.compile: the compiling step took {seconds:.1f} s; graph breaks: "
                     + ("; ".join(breaks) if breaks else "none"))
        elif self.step > 1:
            timed = self.timed["eager" if self.step <= EAGER_STEPS and self.setting == "auto" else "compiled"]
            timed[0] += seconds
            timed[1] += tokens
        if self.setting == "auto" and self.step == EAGER_STEPS:
            self.worth_trying(state)
        elif self.setting == "auto" and self.step == EAGER_STEPS + COMPILED_STEPS:
            self.decide(state)

    @staticmethod
    def record(state, mode: str) -> None:
        state.stateful_callbacks[DECISION] = {"args": {}, "attributes": {"mode": mode, "step": state.global_step}}

    def worth_trying(self, state) -> None:
        remaining = state.max_steps - state.global_step
        eager_left = self.timed["eager"][0] / (EAGER_STEPS - 1) * remaining
        if eager_left * EXPECTED_GAIN < COMPILE_SECONDS:
            self.setting = "off"
            self.record(state, "eager")
            self.say(f"train.compile auto: eager, the {remaining} steps left would take ~{eager_left:.0f} s eager: "
                     f"too few to repay a compile (~{COMPILE_SECONDS} s) at a {EXPECTED_GAIN:.0%} gain")

    def decide(self, state) -> None:
        eager, compiled = (seconds / max(tokens, 1) for seconds, tokens in self.timed.values())
        speedup = eager / compiled
        self.record(state, "compiled" if speedup > 1 else "eager")
        if speedup > 1:
            cost = self.compiling[0] - eager * self.compiling[1]  # the compiling step less what it would take eager
            per_step = (eager - compiled) * self.timed["compiled"][1] / (COMPILED_STEPS - 1)
            self.say(f"train.compile auto: compiled, {speedup:.2f}x eager's tokens/s; compiling took ~{cost:.0f} s, "
                     f"repaid after ~{cost / per_step:.0f} steps")
        else:
            uncompile_blocks(self.model)
            self.say(f"train.compile auto: eager, compiled steps ran at {speedup:.2f}x eager's tokens/s "
                     "(train.compile: off skips this warm-up)")
