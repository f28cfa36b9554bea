"""--push-to-hub: the repo id checked before any work; offline, the upload fails in one line with the files kept."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from qlora.errors import UserError
from qlora.hub import check_repo_id


@pytest.mark.parametrize("repo", ["no-namespace", "a/b/c", "me/bad name", "me/-dash"])
def test_bad_repo_ids_are_refused(repo):
    with pytest.raises(UserError, match=f"^--push-to-hub {repo!r}: "):
        check_repo_id(repo)
    check_repo_id("me/gemma-2b-code")


def test_offline_push_is_one_line_and_keeps_the_merged_model_with_its_card(memorised_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(memorised_run, run)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"pass@1": 1.0, "base": {"pass@1": 0.25}}))
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "qlora", "merge", str(run), "--output", str(out),
                             "--push-to-hub", "me/tiny-code"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "offline mode is enabled" in errors[0]
    assert f"the files are in {out}, upload them later with `hf upload me/tiny-code {out}`" in errors[0]
    assert (out / "config.json").is_file()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "| pass@1 | 1.000 | 0.250 |" in card
