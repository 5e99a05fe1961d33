"""The model reproduces a committed fixture: logits, memory updates and greedy generations of fixed tiny checkpoints.

`tests/fixtures/modeling/` holds three tiny checkpoints saved by an earlier commit (MoE decoder with GQA / SQA heads,
dense decoder with SQA heads and a tied head, the converter's MoE switches; all with an interlayer memory attention)
and, in `expected.safetensors`, inputs and the outputs that commit computed (its id is in the file's metadata;
`make_modeling_fixture.py` says how it was built). A refactor of the modeling code must keep them.

Tolerance: floating-point outputs within 1e-6 (absolute, `atol=1e-6, rtol=0`), token ids equal. Logits are compared
at unpadded positions only (what a padded position computes is not part of the contract). Everything runs on one
thread, as the fixture was built.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rxt_hf.modeling_rxt import RxTForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "modeling"
ATOL = 1e-6

_spec = importlib.util.spec_from_file_location("make_modeling_fixture", FIXTURE / "make_modeling_fixture.py")
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected(case: str) -> dict[str, torch.Tensor]:
    return {key[len(case) + 1 :]: value for key, value in load_file(FIXTURE / "expected.safetensors").items() if key.startswith(case + ".")}


def case_inputs(case: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in expected(case).items() if "." not in key}


def assert_matches(name: str, actual: torch.Tensor, wanted: torch.Tensor, inputs: dict[str, torch.Tensor]):
    assert actual.shape == wanted.shape, f"{name}: shape {list(actual.shape)}, expected {list(wanted.shape)}"
    if not wanted.is_floating_point():
        assert torch.equal(actual, wanted), f"{name}: {actual.tolist()} != {wanted.tolist()}"
        return
    if name == "logits":  # only unpadded positions
        keep = inputs["mask"].bool()
        actual, wanted = actual[keep], wanted[keep]
    torch.testing.assert_close(actual, wanted, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_fixture_records_its_commit_and_stays_small():
    with safe_open(str(FIXTURE / "expected.safetensors"), "pt") as handle:
        assert len(handle.metadata()["commit"]) == 40
    size = sum(path.stat().st_size for path in FIXTURE.rglob("*.safetensors"))
    assert size < 200_000, size


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(maker.CASES))
def test_saved_checkpoint_reproduces_the_fixture(case, implementation):
    """A folder saved by the fixture's commit loads with this checkout and computes the same numbers."""
    model = RxTForCausalLM.from_pretrained(FIXTURE / case, attn_implementation=implementation).eval()
    wanted = expected(case)
    inputs = case_inputs(case)
    outputs = maker.outputs(model, inputs)
    checked = 0
    for name, value in outputs.items():
        key = f"{implementation}.{name}"
        if key in wanted:
            assert_matches(name, value, wanted[key], inputs)
            checked += 1
    assert checked == (len(outputs) if implementation == "sdpa" else len(maker.EAGER_KEYS))


@pytest.mark.parametrize("case", list(maker.CASES))
def test_old_state_dict_loads_through_load_state_dict(case):
    """`load_state_dict` of the old weights (the path of the converter and of training checkpoints) gives the same
    numbers as the fixture."""
    reference = RxTForCausalLM.from_pretrained(FIXTURE / case).eval()
    model = RxTForCausalLM(reference.config).eval()
    missing, unexpected = model.load_state_dict(load_file(FIXTURE / case / "model.safetensors"), strict=False)
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    assert set(missing) == tied and not unexpected, (missing, unexpected)
    inputs = case_inputs(case)
    wanted = expected(case)
    with torch.no_grad():
        logits = model(inputs["ids"], attention_mask=inputs["mask"], stm_state=inputs["stm"]).logits
        new_stm = model.update_memory(inputs["stm"], inputs["interaction_ids"], inputs["interaction_mask"])
    assert_matches("logits", logits, wanted["sdpa.logits"], inputs)
    assert_matches("new_stm", new_stm, wanted["sdpa.new_stm"], inputs)


def test_top_level_rope_theta_of_an_old_config_loads_into_rope_parameters():
    config = RxTForCausalLM.from_pretrained(FIXTURE / "moe_gqa").config
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    assert config.rope_theta == 500.0


@pytest.mark.parametrize("case", list(maker.CASES))
def test_save_and_reload_keeps_every_output(case, tmp_path):
    """Saving writes the same tensor names as the fixture's commit did (per-expert MoE weights: the fused experts are
    converted back on save), and the saved folder reloads to the same numbers."""
    model = RxTForCausalLM.from_pretrained(FIXTURE / case).eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as new, safe_open(
        str(FIXTURE / case / "model.safetensors"), "pt"
    ) as old:
        assert set(new.keys()) == set(old.keys())
        assert all(torch.equal(new.get_tensor(key), old.get_tensor(key)) for key in old.keys())
    reloaded = RxTForCausalLM.from_pretrained(tmp_path).eval()
    inputs = case_inputs(case)
    before, after = maker.outputs(model, inputs), maker.outputs(reloaded, inputs)
    for name in before:
        assert torch.equal(before[name], after[name]), name
