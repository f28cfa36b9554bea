"""`--push-to-hub REPO` for merge and export: the written directory uploaded to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from qlora.errors import RunFailed, UserError, one_line


def check_repo_id(repo: str) -> None:
    """A hub repo id (user/name), checked before any work so a typo costs nothing."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo.count("/") != 1:
            raise HFValidationError("it must be a namespace and a name, like your-name/gemma-2b-code")
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UserError(f"--push-to-hub {repo!r}: {one_line(exc)}") from None


def push(folder: Path, repo: str, private: bool) -> str:
    """Create the model repo if needed and upload `folder` to it; returns the repo's URL. A failure (offline, no
    token, no permission) is one line that says where the files are, so nothing is lost."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          ignore_patterns=[".qlora.json"], commit_message="Upload from qlora")
    except Exception as exc:  # the hub's errors are many (offline mode, HTTP, auth): each becomes one line
        raise RunFailed(f"--push-to-hub {repo}: {one_line(exc).rstrip('.')}; the files are in {folder}, upload them "
                        f"later with `hf upload {repo} {folder}`") from None
    return str(url)
