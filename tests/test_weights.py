"""Meta-weight loading: every accepted source round-trips exactly, every failure says what/where/how."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lopt_codegen.weights import WeightsError, check_weights, load_weights, random_weights
from lopt_codegen.weights.seeded import derived_seed

SMALL_FC = {"mlp": {
    "network.input.weight": (32, 39), "network.input.bias": (32,),
    "network.linear_0.weight": (32, 32), "network.linear_0.bias": (32,),
    "network.output.weight": (2, 32), "network.output.bias": (2,),
}}


def velo_groups(banks: int = 256, hidden: int = 512) -> dict:
    """VeLO's two groups (shared/ALGORITHMS.md); scaled down by default-overriding for speed."""
    return {
        "mlp": {"input_weights_": (banks, 4, 30), "input_bias_": (banks, 4),
                "hidden_weights_.0": (banks, 4, 4), "hidden_bias_.0": (banks, 4),
                "output_weights_": (banks, 3, 4), "output_bias_": (banks, 3)},
        "rnn": {"mix_layer1.weight": (hidden, 30), "mix_layer1.bias": (hidden,),
                "mix_layer2.weight": (hidden, 30), "mix_layer2.bias": (hidden,),
                "final_mix_layer.weight": (hidden, 30), "final_mix_layer.bias": (hidden,),
                "lstm.linear.weight": (4 * hidden, 2 * hidden), "lstm.linear.bias": (4 * hidden,),
                "rnn_to_controls.weight": (banks, hidden), "rnn_to_controls.bias": (banks,),
                "step_size.weight": (1, hidden), "step_size.bias": (1,),
                "lstm_init_state.0": (1, hidden), "lstm_init_state.1": (1, hidden)},
    }


# random_weights({"g": {"a.weight": (2, 4), "a.bias": (2,)}}, seed=42), computed once.
DERIVED_42 = 3935424240589970919
PINNED_WEIGHT = [0.0558355450630188, -0.4036779999732971, 0.3747681975364685, -0.1849193572998047,
                 0.15867197513580322, -0.3037276268005371, -0.38395625352859497, -0.3730512857437134]
PINNED_BIAS = [-0.40689271688461304, -0.27555370330810547]

VELO_SMALL = velo_groups(banks=8, hidden=16)
# VeLO_MLP ships live copies of the banks without the trailing "_".
VELO_IGNORE = {"mlp": ["input_weights", "input_bias", "hidden_weights.0", "hidden_bias.0",
                       "output_weights", "output_bias"]}


def tensors_for(keys: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in keys.items()}


def with_live_copies(mlp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**mlp, **{k[:-1] if k.endswith("_") else k.replace("_.", "."): v.clone() + 1
                      for k, v in mlp.items()}}


