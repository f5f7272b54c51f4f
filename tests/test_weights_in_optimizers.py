"""Generated optimizers read meta-weights from PyLO hub folders (written here with random
values), and a wrong key set fails with a message naming the keys."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO
from lopt_codegen.weights import WeightsError, random_weights


def write_hub_folder(path, tensors):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"note": "written by a test"}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def one_step(opt_factory, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 6), (5,)]]
    opt = opt_factory(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step(loss=torch.tensor(0.5))
    return [p.detach() for p in params]


def test_small_fc_lopt_from_a_hub_folder(tmp_path):
    groups = SmallFcLopt.program.weight_groups
    weights = random_weights(groups, seed=7)
    write_hub_folder(tmp_path / "mulo", weights["mlp"])
    from_folder = one_step(lambda ps: SmallFcLopt(ps, weights=tmp_path / "mulo"))
    in_memory = one_step(lambda ps: SmallFcLopt(ps, weights={"mlp": weights["mlp"]}))
    random = one_step(lambda ps: SmallFcLopt(ps, weights="random", seed=7))
    assert all(torch.equal(a, b) for a, b in zip(from_folder, in_memory))
    assert all(torch.equal(a, b) for a, b in zip(from_folder, random))


def test_velo_from_a_parent_folder_holding_both_hub_folders(tmp_path):
    groups = VeLO.program.weight_groups
    weights = random_weights(groups, seed=3)
    mlp = dict(weights["mlp"])
    mlp.update({k.rstrip("_"): v.clone() for k, v in weights["mlp"].items() if k.endswith("_")})  # live copies
    write_hub_folder(tmp_path / "hub" / "VeLO_MLP", mlp)
    write_hub_folder(tmp_path / "hub" / "VeLO_RNN", weights["rnn"])
    make = lambda w: (lambda ps: VeLO(ps, num_steps=10, weights=w))  # noqa: E731
    from_parent = one_step(make(tmp_path / "hub"))
    from_dict = one_step(make({"mlp": tmp_path / "hub" / "VeLO_MLP", "rnn": tmp_path / "hub" / "VeLO_RNN"}))
    seeded = one_step(lambda ps: VeLO(ps, num_steps=10, weights="random", seed=3))
    assert all(torch.equal(a, b) for a, b in zip(from_parent, from_dict))
    assert all(torch.equal(a, b) for a, b in zip(from_parent, seeded))


def test_wrong_key_set_names_the_keys(tmp_path):
    weights = random_weights(SmallFcLopt.program.weight_groups, seed=0)["mlp"]
    weights["network.extra.weight"] = weights.pop("network.linear_0.weight")
    write_hub_folder(tmp_path / "bad", weights)
    with pytest.raises(WeightsError) as info:
        SmallFcLopt([torch.nn.Parameter(torch.zeros(3))], weights=tmp_path / "bad")
    message = str(info.value)
    assert "network.linear_0.weight" in message and "network.extra.weight" in message


def test_missing_weights_path_says_what_file_is_expected(tmp_path):
    with pytest.raises(WeightsError, match="config.json.*model.safetensors"):
        SmallFcLopt([torch.nn.Parameter(torch.zeros(3))], weights=tmp_path / "nowhere")
