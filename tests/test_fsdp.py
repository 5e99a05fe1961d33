"""FSDP: stage 4 (SMAT) on 2 CPU processes (gloo) through transformers' `fsdp` / `fsdp_config` arguments and
Accelerate's FSDP2 plugin (`fully_shard` on RxT's layer classes), a full state dict saved with `save_model` that
`RxTForCausalLM.from_pretrained` reloads bit for bit.

Accelerate turns an FSDP plugin on only for accelerator process groups: `AcceleratorState.__init__`
(accelerate/state.py, the `elif self.distributed_type in [DistributedType.MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]`
branch, accelerate 1.10.1 to 1.16.0) sets `DistributedType.FSDP` there, so on CPU processes (`MULTI_CPU`) the plugin is
dropped without a word and the Trainer trains with DDP (`trainer.is_fsdp_enabled` False). The test's trainer switches
the state to FSDP once the Accelerator is built (`create_accelerator_and_postprocess`); from there on everything is
the code a GPU run goes through: Accelerate's `prepare_model` (`fully_shard` with the plugin's auto-wrap policy), the
Trainer's FSDP step and checkpoint, `accelerator.get_state_dict` and `save_rxt_model`'s sharded branch. FSDP1
(`fsdp_config["version"] = 1`) cannot run on CPU: torch refuses `sync_module_states=True` on CPU and, without it,
Accelerate's `device_id=cpu` (docs/distributed.md).
"""

import json
import textwrap
from pathlib import Path

from conftest import run_two_cpu_processes

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import os
import sys

sys.path.insert(0, {tests!r})
import torch

torch.set_num_threads(1)
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, gather_object
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from conftest import tiny_corpus
from test_smat_trainer import dataset
from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM, modeling_rxt
from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer, special_token_ids
from rxt_hf.trainers.smat_trainer import SMATConfig, SMATObjective, SMATTrainer, component_parameters

OUT = {out!r}


class CPUFSDPSMATTrainer(SMATTrainer):
    \"\"\"Accelerate's FSDP path on CPU processes: Accelerate keeps FSDP for accelerator process groups (see the
    module docstring), so switch the state to FSDP with the plugin the Trainer built from `fsdp_config`.\"\"\"

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if not self.is_fsdp_enabled:
            assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # the shared PartialState too: a later AcceleratorState() copies its distributed_type
            state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


tokenizer = build_tokenizer(tiny_corpus(), vocab_size=400, min_frequency=2, model_max_length=128)
torch.manual_seed(0)  # the same initial weights in both processes
config = RxTConfig.from_preset("rxt-tiny", vocab_size=len(tokenizer), memory_norm_type="gated-ema-rms",
                               **special_token_ids(tokenizer))
model = RxTForCausalLM(config)
initial = {{name: tensor.clone() for name, tensor in model.state_dict().items()}}
layer_classes = list(RxTForCausalLM._no_split_modules)
args = SMATConfig(
    output_dir=os.path.join(OUT, "run"), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-3,
    warmup_steps=1, logging_steps=1, save_steps=3,
    # gradual unfreezing under FSDP: requires_grad of the sharded parameters changes between steps
    freeze_schedule={{"decoder": 0, "memory_cross_attention": 0, "memory_attention": 0, "encoder": 1, "embedding": 2}}, report_to="none", disable_tqdm=True, max_length=48,
    fsdp=True,  # full_shard with the auto-wrap policy of fsdp_config
    fsdp_config={{"version": 2, "transformer_layer_cls_to_wrap": layer_classes, "state_dict_type": "FULL_STATE_DICT"}},
)
trainer = CPUFSDPSMATTrainer(model, args, train_dataset=dataset(16), processing_class=tokenizer)
accelerator = trainer.accelerator
trainer.train()
rank = accelerator.process_index
assert accelerator.num_processes == 2 and accelerator.is_fsdp2 and trainer.is_fsdp_enabled

# FSDP2 wrapped the stage module and every RxT layer; each process holds half of each parameter (dim 0)
assert isinstance(trainer.model_wrapped, FSDPModule), type(trainer.model_wrapped)
classes = tuple(getattr(modeling_rxt, name) for name in layer_classes)
layers = [m for m in trainer.rxt_model.modules() if isinstance(m, classes)]
assert {{c for c in classes if any(isinstance(m, c) for m in layers)}} == set(classes)
assert all(isinstance(m, FSDPModule) for m in layers)
for name, param in trainer.model_wrapped.named_parameters():
    assert isinstance(param, DTensor) and param.placements == (Shard(0),), name
    assert param.to_local().shape[0] == (param.shape[0] + 1) // 2 or rank == 1, name

# the sharded model on one fixed batch: the same loss in both processes
conversations = dataset(4, tag="eval")
batch = trainer.data_collator([conversations[i] for i in range(4)])
trainer.model.eval()
with torch.no_grad():
    sharded_loss = float(trainer.model(batch).loss)  # all-gathers the shards layer by layer: every process runs it
losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
seen = gather_object([(sharded_loss, losses)])
assert len(seen) == 2 and seen[0] == seen[1], seen
assert len(losses) == 3

