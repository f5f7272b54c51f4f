"""weights="pretrained" through huggingface_hub, against a hub on 127.0.0.1 (never the
internet): each run is a fresh Python process with HF_ENDPOINT pointed at the local hub
and HF_HOME at a cache of its own, as a user's process would read them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest
import torch
from safetensors.torch import save

from conftest import ROOT
from lopt_codegen.weights import random_weights

pytest.importorskip("huggingface_hub")

# What the child process prints: the checksum of every file weight it resolved, or the error.
PROBE = """
import json, sys, time, torch
{prelude}
if {hide_hub}:
    sys.modules["huggingface_hub"] = None   # as if the extra were not installed
import importlib
cls = getattr(importlib.import_module("generated.{name}"), "{cls}")
try:
    opt = cls([torch.nn.Parameter(torch.ones(3, 4))], backend="reference", {kwargs})   # (no kernels: 2 s less)
except Exception as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
    sys.exit(3)
print(json.dumps({{g: {{k: float(opt._weights[g][k].double().sum()) for k in keys}}
                  for g, keys in opt.program.weight_groups.items()}}))
"""


class LocalHub:
    """The two routes hf_hub_download uses: HEAD and GET /<repo>/resolve/<revision>/<file>,
    with the headers the Hub sends (commit, ETag, size) and its error codes."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.requests = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                parts = unquote(self.path.split("?")[0]).strip("/").split("/")
                repo, files = "/".join(parts[:2]), hub.repos.get("/".join(parts[:2]))
                if len(parts) < 5 or parts[2] != "resolve" or files is None:
                    return self.fail("RepoNotFound")
                name = "/".join(parts[4:])
                if name not in files:
                    return self.fail("EntryNotFound")
                data = files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", hashlib.sha1(repo.encode() + b"".join(files.values())).hexdigest())
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def fail(self, code: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:   # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_folder(tensors: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, bytes]:
    """A PyLO hub folder's files: config.json and model.safetensors."""
    return {"config.json": json.dumps(config or {"hidden_size": 8}).encode(),
            "model.safetensors": save({k: v.contiguous() for k, v in tensors.items()})}


def run_probe(name: str, cls: str, env: dict[str, str], kwargs: str = "", hide_hub: bool = False,
              prelude: str = "") -> dict:
    code = PROBE.format(name=name, cls=cls, kwargs=kwargs, hide_hub=hide_hub, prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip(), out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (out.returncode == 3) == ("error" in result), out.stderr
    return result


def checksums(weights: dict[str, dict[str, torch.Tensor]]) -> dict:
    return {g: {k: float(v.double().sum()) for k, v in keys.items()} for g, keys in weights.items()}


@pytest.fixture()
def hub_env(tmp_path):
    """(a function serving repos on a local hub, the environment pointing at it)."""
    hubs = []

    def serve(repos: dict[str, dict[str, bytes]]) -> tuple[LocalHub, dict[str, str]]:
        hub = LocalHub(repos)
        hubs.append(hub)
        return hub, {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                     "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    yield serve
    for hub in hubs:
        hub.close()


def celo2_files(seed: int = 4) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, bytes]]:
    from generated.celo2 import CELO2

    weights = random_weights(CELO2.program.weight_groups, seed)
    return weights, hub_folder(weights["mlp"])


def test_pretrained_is_the_default_downloaded_once_then_read_from_the_cache(hub_env):
    weights, files = celo2_files()
    hub, env = hub_env({"DiamondXL/celo2": files})
    first = run_probe("celo2", "CELO2", env)
    assert first == checksums(weights)
    assert ("GET", "/DiamondXL/celo2/resolve/main/model.safetensors") in hub.requests
    assert any(path.endswith("/config.json") for _, path in hub.requests)   # the whole PyLO folder
    # Again with the hub up: from the cache, no request at all.
    seen = len(hub.requests)
    assert run_probe("celo2", "CELO2", env, kwargs="weights='pretrained'") == first
    assert len(hub.requests) == seen
    # Offline, the hub gone: still from the cache.
    hub.close()
    assert run_probe("celo2", "CELO2", {**env, "HF_HUB_OFFLINE": "1"}) == first


def test_two_groups_come_from_two_repositories(hub_env):
    from generated.velo import VeLO

    weights = random_weights(VeLO.program.weight_groups, 6)
    live_copies = {k.rstrip("_"): v.clone() for k, v in weights["mlp"].items() if k.endswith("_")}   # VeLO_MLP ships them
    hub, env = hub_env({"Pauljanson002/VeLO_MLP": hub_folder({**weights["mlp"], **live_copies}),
                        "Pauljanson002/VeLO_RNN": hub_folder(weights["rnn"])})
    got = run_probe("velo", "VeLO", env, kwargs="num_steps=100")
    assert got == checksums(weights)


def test_offline_and_not_cached_is_one_line_naming_the_repository(hub_env):
    _, files = celo2_files()
    hub, env = hub_env({"DiamondXL/celo2": files})
    got = run_probe("celo2", "CELO2", {**env, "HF_HUB_OFFLINE": "1"})
    assert got["error"] == "WeightsError" and "\n" not in got["message"]
    assert "DiamondXL/celo2" in got["message"] and "HF_HUB_OFFLINE" in got["message"]
    assert "pass weights=<that folder>" in got["message"] and not hub.requests


def test_an_unreachable_hub_is_one_line(hub_env):
    _, env = hub_env({})
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"   # the discard port: nothing listens there
    # huggingface_hub retries 5 times, sleeping 23 s in all: the retries run, not the sleeps
    got = run_probe("elo", "ELO", env, prelude="time.sleep = lambda seconds: None")
    assert got["error"] == "WeightsError" and "\n" not in got["message"]
    assert "DiamondXL/elo" in got["message"] and "cannot be reached" in got["message"]


def test_a_missing_repository_is_one_line(hub_env):
    _, env = hub_env({"someone/else": {}})
    got = run_probe("elo_celo2", "ELO_CELO2", env)
    assert got["error"] == "WeightsError" and "\n" not in got["message"]
    assert "DiamondXL/elo-celo2" in got["message"] and "not there" in got["message"]


def test_a_corrupted_download_is_refused_with_the_exact_key_errors(hub_env):
    weights, _ = celo2_files()
    broken = dict(weights["mlp"])
    del broken["w0.3"]
    broken["w0.14"] = torch.zeros(3, 8)
    _, env = hub_env({"DiamondXL/celo2": hub_folder(broken)})
    got = run_probe("celo2", "CELO2", env)
    assert got["error"] == "WeightsError", got
    assert "w0.3" in got["message"] and "w0.14" in got["message"] and "model.safetensors" in got["message"]


def test_without_huggingface_hub_the_error_says_how_to_install_it(hub_env):
    _, env = hub_env({})
    got = run_probe("small_fc_lopt", "SmallFcLopt", env, hide_hub=True)
    assert got["error"] == "WeightsError" and "pip install 'lopt_codegen[hub]'" in got["message"]
    assert "btherien/mulo" in got["message"]


def test_a_repository_with_pytorch_model_bin(hub_env):
    import io

    weights, _ = celo2_files(seed=8)
    buffer = io.BytesIO()
    torch.save(weights["mlp"], buffer)
    hub, env = hub_env({"DiamondXL/celo2": {"pytorch_model.bin": buffer.getvalue()}})   # and no config.json
    assert run_probe("celo2", "CELO2", env) == checksums(weights)
    assert ("GET", "/DiamondXL/celo2/resolve/main/pytorch_model.bin") in hub.requests
