"""DeepSpeed ZeRO with 2 CPU processes through `posttrain train`, launched the two ways
that work on CPU (torchrun / the deepspeed launcher, DS_ACCELERATOR=cpu): ZeRO-2 and
ZeRO-3 end where the same run in plain DDP (gloo) ends, and LoRA on every group of the
hybrid, routed experts included, trains under ZeRO-3 with its gradient check passing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fixtures_chat import tiny_recipe, write_chat_data, write_recipe
from pipeline.ports import free_port
from pipeline.records import read_json

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = {"max_steps": 6, "per_device_train_batch_size": 2, "max_length": 64}


def launch(recipe_path: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
           "MASTER_ADDR": "127.0.0.1"}
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
               "-m", "posttrain.cli", "train", str(recipe_path)]
    else:
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port,
               "--module", "posttrain.cli", "train", str(recipe_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_json(out / "loss_curve.json")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    write_chat_data(folder)
    return folder


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("ddp")
    out = folder / "out"
    launch(write_recipe(folder / "ddp.yaml", tiny_recipe(data_dir, out, sft=STEPS)))
    return out


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_run_ends_where_ddp_ends(tmp_path, data_dir, ddp_run, stage):
    out = tmp_path / "out"
    config = str(ROOT / "recipes" / "accelerate" / f"{stage}.json")
    launch(write_recipe(tmp_path / f"{stage}.yaml",
                        tiny_recipe(data_dir, out, sft={**STEPS, "deepspeed": config})))
    ddp, zero = losses(ddp_run), losses(out)
    assert len(zero) == len(ddp) == 6
    assert zero[-1] < zero[0] - 0.3  # it trains
    assert max(abs(a - b) for a, b in zip(ddp, zero)) < 1e-3, (ddp, zero)
    # ZeRO-3 gathers the sharded weights on save: a whole model, like DDP's.
    a = load_file(str(ddp_run / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


# Packed: TRL's bfd packing, the rows flattened padding-free, boundaries reset in the
# Mamba layers; the activation loss on too.
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_zero3_lora_with_routed_experts_under_the_deepspeed_launcher(tmp_path, data_dir, packing):
    out = tmp_path / "out"
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["attention", "mamba", "mlp", "experts"]}
    sft = {**STEPS, "learning_rate": 1e-2, "packing": packing,
           "deepspeed": str(ROOT / "recipes" / "accelerate" / "zero3.json")}
    sections = {"activation_loss": {"alpha": 1e-5, "sites": ["moe", "mamba"]}} if packing else {}
    launch(write_recipe(tmp_path / "z3lora.yaml",
                        tiny_recipe(data_dir, out, lora=lora, sft=sft, **sections)),
           launcher="deepspeed")
    coverage = read_json(out / "lora_coverage.json")
    assert coverage["no_gradient"] == []
    assert all(coverage["groups"][g]["trainable_params"] > 0
               for g in ("attention", "mamba", "mlp", "experts"))
    curve = losses(out)
    assert min(curve[-3:]) < curve[0]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    experts = [k for k in adapter if ".experts." in k]
    assert experts and all(adapter[k].numel() > 0 for k in adapter)