def write_hub(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A PyLO hub folder as huggingface_hub writes it: config.json + model.safetensors."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "lopt"}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def assert_same(loaded: dict, expected: dict) -> None:
    assert set(loaded) == set(expected)
    for g in expected:
        assert set(loaded[g]) == set(expected[g])
        for k, t in expected[g].items():
            out = loaded[g][k]
            assert out.dtype == torch.float32 and out.is_contiguous() and out.device.type == "cpu"
            assert torch.equal(out, t.to(torch.float32)), (g, k)


# --- accepted sources -------------------------------------------------------------------------

def test_small_fc_hub_folder_round_trips_exactly(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 0)
    hub = write_hub(tmp_path / "mulo", w)
    assert_same(load_weights(hub, SMALL_FC), {"mlp": w})
    assert_same(load_weights(str(hub), SMALL_FC), {"mlp": w})


def test_velo_real_shapes_from_parent_folder_with_live_copies(tmp_path):
    groups = velo_groups()
    mlp, rnn = tensors_for(groups["mlp"], 1), tensors_for(groups["rnn"], 2)
    write_hub(tmp_path / "velo" / "VeLO_MLP", with_live_copies(mlp))
    write_hub(tmp_path / "velo" / "VeLO_RNN", rnn)
    assert_same(load_weights(tmp_path / "velo", groups, VELO_IGNORE), {"mlp": mlp, "rnn": rnn})


def test_parent_folder_is_matched_by_key_set_not_by_folder_name(tmp_path):
    mlp, rnn = tensors_for(VELO_SMALL["mlp"], 3), tensors_for(VELO_SMALL["rnn"], 4)
    write_hub(tmp_path / "rnn", mlp)        # misleading names on purpose
    write_hub(tmp_path / "mlp", rnn)
    # hidden entries (huggingface-cli's .cache/, editor backups) are never weight sources
    write_hub(tmp_path / ".old_copy", mlp)
    assert_same(load_weights(tmp_path, VELO_SMALL), {"mlp": mlp, "rnn": rnn})


def test_dict_of_paths(tmp_path):
    mlp, rnn = tensors_for(VELO_SMALL["mlp"], 5), tensors_for(VELO_SMALL["rnn"], 6)
    d1 = write_hub(tmp_path / "one", with_live_copies(mlp))
    d2 = write_hub(tmp_path / "two", rnn)
    out = load_weights({"mlp": d1, "rnn": str(d2)}, VELO_SMALL, VELO_IGNORE)
    assert_same(out, {"mlp": mlp, "rnn": rnn})


def test_single_safetensors_file_for_one_group_and_for_all_groups(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 7)
    save_file(w, str(tmp_path / "mulo.safetensors"))
    assert_same(load_weights(tmp_path / "mulo.safetensors", SMALL_FC), {"mlp": w})
    mlp, rnn = tensors_for(VELO_SMALL["mlp"], 8), tensors_for(VELO_SMALL["rnn"], 9)
    save_file({**with_live_copies(mlp), **rnn}, str(tmp_path / "velo.safetensors"))
    assert_same(load_weights(tmp_path / "velo.safetensors", VELO_SMALL, VELO_IGNORE), {"mlp": mlp, "rnn": rnn})


def test_torch_state_dict_files_and_pytorch_model_bin_hub_folder(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 10)
    torch.save(w, tmp_path / "w.pt")
    assert_same(load_weights(tmp_path / "w.pt", SMALL_FC), {"mlp": w})
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text("{}")
    torch.save(w, tmp_path / "hub" / "pytorch_model.bin")
    assert_same(load_weights(tmp_path / "hub", SMALL_FC), {"mlp": w})


def test_unknown_extension_is_read_by_content(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 11)
    save_file(w, str(tmp_path / "weights.data"))
    assert_same(load_weights(tmp_path / "weights.data", SMALL_FC), {"mlp": w})


def test_in_memory_state_dicts_convert_float_dtypes_and_numpy(tmp_path):
    mlp, rnn = tensors_for(VELO_SMALL["mlp"], 12), tensors_for(VELO_SMALL["rnn"], 13)
    given_mlp = {k: v.to(torch.float64) for k, v in mlp.items()}
    given_rnn = {k: v.numpy() for k, v in rnn.items()}
    given_rnn["lstm.linear.bias"] = rnn["lstm.linear.bias"].to(torch.bfloat16)
    given_rnn["mix_layer1.bias"] = rnn["mix_layer1.bias"].to(torch.float16)
    out = load_weights({"mlp": given_mlp, "rnn": given_rnn}, VELO_SMALL)
    expected_rnn = dict(rnn, **{"lstm.linear.bias": rnn["lstm.linear.bias"].to(torch.bfloat16).float(),
                               "mix_layer1.bias": rnn["mix_layer1.bias"].half().float()})
    assert_same(out, {"mlp": mlp, "rnn": expected_rnn})
    out["rnn"]["mix_layer2.bias"].add_(1)   # results never alias the caller's arrays
    assert np.array_equal(given_rnn["mix_layer2.bias"], rnn["mix_layer2.bias"].numpy())
    flat = tensors_for(SMALL_FC["mlp"], 14)  # a flat state dict, e.g. straight from torch.load
    assert_same(load_weights(flat, SMALL_FC), {"mlp": flat})


# --- ignore patterns and key checks -----------------------------------------------------------

def test_live_copies_are_unexpected_unless_ignored(tmp_path):
    mlp = tensors_for(VELO_SMALL["mlp"], 15)
    hub = write_hub(tmp_path / "m", with_live_copies(mlp))
    one = {"mlp": VELO_SMALL["mlp"]}
    with pytest.raises(WeightsError) as e:
        load_weights(hub, one)
    msg = str(e.value)
    assert "has 6 unexpected keys: hidden_bias.0, hidden_weights.0, input_bias" in msg
    assert str(hub / "model.safetensors") in msg and "weights.ignore.mlp" in msg
    assert_same(load_weights(hub, one, {"mlp": ["input_*", "hidden_*.0", "output_weights", "output_bias"]}),
                {"mlp": mlp})


def test_missing_key_is_an_error_listing_it(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 16)
    del w["network.linear_0.bias"]
    hub = write_hub(tmp_path / "mulo", w)
    with pytest.raises(WeightsError) as e:
        load_weights(hub, SMALL_FC)
    msg = str(e.value)
    assert msg.startswith(str(hub / "model.safetensors"))
    assert "lacks 1 key of weight group 'mlp': network.linear_0.bias." in msg
    assert "never filled with a random init" in msg


def test_many_missing_keys_are_cut_to_ten_with_a_count():
    groups = {"g": {f"k{i:02d}": (2,) for i in range(25)}}
    with pytest.raises(WeightsError, match=r"lacks 25 keys of weight group 'g': k00, k01, .*k09, "
                                           r"\.\.\. \(25 in all\)") as e:
        load_weights({"g": {"other": torch.ones(2)}}, groups)
    assert "k10" not in str(e.value) and "has 1 unexpected key: other" in str(e.value)


def test_extra_key_is_an_error_listing_it(tmp_path):
    w = {**tensors_for(SMALL_FC["mlp"], 17), "network.linear_1.weight": torch.ones(32, 32)}
    save_file(w, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"w\.safetensors has 1 unexpected key: network\.linear_1\.weight"):
        load_weights(tmp_path / "w.safetensors", SMALL_FC)


def test_wrong_shape_names_key_expected_and_found(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 18)
    w["network.input.weight"] = w["network.input.weight"].t()
    hub = write_hub(tmp_path / "mulo", w)
    with pytest.raises(WeightsError) as e:
        load_weights(hub, SMALL_FC)
    assert "'network.input.weight' expected (32, 39), found (39, 32)" in str(e.value)
    assert str(hub) in str(e.value) and "different network size" in str(e.value)


def test_integer_dtype_is_an_error(tmp_path):
    w = tensors_for(SMALL_FC["mlp"], 19)
    w["network.output.bias"] = torch.tensor([1, 2], dtype=torch.int64)
    torch.save(w, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"w\.pt: meta-weights must be floating point .* "
                                           r"'network\.output\.bias' is torch\.int64"):
        load_weights(tmp_path / "w.pt", SMALL_FC)


def test_non_finite_values_are_an_error():
    w = tensors_for(SMALL_FC["mlp"], 20)
    w["network.output.bias"][0] = float("nan")
    with pytest.raises(WeightsError, match=r"'network\.output\.bias' holds 1 NaN/inf values"):
        load_weights({"mlp": w}, SMALL_FC)


# --- paths that are not weights ---------------------------------------------------------------

def test_nonexistent_path_says_what_to_download(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_weights(tmp_path / "nope", SMALL_FC)
    msg = str(e.value)
    assert f"weights path '{tmp_path / 'nope'}' does not exist" in msg
    assert ("a folder with config.json + model.safetensors (the PyLO hub layout, e.g. a local download "
            "of btherien/mulo) or a .safetensors / .pt file") in msg
    assert "Nothing is downloaded at run time" in msg
    with pytest.raises(WeightsError, match=r"is a URL.*Pauljanson002/VeLO_MLP.*Pauljanson002/VeLO_RNN"):
        load_weights("https://huggingface.co/Pauljanson002/VeLO_MLP", VELO_SMALL)
    with pytest.raises(WeightsError, match=r"hub ids are not resolved"):
        load_weights("btherien/mulo", SMALL_FC)


@pytest.mark.parametrize("name", ["model.safetensors", "w.pt", "w.safetensors"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_file_names_the_file(tmp_path, name, damage):
    good = tmp_path / ("good.pt" if name.endswith(".pt") else "good.safetensors")
    w = tensors_for(SMALL_FC["mlp"], 21)
    torch.save(w, good) if name.endswith(".pt") else save_file(w, str(good))
    data = good.read_bytes()
    folder = tmp_path / "hub"
    folder.mkdir()
    bad = folder / name
    bad.write_bytes(b"\x13\x37 not weights " * 50 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(WeightsError) as e:
        load_weights(folder if name == "model.safetensors" else bad, SMALL_FC)
    assert f"could not read {bad} as a " in str(e.value) and "download it again" in str(e.value)


def test_nested_or_non_dict_torch_files_are_explained(tmp_path):
    torch.save({"mlp": tensors_for(SMALL_FC["mlp"], 22)}, tmp_path / "nested.pt")
    with pytest.raises(WeightsError, match=r"nested\.pt is not a flat state dict: mlp hold"):
        load_weights(tmp_path / "nested.pt", SMALL_FC)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list\.pt holds a list, not a state dict"):
        load_weights(tmp_path / "list.pt", SMALL_FC)


class Opaque:  # any non-tensor object: unpickling it could run code
    pass


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"network.input.weight": Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"could not read .*evil\.pt as a torch\.save state dict \(loaded "
                                           r"with weights_only=True\): UnpicklingError: Weights only load failed\. "
                                           r"The file is corrupted"):
        load_weights(tmp_path / "evil.pt", SMALL_FC)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"holds no weights: no model\.safetensors or pytorch_model\.bin"):
        load_weights(tmp_path, SMALL_FC)


# --- matching several groups ------------------------------------------------------------------

def test_ambiguous_parent_folder_names_folders_and_group(tmp_path):
    write_hub(tmp_path / "a", tensors_for(VELO_SMALL["mlp"], 23))
    write_hub(tmp_path / "b", tensors_for(VELO_SMALL["mlp"], 24))
    write_hub(tmp_path / "c", tensors_for(VELO_SMALL["rnn"], 25))
    with pytest.raises(WeightsError) as e:
        load_weights(tmp_path, VELO_SMALL)
    msg = str(e.value)
    assert "weight group 'mlp' matches several sources" in msg
    assert str(tmp_path / "a" / "model.safetensors") in msg and str(tmp_path / "b" / "model.safetensors") in msg
    assert "{'mlp': path, 'rnn': path}" in msg


def test_unmatched_group_and_stray_folder(tmp_path):
    write_hub(tmp_path / "x" / "velo_mlp", tensors_for(VELO_SMALL["mlp"], 26))
    write_hub(tmp_path / "x" / "mulo", tensors_for(SMALL_FC["mlp"], 27))
    with pytest.raises(WeightsError, match=r"no weights in .*x hold any key of weight group 'rnn' "
                                           r"\(expects final_mix_layer\.bias"):
        load_weights(tmp_path / "x", VELO_SMALL)
    write_hub(tmp_path / "x" / "velo_rnn", tensors_for(VELO_SMALL["rnn"], 28))
    with pytest.raises(WeightsError, match=r"x holds weights that match none of the weight groups mlp, rnn: "
                                           r".*mulo/model\.safetensors \(keys network\.input\.bias"):
        load_weights(tmp_path / "x", VELO_SMALL)


def test_single_file_with_colliding_group_key_sets_is_refused(tmp_path):
    groups = {"a": {"w": (2,)}, "b": {"w": (2,), "v": (3,)}}
    save_file({"w": torch.ones(2), "v": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"weight groups 'a' and 'b' at once, but their key sets share w"):
        load_weights(tmp_path / "w.safetensors", groups)


def test_dict_of_paths_with_wrong_group_names():
    with pytest.raises(WeightsError, match=r"lacks weight group\(s\) rnn and has unknown weight group\(s\) RNN"):
        load_weights({"mlp": "/x", "RNN": "/y"}, VELO_SMALL)


# --- check_weights ----------------------------------------------------------------------------

def test_check_weights_groups_and_copies():
    w = {"mlp": tensors_for(SMALL_FC["mlp"], 29)}
    out = check_weights(w, SMALL_FC, "the built-in weights of x")
    assert_same(out, w)
    assert all(out["mlp"][k].data_ptr() != w["mlp"][k].data_ptr() for k in w["mlp"])
    with pytest.raises(WeightsError, match=r"^the built-in weights of x lacks weight group\(s\) rnn"):
        check_weights(w, VELO_SMALL, "the built-in weights of x")
    bad = {"mlp": dict(w["mlp"], **{"network.input.bias": torch.ones(31)})}
    with pytest.raises(WeightsError, match=r"^origin: wrong shape .*'network\.input\.bias' expected \(32\), "
                                           r"found \(31\)"):
        check_weights(bad, SMALL_FC, "origin")


# --- random_weights ---------------------------------------------------------------------------

def test_random_weights_are_deterministic_and_seed_dependent():
    a, b, c = random_weights(VELO_SMALL, 0), random_weights(VELO_SMALL, 0), random_weights(VELO_SMALL, 1)
    check_weights(a, VELO_SMALL, "random")  # the right keys, shapes and dtype
    for g in VELO_SMALL:
        for k in VELO_SMALL[g]:
            assert torch.equal(a[g][k], b[g][k])
            assert not torch.equal(a[g][k], c[g][k])
    # each tensor has its own stream: a key's values do not depend on the other keys
    alone = random_weights({"rnn": {"step_size.weight": (1, 16)}}, 0)
    assert torch.equal(alone["rnn"]["step_size.weight"], a["rnn"]["step_size.weight"])
    assert not torch.equal(a["rnn"]["mix_layer1.weight"], a["rnn"]["mix_layer2.weight"])


def test_random_weights_bounds_follow_fan_in_rule():
    groups = {**velo_groups(banks=64, hidden=64), "fc": {**SMALL_FC["mlp"], "scale": (50,), "s": ()}}
    w = random_weights(groups, 3)
    fan = {"input_weights_": 30, "input_bias_": 30, "hidden_weights_.0": 4, "hidden_bias_.0": 4,
           "output_weights_": 4, "output_bias_": 4, "lstm.linear.weight": 128, "lstm.linear.bias": 128,
           "step_size.bias": 64, "lstm_init_state.0": 64, "mix_layer1.bias": 30,
           "network.input.weight": 39, "network.input.bias": 39, "network.output.bias": 32,
           "scale": 50, "s": 1}
    flat = {k: t for g in w.values() for k, t in g.items()}
    for key, n in fan.items():
        t, bound = flat[key], 1 / n ** 0.5
        assert t.abs().max() <= bound, key
        if t.numel() >= 50:  # uniform over the whole range, not a narrower one
            assert t.abs().max() > 0.8 * bound and t.min() < 0 < t.max(), key


def test_random_weights_are_pinned_across_processes_and_machines():
    # Python's hash() is salted per process; the derivation must not use it. Pinned values
    # also catch any change of the derivation, which would silently change every benchmark.
    assert derived_seed(42, "g", "a.weight") == DERIVED_42
    w = random_weights({"g": {"a.weight": (2, 4), "a.bias": (2,)}}, 42)["g"]
    assert w["a.weight"].flatten().tolist() == PINNED_WEIGHT
    assert w["a.bias"].tolist() == PINNED_BIAS
