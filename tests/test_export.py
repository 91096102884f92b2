"""`posttrain export`: every profile is reloaded from disk and matches the in-memory
model's logits; the vllm profile drops the routed-expert adapter and says what that
costs; a full fine-tune exports only `merged`; a mismatch fails the export."""

import json

import pytest
from safetensors.torch import load_file

from fixtures_chat import tiny_recipe, write_chat_data, write_recipe
from pipeline.cli import main as cli
from pipeline.records import read_json

pytestmark = pytest.mark.slow  # two short trainings + three exports

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["attention", "mamba", "mlp", "experts"]}
SHORT = {"max_steps": 3, "per_device_train_batch_size": 2, "max_length": 64, "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(recipe path, final folder) for a LoRA run and a full run of a few steps each."""
    folder = tmp_path_factory.mktemp("export")
    write_chat_data(folder / "data")
    runs = {}
    for mode, lora in (("lora", LORA), ("full", None)):
        out = folder / f"sft-{mode}"
        path = write_recipe(folder / f"{mode}.yaml",
                            tiny_recipe(folder / "data", out, lora=lora, sft=SHORT))
        assert cli(["train", str(path)]) == 0
        runs[mode] = (path, out / "final")
    return runs


def test_lora_export_round_trips_adapter_merged_and_vllm(trained, tmp_path):
    recipe, final = trained["lora"]
    out = tmp_path / "export"
    assert cli(["export", str(recipe), "--model", str(final), "--out", str(out)]) == 0
    report = read_json(out / "export_report.json")
    assert set(report["profiles"]) == {"adapter", "merged", "vllm"}
    for profile, entry in report["profiles"].items():
        assert entry["passed"] and entry["max_abs_logit_diff"] <= 1e-5, (profile, entry)

    # adapter: PEFT format; merged: a plain model folder with tokenizer, no LoRA left.
    assert (out / "adapter" / "adapter_config.json").is_file()
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(".experts." in k for k in adapter)
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert not any("lora_" in k for k in merged)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "merged" / name).is_file()
    assert (out / "base" / "model.safetensors").is_file()  # random-init base ships along

    # vllm: no routed-expert weights, no target_parameters; the cost is reported.
    vllm = report["profiles"]["vllm"]
    served = load_file(str(out / "vllm" / "adapter_model.safetensors"))
    assert not any(".experts." in k for k in served)
    assert set(served) == {k for k in adapter if ".experts." not in k}
    assert json.loads((out / "vllm" / "adapter_config.json").read_text())["target_parameters"] is None
    assert len(vllm["dropped_weights"]) == 16  # 4 MoE layers x 2 weights x (A, B)
    assert vllm["drop_effect_max_abs_logit_diff"] > 0


def test_full_fine_tune_exports_only_merged(trained, tmp_path):
    recipe, final = trained["full"]
    out = tmp_path / "export"
    assert cli(["export", str(recipe), "--model", str(final), "--out", str(out)]) == 0
    profiles = read_json(out / "export_report.json")["profiles"]
    assert profiles["merged"]["passed"] and profiles["merged"]["max_abs_logit_diff"] == 0.0
    assert "only the merged profile applies" in profiles["adapter"]["skipped"]
    assert "only the merged profile applies" in profiles["vllm"]["skipped"]
    assert not (out / "adapter").exists() and not (out / "vllm").exists()


def test_export_fails_loudly_beyond_tolerance(trained, tmp_path):
    # Merging sums W + BA in float32: ~1e-7 off the unmerged model, over a zero tolerance.
    recipe, final = trained["lora"]
    out = tmp_path / "export"
    rc = cli(["export", str(recipe), "--model", str(final), "--out", str(out),
              "--set", "export.tolerance=0", "--set", "export.profiles=[adapter, merged]"])
    assert rc == 1
    profiles = read_json(out / "export_report.json")["profiles"]
    assert profiles["adapter"]["passed"] and not profiles["merged"]["passed"]


def test_export_of_a_missing_model_folder_writes_nothing(trained, tmp_path, capsys):
    recipe, _ = trained["lora"]
    out = tmp_path / "export"
    assert cli(["export", str(recipe), "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--model" in capsys.readouterr().err and not out.exists()
