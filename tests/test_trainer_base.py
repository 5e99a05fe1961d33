"""The stage trainer base on transformers.Trainer: args validation, schedule, logs, resume equivalence, the saved
model folder + card, 2-process launch."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_two_cpu_processes

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.tokenization_rxt import special_token_ids
from rxt_hf.trainers.joint_lm_trainer import JointLMConfig, JointLMTrainer
from rxt_hf.trainers.model_card import render_model_card
from transformers import get_scheduler
from transformers.trainer_utils import get_last_checkpoint
from rxt_hf.trainers.trainer_base import RxTTrainingArguments

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is ~100x faster than two fighting ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _texts(n=16):
    from conftest import tiny_corpus

    return [{"text": t} for t in tiny_corpus(n)]


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tok), **special_token_ids(tok)))


def _args(tmp_path, name="run", **overrides):
    values = dict(
        output_dir=str(tmp_path / name),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        max_length=48,
        memory_noise_std=0.05,
        memory_slot_dropout=0.1,
    )
    values.update(overrides)
    return JointLMConfig(**values)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", 0),
        ("learning_rate", -1.0),
        ("per_device_train_batch_size", 0),
        ("adam_beta2", 1.5),
        ("warmup_steps", -0.5),
        ("gradient_accumulation_steps", 0),
        ("save_steps", 0),
        ("max_length", 0),
        ("weight_decay", -0.1),
        ("max_time_minutes", -2),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError) as error:
        RxTTrainingArguments(**{field: value})
    assert field in str(error.value) and repr(value) in str(error.value)


def test_joint_config_validation():
    with pytest.raises(ValueError, match="mode"):
        JointLMConfig(mode="mlm")
    with pytest.raises(ValueError, match="memory_slot_dropout"):
        JointLMConfig(memory_slot_dropout=1.0)


def test_warmup_cosine_schedule():
    """The default schedule is transformers' cosine_with_min_lr: linear warmup, cosine down to 10% of the peak."""
    args = RxTTrainingArguments(max_steps=100, warmup_steps=10, learning_rate=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(100),
                              num_training_steps=100, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    factor = [scheduler.lr_lambdas[0](step) for step in range(101)]
    assert factor[5] == pytest.approx(0.5)
    assert factor[10] == pytest.approx(1.0)
    assert factor[100] == pytest.approx(0.1)
    assert factor[55] == pytest.approx(0.55)
    assert RxTTrainingArguments(max_steps=100).get_warmup_steps(100) == 5  # default warmup: 5% of the steps


def test_resume_equivalence_and_jsonl_log(tmp_path, tiny_tokenizer):
    data = _texts(16)  # 4 batches per epoch: the 6 steps cross an epoch boundary
    # uninterrupted run, checkpoints every 3 steps
    full = JointLMTrainer(_model(tiny_tokenizer), _args(tmp_path, "full", save_steps=3), train_dataset=data,
                          processing_class=tiny_tokenizer)
    full.train()
    assert full.state.global_step == 6
    assert get_last_checkpoint(str(tmp_path / "full")).endswith("checkpoint-6")

    # a fresh trainer (different init) resumes from step 3 and runs to 6
    resumed = JointLMTrainer(_model(tiny_tokenizer, seed=123), _args(tmp_path, "resumed"), train_dataset=data,
                             processing_class=tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    full_state = full.model.state_dict()  # the stage module: the model and the MLM head
    resumed_state = resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.allclose(full_state[key], resumed_state[key], atol=1e-6), key

    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and not r.get("final")]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "learning_rate", "train_tokens_per_second", "train_runtime", "num_input_tokens_seen",
                "mlm_loss", "decoder_loss", "aux_loss", "decoder_accuracy"):
        assert key in steps[0], key
    resumed_steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert resumed_steps[0] == 4


