"""weights="pretrained": a spec's published weight repositories, from the Hugging Face
cache when they are there, downloaded otherwise (huggingface_hub, the optional extra
`lopt_codegen[hub]`). Each repository is a PyLO hub folder: config.json and
model.safetensors, read and checked like any local folder."""
from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import WeightsError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def pretrained_folders(repos: Mapping[str, str]) -> dict[str, str]:
    """{group: repository id} -> {group: the local folder holding its files}."""
    try:
        import huggingface_hub  # noqa: F401  (an optional dependency)
    except ImportError:
        raise WeightsError("weights='pretrained' fetches " + ", ".join(repos.values()) + " from the Hugging Face "
                           "Hub, which needs huggingface_hub: pip install 'lopt_codegen[hub]', or pass "
                           f"weights={_local_hint(repos)}") from None
    return {group: _folder(group, repo, repos) for group, repo in repos.items()}


def _folder(group: str, repo: str, repos: Mapping[str, str]) -> str:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:   # the cache first: no network when the files are there
        path = hf_hub_download(repo, WEIGHTS_FILE, local_files_only=True)
        return os.path.dirname(path)
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise _unavailable(group, repo, repos, "they are not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        path = hf_hub_download(repo, WEIGHTS_FILE)
        try:
            hf_hub_download(repo, CONFIG_FILE)   # the folder as PyLO publishes it; the weights need only the tensors
        except EntryNotFoundError:
            pass
    except LocalEntryNotFoundError:   # the hub could not be reached, and the cache has nothing
        raise _unavailable(group, repo, repos, f"they are not in the Hugging Face cache and {constants.ENDPOINT} "
                           "cannot be reached") from None
    except EntryNotFoundError:
        raise _unavailable(group, repo, repos, f"the repository has no {WEIGHTS_FILE}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        what = "the repository is not there (or private)" if status in (401, 403, 404) else \
            f"the hub answered {status}"
        raise _unavailable(group, repo, repos, what) from None
    except OSError as exc:   # a network error the library did not turn into its own
        raise _unavailable(group, repo, repos, f"the download failed ({type(exc).__name__}: {exc})") from None
    return os.path.dirname(path)


def _unavailable(group: str, repo: str, repos: Mapping[str, str], reason: str) -> WeightsError:
    """One line: which repository is missing, why, and how to pass a local copy instead."""
    return WeightsError(f"cannot get the pretrained weights of group '{group}' from {repo} on the Hugging Face "
                        f"Hub: {reason}; download them where there is a network (huggingface-cli download {repo}) "
                        f"and pass weights={_local_hint(repos)}")


def _local_hint(repos: Mapping[str, str]) -> str:
    if len(repos) == 1:
        return "<that folder>"
    return "{" + ", ".join(f"'{g}': <folder of {r}>" for g, r in repos.items()) + "}"
