"""Conversion from the reference implementation (rxlm 0.3.92) with numerical parity, against committed fixtures.

`tests/fixtures/reference` was written by `tests/fixtures/make_reference_fixtures.py` running the reference in its own
virtualenv: tiny models in the reference's layouts and, per case, the reference's decoder logits for a query given an
STM, its new STM after a memory update, and its greedy tokens (`manifest.json` lists the cases). Nothing here imports
the reference.
"""

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import remote_env, remote_python
from rxt_hf.modeling_rxt import RxTForCausalLM
from rxt_hf.recipes.cli import main as cli_main
from rxt_hf.recipes.convert import ATTRIBUTION_NOTICE, ReferenceConversionError, convert_reference_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TOLERANCE = 1e-4


def convert_case(name: str, dest: Path, **overrides) -> Path:
    case = MANIFEST[name]
    options = {"rope_layout": case["rope_layout"], **overrides}
    if "source" in case:
        return convert_reference_checkpoint(FIXTURES / case["source"], dest, **options)
    return convert_reference_checkpoint(
        None,
        dest,
        decoder=FIXTURES / case["decoder"],
        encoder=FIXTURES / case["encoder"],
        memory_attention=FIXTURES / case["memory_attention"],
        tokenizer=FIXTURES / case["tokenizer"],
        **options,
    )


def expected(name: str) -> dict[str, torch.Tensor]:
    out = {}
    for part in MANIFEST[name]["expected"]:
        out.update(load_file(str(FIXTURES / "expected" / f"{part}.safetensors")))
    return out


def batch_first(stm: torch.Tensor) -> torch.Tensor:
    """Reference STM [L, B, S, D] -> this project's [B, L, S, D]."""
    return stm.transpose(0, 1).contiguous()


@torch.no_grad()
def run_model(model, data: dict) -> dict[str, torch.Tensor]:
    """What the parity checks compare: logits, new STM and greedy tokens (the reference appends [A] to the prompt)."""
    stm = batch_first(data["stm"])
    logits = model(data["query_ids"], stm_state=stm).logits
    new_stm = model.update_memory(stm, data["interaction_ids"], data["interaction_mask"])
    prompt = torch.cat([data["prompt_ids"], torch.tensor([[model.config.answer_token_id]])], dim=1)
    output = model.generate(
        prompt,
        stm_state=batch_first(data["generation_stm"]),
        max_new_tokens=len(data["generated"]),
        do_sample=False,
        eos_token_id=model.config.eos_token_id,
    )
    return {"logits": logits, "new_stm": new_stm, "generated": output[0, prompt.shape[1] :]}


def assert_parity(result: dict, data: dict) -> None:
    logits_error = (result["logits"] - data["logits"]).abs().max().item()
    stm_error = (result["new_stm"] - batch_first(data["new_stm"])).abs().max().item()
    assert logits_error <= TOLERANCE, f"logits differ from the reference by {logits_error:.3g}"
    assert stm_error <= TOLERANCE, f"the new STM differs from the reference by {stm_error:.3g}"
    generated = data["generated"].tolist()
    assert result["generated"].tolist()[: len(generated)] == generated


# ----------------------------------------------------------------------------------------------------------
# parity, every case


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_converted_model_computes_what_the_reference_computes(tmp_path, name):
    folder = convert_case(name, tmp_path / "converted")
    model = RxTForCausalLM.from_pretrained(folder).eval()
    assert_parity(run_model(model, expected(name)), expected(name))


def test_the_fixtures_cover_every_variant_and_gate():
    """Every memory-attention network and gate type / activation / granularity / slot status of rxlm 0.3.92."""
    configs = []
    for case in MANIFEST.values():
        folder = FIXTURES / case.get("memory_attention", case.get("source", ""))
        config = json.loads((folder / "config.json").read_text())
        configs.append(config.get("memory_attention_config", config))
    covers = " ".join(case["covers"] for case in MANIFEST.values())
    for network in (
        "RxTSimpleMemoryAttention",
        "RxTSelfMemoryAttention",
        "RxTInterlayerMemoryAttention",
        "RxTSelfInterlayerMemoryAttention",
        "grouped self-interlayer",
    ):
        assert network in covers, network
    gated = [c for c in configs if c.get("use_gated_residual")]
    assert {c["residual_gate_type"] for c in gated} == {"static", "elementwise", "linear"}
    assert {c.get("use_tanh_residual_gate", True) for c in gated} == {True, False}
    assert {c.get("residual_per_slot_gate", True) for c in gated} == {True, False}
    assert {c.get("residual_gate_slot_status_type", "mean") for c in configs} == {"mean", "linear"}
    assert any(not c.get("use_gated_residual") for c in configs) and any(c.get("disable_residual") for c in configs)
    assert {c.get("norm_type", "classic-rms") for c in configs} == {
        "classic-rms",
        "layer",
        "rms",
        "adaptive",
        "positional",
    }