full = accelerator.get_state_dict(trainer.model_wrapped)  # collective; the full tensors land on process 0
buffers = {{name: buffer.clone() for name, buffer in trainer.rxt_model.named_buffers()}}  # not sharded
folder = trainer.save_model(os.path.join(OUT, "model"))  # save_rxt_model: collective, process 0 writes

if accelerator.is_main_process:
    trained = {{name[len("model."):]: tensor for name, tensor in full.items()}}
    assert set(trained) == set(initial), sorted(set(trained) ^ set(initial))
    reloaded = RxTForCausalLM.from_pretrained(folder)
    state = reloaded.state_dict()
    assert set(state) == set(trained), sorted(set(state) ^ set(trained))
    different = [name for name in state if not torch.equal(state[name], trained[name])]
    assert not different, different
    reloaded_buffers = dict(reloaded.named_buffers())
    assert buffers and set(reloaded_buffers) == set(buffers)
    assert all(torch.equal(reloaded_buffers[name], buffers[name]) for name in buffers)

    # training happened: every component moved, the encoder and memory attention (trained through
    # update_memory inside SMAT's forward) included
    for component, params in component_parameters(reloaded).items():
        names = {{id(p): n for n, p in reloaded.named_parameters()}}
        moved = [names[id(p)] for p in params if not torch.equal(p.detach(), initial[names[id(p)]])]
        assert moved, f"no parameter of {{component}} changed"

    # the reloaded model computes the sharded model's loss (STM from the learned initial state, update_memory)
    reloaded.eval()
    with torch.no_grad():
        loss = float(SMATObjective(reloaded, args)(batch).loss)
    assert abs(loss - sharded_loss) < 1e-5, (loss, sharded_loss)

    # the Trainer's FSDP checkpoint (FULL_STATE_DICT) holds the same weights, under the stage module's names
    import safetensors.torch

    checkpoint = safetensors.torch.load_file(os.path.join(args.output_dir, "checkpoint-3", "model.safetensors"))
    assert all(torch.equal(checkpoint[name], full[name]) for name in checkpoint), "checkpoint differs"
    assert set(checkpoint) <= set(full)
    print("FSDP_OK", trainer.state.global_step, [round(x, 4) for x in losses], round(sharded_loss, 5))
accelerator.wait_for_everyone()
"""


def test_fsdp2_smat_two_cpu_processes_full_state_dict(tmp_path):
    script = tmp_path / "fsdp_smat.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(ROOT / "tests"), out=str(tmp_path))))
    result = run_two_cpu_processes(script, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "FSDP_OK 3" in result.stdout, result.stdout[-2000:]
    folder = tmp_path / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "rxt_training_history.json", "README.md"):
        assert (folder / name).is_file(), name
    history = json.loads((folder / "rxt_training_history.json").read_text())
    assert history[-1]["stage"] == "smat" and history[-1]["num_processes"] == 2 and history[-1]["steps"] == 3


def test_stage_module_names_the_layers_fsdp_wraps():
    """FSDP wraps the stage module, not the model: it names the model's layer classes, so Accelerate's transformer
    auto-wrap policy without class names (what `accelerate config` writes by default) still wraps RxT's layers."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
    from rxt_hf.trainers.smat_trainer import SMATConfig, SMATObjective

    model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=300))
    stage = SMATObjective(model, SMATConfig(output_dir="unused", report_to="none"))
    assert sorted(stage._no_split_modules) == sorted(RxTForCausalLM._no_split_modules)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(stage)
    assert sorted(plugin.transformer_cls_names_to_wrap) == sorted(RxTForCausalLM._no_split_modules)


def test_recipe_stage_config_takes_fsdp_arguments():
    """`rxt train RECIPE --set stages.smat.config.fsdp=... --set stages.smat.config.fsdp_config=...` reaches the
    stage's TrainingArguments (docs/distributed.md)."""
    from rxt_hf.recipes.recipe import load_recipe

    recipe = load_recipe(str(ROOT / "recipes" / "default.yaml"), [
        "stages.smat.config.fsdp=full_shard",
        "stages.smat.config.fsdp_config={version: 2, transformer_layer_cls_to_wrap: "
        "[RxTDecoderLayer, RxTEncoderLayer, RxTMemoryAttentionLayer]}",
    ])
    args = recipe.stage("smat").build_config(output_dir="unused")
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["transformer_cls_names_to_wrap"] == "RxTDecoderLayer,RxTEncoderLayer,RxTMemoryAttentionLayer"


def test_accelerate_and_deepspeed_config_files():
    """recipes/accelerate: the FSDP config loads as an Accelerate config wrapping RxT's layers; the DeepSpeed ZeRO-2/3
    files are JSON whose hidden-size-based buckets are numbers (transformers fills those `auto` values from
    `model.config.hidden_size`, and the module a stage trainer wraps has no `config`)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from rxt_hf.modeling_rxt import RxTForCausalLM

    folder = ROOT / "recipes" / "accelerate"
    fsdp = load_config_from_file(str(folder / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",") == list(RxTForCausalLM._no_split_modules)
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    for stage in (2, 3):
        config = json.loads((folder / f"deepspeed_zero{stage}.json").read_text())
        zero = config["zero_optimization"]
        assert zero["stage"] == stage
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            assert zero.get(key, 0) != "auto", key
        assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    assert json.loads((folder / "deepspeed_zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"]  # save_model gathers the full weights
