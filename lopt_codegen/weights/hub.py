"""weights="pretrained": a spec's published weight repositories, from the Hugging Face
cache when they are there, downloaded otherwise (huggingface_hub, the optional extra
`lopt_codegen[hub]`). Each repository is a PyLO hub folder: config.json and
model.safetensors (or pytorch_model.bin), read and checked like any local folder."""
from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import WeightsError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")   # what a hub folder may hold, in that order
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

    for name in WEIGHT_FILES:   # the cache first: no network when the files are there
        try:
            return os.path.dirname(hf_hub_download(repo, name, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
    if constants.HF_HUB_OFFLINE:
        raise _unavailable(group, repo, repos, "they are not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        path = _download_weights(repo)
    except LocalEntryNotFoundError:   # the hub could not be reached, and the cache has nothing
        raise _unavailable(group, repo, repos, f"they are not in the Hugging Face cache and {constants.ENDPOINT} "
                           "cannot be reached") from None
    except EntryNotFoundError:
        raise _unavailable(group, repo, repos, f"the repository has no {' or '.join(WEIGHT_FILES)}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        what = "the repository is not there (or private)" if status in (401, 403, 404) else \
            f"the hub answered {status}"
        raise _unavailable(group, repo, repos, what) from None
    except OSError as exc:   # a network error the library did not turn into its own
        raise _unavailable(group, repo, repos, f"the download failed ({type(exc).__name__}: {exc})") from None
    try:   # the folder as PyLO publishes it; loading needs only the tensors
        hf_hub_download(repo, CONFIG_FILE)
    except Exception:  # noqa: BLE001 - config.json is optional: its absence or a failure must not lose the weights
        pass
    return os.path.dirname(path)


def _download_weights(repo: str) -> str:
    """The path of the repository's weight file, downloaded (the first of WEIGHT_FILES it has)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in WEIGHT_FILES[:-1]:
        try:
            return hf_hub_download(repo, name)
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):   # unreachable, not missing: do not try again
                raise
    return hf_hub_download(repo, WEIGHT_FILES[-1])


def _unavailable(group: str, repo: str, repos: Mapping[str, str], reason: str) -> WeightsError:
    """One line: which repository is missing, why, and how to pass a local copy instead."""
    return WeightsError(f"cannot get the pretrained weights of group '{group}' from {repo} on the Hugging Face "
                        f"Hub: {reason}; download them where there is a network (huggingface-cli download {repo}) "
                        f"and pass weights={_local_hint(repos)}")


def _local_hint(repos: Mapping[str, str]) -> str:
    if len(repos) == 1:
        return "<that folder>"
    return "{" + ", ".join(f"'{g}': <folder of {r}>" for g, r in repos.items()) + "}"
