"""The private library API qlora overrides: the installed libraries are the range pyproject pins and tests run on,
and a library where a hook is gone or changed stops qlora in one line naming the hook and that range."""

from importlib.metadata import requires, version

import pytest
from packaging.requirements import Requirement

from qlora.checkpoint import QLoRATrainer
from qlora.compat import require_hooks, pinned_range
from qlora.errors import RunFailed

PINNED = ("transformers", "trl", "peft", "typer", "huggingface_hub")


@pytest.mark.parametrize("package", PINNED)
def test_each_library_whose_internals_qlora_uses_is_pinned_to_a_minor_version_and_installed_in_it(package):
    requirement = next(Requirement(r) for r in requires("qlora") if Requirement(r).name.replace("-", "_") == package)
    assert any(s.operator == "<" for s in requirement.specifier) and any(s.operator == ">=" for s in
                                                                         requirement.specifier)
    assert requirement.specifier.contains(version(package)), (package, version(package), requirement)
    assert pinned_range(package) in (str(requirement.specifier), ",".join(sorted(map(str, requirement.specifier))))


def test_every_overridden_trainer_hook_exists_with_the_same_parameters():
    from trl import SFTTrainer

    require_hooks(SFTTrainer, QLoRATrainer, "transformers")
    overridden = [n for n in vars(QLoRATrainer) if n.startswith("_") and not n.startswith("__")]
    assert {"_save_checkpoint", "_load_rng_state", "_get_grad_norm"} <= set(overridden)


class Older:
    """A Trainer of another transformers version: one hook gone, one with other parameters."""

    def _save_checkpoint(self, model):
        pass


class Ours:
    def _save_checkpoint(self, model, trial):
        pass

    def _get_grad_norm(self, model, grad_norm=None):
        pass


def test_a_hook_gone_or_changed_is_one_line_naming_it_and_the_pinned_range():
    with pytest.raises(RunFailed) as failed:
        require_hooks(Older, Ours, "transformers")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"transformers {version('transformers')}: Older._save_checkpoint takes (self, model), "
                              "not (self, model, trial), and qlora overrides it")
    assert message.endswith(f"pip install 'transformers{pinned_range('transformers')}'")

    class Newer(Older):
        def _save_checkpoint(self, model, trial):
            pass

    with pytest.raises(RunFailed, match=r"Newer._get_grad_norm is gone, and qlora overrides it"):
        require_hooks(Newer, Ours, "transformers")