def test_rope_layout_matters(tmp_path):
    """The alpha weights converted with the wrong RoPE layout do not reproduce the reference: the fixtures can tell."""
    folder = convert_case("alpha", tmp_path / "wrong", rope_layout="legacy")
    result = run_model(RxTForCausalLM.from_pretrained(folder).eval(), expected("alpha"))
    assert (result["logits"] - expected("alpha")["logits"]).abs().max() > 1e-2
    assert (result["new_stm"] - batch_first(expected("alpha")["new_stm"])).abs().max() > 1e-2


def test_remote_code_load_in_a_fresh_process(tmp_path):
    """The converted folder loads through the Auto classes with trust_remote_code in a process that never imports the
    project, computes the reference's outputs there, and its tokenizer encodes a query as the reference does."""
    folder = convert_case("alpha", tmp_path / "converted")
    data = expected("alpha")
    save_file({k: v.contiguous() for k, v in data.items()}, str(tmp_path / "inputs.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(REMOTE_PARITY)
    result = subprocess.run(
        [remote_python(), str(script), str(folder), str(tmp_path)],
        cwd=tmp_path,
        env=remote_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_parity(load_file(str(tmp_path / "outputs.safetensors")), data)
    # the reference tokenizes "[BOS][Q]" + query (add_special_tokens=False); the chat template then adds [A]
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(FIXTURES / "tokenizer" / "tokenizer.json"))
    query = "where is the red cat?"
    ids = reference.encode(f"[BOS][Q]{query}", add_special_tokens=False).ids + [reference.token_to_id("[A]")]
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"chat_ids": ids, "decoded": query}


REMOTE_PARITY = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, work = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "modeling_rxt" not in sys.modules and "recipes" not in sys.modules, "the project must not be imported"
    data = load_file(work + "/inputs.safetensors")
    stm = data["stm"].transpose(0, 1).contiguous()
    with torch.no_grad():
        logits = model(data["query_ids"], stm_state=stm).logits
        new_stm = model.update_memory(stm, data["interaction_ids"], data["interaction_mask"])
        prompt = torch.cat([data["prompt_ids"], torch.tensor([[model.config.answer_token_id]])], dim=1)
        output = model.generate(prompt, stm_state=data["generation_stm"].transpose(0, 1).contiguous(),
                                max_new_tokens=len(data["generated"]), do_sample=False)
    generated = output[0, prompt.shape[1]:].contiguous()
    outputs = {"logits": logits, "new_stm": new_stm.contiguous(), "generated": generated}
    save_file(outputs, work + "/outputs.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    query = "where is the red cat?"
    messages = [{"role": "user", "content": query}]
    chat = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    chat = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
    text = tokenizer.decode(chat[2:-1], skip_special_tokens=True).strip()
    with open(work + "/tokenizer.json", "w") as handle:
        json.dump({"chat_ids": chat, "decoded": text}, handle)
    """
)


# ----------------------------------------------------------------------------------------------------------
# the written folder


def test_folder_contents_model_card_and_record(tmp_path):
    folder = convert_case("alpha", tmp_path / "converted", source_name="ReactiveAI/RxT-Alpha-Test")
    files = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_rxt.py",
        "configuration_rxt.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "rxt_conversion.json",
    } <= files
    card = (folder / "README.md").read_text()
    assert ATTRIBUTION_NOTICE in card
    assert "ReactiveAI/RxT-Alpha-Test" in card and "base_model:" in card
    assert "RAML" in card and "MODELS_LICENSE" in card and "non-commercial" in card
    assert "self-interlayer network" in card  # the 0.3.92 'interlayer' quirk is reported
    record = json.loads((folder / "rxt_conversion.json").read_text())
    assert record["options"] == {"rope_layout": "interleaved", "initial_stm": "normal"}
    assert record["source"]["model_class"] == "RxTAlpha"
    config = json.loads((folder / "config.json").read_text())
    assert config["memory_attention_variant"] == "self-interlayer" and config["memory_qk_norm"] is False
    assert not any(".rope." in key for key in load_file(str(folder / "model.safetensors")))


def test_initial_stm_modes(tmp_path):
    model = RxTForCausalLM.from_pretrained(convert_case("beta", tmp_path / "normal")).eval()
    assert model.config.stm_init_mode == "normal" and model.config.stm_init_std == 1.0
    saved = RxTForCausalLM.from_pretrained(convert_case("beta", tmp_path / "saved", initial_stm="saved")).eval()
    stored = load_file(str(FIXTURES / "beta" / "model.safetensors"))["decoder.model.stm.memory"]
    assert torch.equal(saved.init_memory(1)[0], stored[:, 0])


def test_command_line(tmp_path, capsys):
    case = MANIFEST["interlayer-linear-sigmoid-slot"]
    dest = tmp_path / "cli"
    code = cli_main(
        [
            "convert",
            str(dest),
            "--decoder",
            str(FIXTURES / case["decoder"]),
            "--encoder",
            str(FIXTURES / case["encoder"]),
            "--memory-attention",
            str(FIXTURES / case["memory_attention"]),
            "--tokenizer",
            str(FIXTURES / "tokenizer"),
        ]
    )
    assert code == 0 and "converted to" in capsys.readouterr().out
    data = expected("interlayer-linear-sigmoid-slot")
    assert_parity(run_model(RxTForCausalLM.from_pretrained(dest).eval(), data), data)
    with pytest.raises(SystemExit, match="exists and is not empty"):
        cli_main(["convert", str(FIXTURES / "alpha"), str(dest)])


def test_source_folder_of_component_folders(tmp_path):
    """SRC may be a folder holding the three component folders (and the tokenizer)."""
    src = tmp_path / "src"
    case = MANIFEST["self-interlayer-linear-sigmoid-slot"]
    for role in ("decoder", "encoder", "memory_attention"):
        shutil.copytree(FIXTURES / case[role], src / role)
    shutil.copytree(FIXTURES / "tokenizer", src / "tokenizer")
    folder = convert_reference_checkpoint(src, tmp_path / "converted")
    data = expected("self-interlayer-linear-sigmoid-slot")
    assert_parity(run_model(RxTForCausalLM.from_pretrained(folder).eval(), data), data)


# ----------------------------------------------------------------------------------------------------------
# bad input: a clear error, and DEST never half written


def copy_alpha(tmp_path) -> Path:
    folder = tmp_path / "alpha"
    shutil.copytree(FIXTURES / "alpha", folder)
    return folder


def edit_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def assert_nothing_written(parent: Path, dest: Path) -> None:
    assert not dest.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{dest.name}.")], "staging left behind"


def test_not_a_reference_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReferenceConversionError, match="not a reference checkpoint"):
        convert_reference_checkpoint(empty, tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ReferenceConversionError, match=r"other/config.json is not a whole RxTAlpha"):
        convert_reference_checkpoint(other, tmp_path / "out")
    with pytest.raises(ReferenceConversionError, match="it is a decoder component"):
        convert_reference_checkpoint(FIXTURES / "components" / "decoder", tmp_path / "out")
    with pytest.raises(ReferenceConversionError, match="not given"):
        convert_reference_checkpoint(None, tmp_path / "out", decoder=FIXTURES / "components" / "decoder")
    with pytest.raises(ReferenceConversionError, match="is not a reference encoder folder"):
        convert_reference_checkpoint(
            None,
            tmp_path / "out",
            decoder=FIXTURES / "components" / "decoder",
            encoder=FIXTURES / "components" / "decoder",
            memory_attention=FIXTURES / "components" / "decoder",
        )
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unknown_variant_and_unsupported_feature(tmp_path):
    folder = copy_alpha(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["memory_attention_variant"] = "holographic"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReferenceConversionError, match=r"memory_attention_variant='holographic' is unknown"):
        convert_reference_checkpoint(folder, tmp_path / "out")
    config["memory_attention_variant"] = "interlayer"
    config["decoder_config"]["use_gated_attention"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ReferenceConversionError, match=r"config.json: decoder use_gated_attention=True is not supported"
    ):
        convert_reference_checkpoint(folder, tmp_path / "out")
    with pytest.raises(ReferenceConversionError, match="rope_layout='gptj' is unknown"):
        convert_reference_checkpoint(FIXTURES / "alpha", tmp_path / "out", rope_layout="gptj")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_tensor(tmp_path):
    folder = copy_alpha(tmp_path)
    edit_weights(folder, lambda t: t.pop("memory_attention.model.interlayer_gate_layers.1.gate.weight"))
    with pytest.raises(ReferenceConversionError) as error:
        convert_reference_checkpoint(folder, tmp_path / "out")
    message = str(error.value)
    assert str(folder / "model.safetensors") in message
    assert "'memory_attention.model.interlayer_gate_layers.1.gate.weight' is missing" in message
    assert "shape [4, 4]" in message
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_shape_mismatch(tmp_path):
    folder = copy_alpha(tmp_path)
    key = "decoder.model.layers.0.memory_cross_attention.k_proj.weight"
    edit_weights(folder, lambda t: t.__setitem__(key, torch.zeros(12, 16)))
    with pytest.raises(ReferenceConversionError, match=rf"'{key}' has shape \[12, 16\], expected \[4, 16\]"):
        convert_reference_checkpoint(folder, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unexpected_tensor(tmp_path):
    folder = copy_alpha(tmp_path)
    edit_weights(folder, lambda t: t.__setitem__("encoder.model.layers.1.adapter.weight", torch.zeros(2)))
    with pytest.raises(
        ReferenceConversionError,
        match=r"unexpected tensor\(s\) in the encoder: 'encoder.model.layers.1.adapter.weight'",
    ):
        convert_reference_checkpoint(folder, tmp_path / "out")
    edit_weights(folder, lambda t: t.__setitem__("critic.value_head.weight", torch.zeros(2)))
    with pytest.raises(ReferenceConversionError, match=r"'critic.value_head.weight'.*not an RxTAlpha / RxTBeta"):
        convert_reference_checkpoint(folder, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_tokenizer_problems(tmp_path):
    folder = copy_alpha(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ReferenceConversionError, match="no tokenizer.json found"):
        convert_reference_checkpoint(folder, tmp_path / "out")
    big = json.loads((FIXTURES / "tokenizer" / "tokenizer.json").read_text())
    vocab = big["model"]["vocab"]
    for i in range(40):
        vocab[f"extra{i}"] = len(vocab)
    (folder / "tokenizer.json").write_text(json.dumps(big))
    with pytest.raises(
        ReferenceConversionError, match=r"the tokenizer has 104 tokens, more than the model's vocab_size=64"
    ):
        convert_reference_checkpoint(folder, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_dest_is_never_half_written(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous model")
    with pytest.raises(ReferenceConversionError, match="exists and is not empty"):
        convert_reference_checkpoint(FIXTURES / "alpha", dest)

    import transformers

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_reference_checkpoint(FIXTURES / "alpha", dest, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"], "the previous folder must survive a failed conversion"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")], "staging left behind"
    monkeypatch.undo()
    convert_reference_checkpoint(FIXTURES / "alpha", dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_memory_cross_attention_built_with_self_attention_groups(tmp_path):
    """RxNN built memory cross-attention with att_groups even where cross_att_groups was set: the stored shapes
    decide, and the conversion says so."""
    case = MANIFEST["interlayer-linear-sigmoid-slot"]
    decoder = tmp_path / "decoder"
    shutil.copytree(FIXTURES / case["decoder"], decoder)
    config = json.loads((decoder / "config.json").read_text())
    config["cross_att_groups"] = 1  # the fixture decoder was built with att_groups=2 everywhere
    (decoder / "config.json").write_text(json.dumps(config))
    folder = convert_reference_checkpoint(
        None,
        tmp_path / "converted",
        decoder=decoder,
        encoder=FIXTURES / case["encoder"],
        memory_attention=FIXTURES / case["memory_attention"],
        tokenizer=FIXTURES / "tokenizer",
    )
    notes = json.loads((folder / "rxt_conversion.json").read_text())["notes"]
    assert any("built with the self-attention groups" in note for note in notes)
    data = expected("interlayer-linear-sigmoid-slot")
    assert_parity(run_model(RxTForCausalLM.from_pretrained(folder).eval(), data), data)