def test_save_model_writes_card_and_history(tmp_path, tiny_tokenizer):
    data = _texts(8)
    trainer = JointLMTrainer(_model(tiny_tokenizer), _args(tmp_path, max_steps=2), train_dataset=data, eval_dataset=data,
                             processing_class=tiny_tokenizer)
    results = trainer.train().metrics
    assert "eval_loss" in results and "eval_decoder_accuracy" in results
    out = Path(trainer.save_rxt_model(str(tmp_path / "stage1")))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "rxt_training_history.json", "mlm_head.safetensors"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0")
    assert "library_name: transformers" in card and "reactive-transformer" in card
    total = trainer.rxt_model.num_parameters_by_component()["total"]
    assert f"| total | {total:,} |" in card
    assert "| 1 | joint-lm-pretraining | 2 |" in card
    assert "patent" in card and "trust_remote_code=True" in card

    # a later stage loaded from the folder appends to the history, and the card lists both stages
    model = RxTForCausalLM.from_pretrained(str(out))
    sft_data = [{"query": "Where does Ann live?", "answer": "Ann lives in Paris."}] * 8
    stage2 = JointLMTrainer(model, _args(tmp_path, "s2", max_steps=1, mode="sft"), train_dataset=sft_data,
                            processing_class=tiny_tokenizer)
    stage2.train()
    out2 = Path(stage2.save_rxt_model(str(tmp_path / "stage2"), evaluation={"recall_accuracy": {1: 0.8}, "recall_accuracy_no_memory": {1: 0.05}, "perplexity": 3.2}))
    history = json.loads((out2 / "rxt_training_history.json").read_text())
    assert [h["stage"] for h in history] == ["joint-lm-pretraining", "joint-sft"]
    assert history[1]["config"]["mode"] == "sft"
    card2 = (out2 / "README.md").read_text()
    assert "| 2 | joint-sft | 1 |" in card2 and "| 1 | 80.0% | 5.0% |" in card2 and "| perplexity | 3.2 |" in card2


def test_time_budget_stops_with_a_checkpoint(tmp_path, tiny_tokenizer):
    args = _args(tmp_path, max_steps=1000, max_time_minutes=0.001, save_strategy="no")  # 60 ms
    trainer = JointLMTrainer(_model(tiny_tokenizer), args, train_dataset=_texts(8), processing_class=tiny_tokenizer)
    trainer.train()
    assert trainer.stopped_by == "max_time_minutes" and 1 <= trainer.state.global_step < 1000
    assert get_last_checkpoint(str(tmp_path / "run")).endswith(f"checkpoint-{trainer.state.global_step}")


def test_model_card_without_history(tiny_tokenizer):
    card = render_model_card(_model(tiny_tokenizer), [], None, "")
    assert "No training stage recorded" in card and "Not evaluated" in card


def test_two_process_launch(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import torch
        torch.set_num_threads(1)
        from conftest import tiny_corpus
        from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
        from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer, special_token_ids
        from rxt_hf.trainers.joint_lm_trainer import JointLMConfig, JointLMTrainer

        tok = build_tokenizer(tiny_corpus(), vocab_size=400, min_frequency=2, model_max_length=128)
        torch.manual_seed(0)
        model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tok), **special_token_ids(tok)))
        args = JointLMConfig(output_dir={str(tmp_path / 'out')!r}, max_steps=3, per_device_train_batch_size=4,
                             logging_steps=1, report_to="none", disable_tqdm=True, max_length=48, save_steps=3)
        trainer = JointLMTrainer(model, args, train_dataset=[{{"text": t}} for t in tiny_corpus(32)],
                                 processing_class=tok)
        assert trainer.accelerator.num_processes == 2
        trainer.train()
        # DDP kept the replicas identical (the stage module: model and MLM head)
        flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
        gathered = trainer.accelerator.gather(flat[None])
        assert torch.allclose(gathered[0], gathered[1]), "replicas diverged"
        trainer.save_rxt_model()
        if trainer.accelerator.is_main_process:
            print("TWO_PROCESS_OK", trainer.state.global_step)
    """))
    result = run_two_cpu_processes(script, cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TWO_PROCESS_OK 3" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
    steps = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if not r.get("final")] == [1, 2, 3]
