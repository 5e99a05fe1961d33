"""Benchmarks: every benchmark runs in smoke mode and writes valid JSON; the instruments they rely on are right.

No timing is asserted anywhere (speed is what the benchmarks report, not what tests check).
"""

import argparse
import json
import math

import pytest
import torch

from rxt_hf.benchmarks import BENCHMARKS, get_benchmark, run_benchmark, timing
from rxt_hf.benchmarks.cli import add_bench_command, load_results, targets_markdown
from rxt_hf.benchmarks.common import (
    CallCounter,
    RecomputedMemoryCache,
    TokenTimer,
    active_feed_forward_size,
    build_llama_baseline,
    build_rxt,
    cache_bytes,
    generation_kwargs,
    kv_cache_bytes,
    llama_kv_bytes,
    memory_key_projections,
    rxt_query,
    stm_bytes,
)
from rxt_hf.benchmarks.memory_precache import generate_both
from rxt_hf.modeling_rxt import CACHE_FIELD, RxTConfig, output_cache

PAYLOAD_KEYS = {"name", "description", "smoke", "created", "duration_s", "machine", "config", "results", "targets", "plots", "notes"}
TARGET_KEYS = {"description", "measured", "target", "comparison", "met"}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """Every benchmark once in smoke mode (1 thread), into one temporary output folder."""
    folder = tmp_path_factory.mktemp("bench")
    payloads = {name: run_benchmark(name, smoke=True, output_dir=folder, threads=1) for name in BENCHMARKS}
    return folder, payloads


# ------------------------------------------------------------------------------------------------------
# every benchmark, smoke mode


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_smoke_run_writes_valid_json(smoke_results, name):
    folder, payloads = smoke_results
    path = folder / f"{name}.json"
    assert path.exists()
    written = json.loads(path.read_text(encoding="utf-8"))  # strict JSON: no NaN / Infinity literals
    assert PAYLOAD_KEYS <= set(written)
    assert written["name"] == name and written["smoke"] is True
    assert written["duration_s"] > 0
    for key in ("cpu", "logical_cores", "torch_threads", "torch", "transformers", "git_commit"):
        assert key in written["machine"]
    assert written["machine"]["torch_threads"] == 1
    assert written["targets"], "every benchmark reports its targets"
    for row in written["targets"].values():
        assert TARGET_KEYS <= set(row)
        assert isinstance(row["met"], bool)
    returned = payloads[name]
    assert returned["targets"].keys() == written["targets"].keys()
    assert returned["path"] == str(path)
    for plot in written["plots"]:
        assert plot.endswith(".png")
        assert (folder / plot.split("/")[-1]).exists()
    if timing.have_matplotlib() and name != "decode-overhead" and name != "memory-precache":
        assert written["plots"], f"{name} should plot when matplotlib is installed"


def test_latency_per_turn_counts_and_state(smoke_results):
    _, payloads = smoke_results
    payload = payloads["latency-per-turn"]
    config = payload["config"]
    turns, q, a = config["turns"], config["query_length"], config["answer_length"]
    results = payload["results"]
    assert results["turns"] == list(range(1, turns + 1))
    rxt, full, cached = results["rxt"], results["stateless_full_history"], results["stateless_kv_cache"]
    for record in (rxt, full, cached):
        for key in ("ttft_s", "turn_s", "ttft_median_s", "turn_median_s", "tokens_processed", "cumulative_tokens", "state_bytes"):
            assert len(record[key]) == turns
        assert record["cumulative_tokens"][-1] == sum(record["tokens_processed"])
    assert len(rxt["memory_update_s"]) == turns
    # RxT: the decoder reads the query then a-1 generated tokens; the encoder the whole interaction
    assert rxt["decoder_tokens"] == [q + a - 1] * turns
    assert rxt["encoder_tokens"] == [q + a] * turns
    # (a) re-reads the whole history each turn, (b) only the new tokens (+ the previous turn's last token)
    assert full["tokens_processed"] == [t * (q + a) + q + a - 1 for t in range(turns)]
    assert cached["tokens_processed"] == [q + a - 1] + [q + a] * (turns - 1)
    assert results["baselines_generate_identical_tokens"] is True
    # state kept between turns: a fixed STM vs a KV cache growing with the conversation
    rxt_config = build_rxt(payload["config"]["preset"]).config
    assert rxt["state_bytes"] == [stm_bytes(rxt_config)] * turns == [results["stm_bytes_formula"]] * turns
    llama = build_llama_baseline(rxt_config)
    assert cached["state_bytes"] == [llama_kv_bytes(llama.config, (t + 1) * (q + a) - 1) for t in range(turns)]
    assert payload["targets"]["rxt_state_fixed_size"]["met"] is True


def test_memory_precache_smoke_checks(smoke_results):
    _, payloads = smoke_results
    results = payloads["memory-precache"]["results"]
    assert results["identical_tokens"] is True
    assert results["precached"]["k_proj_calls"] == results["expected_k_proj_calls"]["precached"]
    assert results["recomputed"]["k_proj_calls"] == results["expected_k_proj_calls"]["recomputed"]


def test_attention_variants_heads_and_parameters(smoke_results):
    _, payloads = smoke_results
    variants = payloads["attention-variants"]["results"]["variants"]
    assert set(variants) == {"MHA", "GQA", "MQA", "sSQA", "SQA", "xSQA"}
    heads = {name: (v["query_heads"], v["key_value_heads"]) for name, v in variants.items()}
    assert heads == {"MHA": (8, 8), "GQA": (8, 2), "MQA": (8, 1), "sSQA": (4, 4), "SQA": (4, 2), "xSQA": (2, 2)}
    # per layer: q + o read/write query heads, k + v the key/value heads (head dim 16, hidden 128, 6 layers)
    for name, (query_heads, kv_heads) in heads.items():
        expected = 6 * (2 * 128 * query_heads * 16 + 2 * 128 * kv_heads * 16)
        assert variants[name]["parameters"]["encoder_attention"] == expected


def test_batched_interactions_levels(smoke_results):
    _, payloads = smoke_results
    payload = payloads["batched-interactions"]
    levels = payload["config"]["concurrency"]
    rxt_config = build_rxt(payload["config"]["preset"]).config
    for n in levels:
        record = payload["results"]["levels"][str(n)]
        assert record["answer_tokens"] == n * payload["config"]["answer_length"]
        assert record["stm_bytes"] == record["stm_bytes_formula"] == stm_bytes(rxt_config, conversations=n)


def test_tensorbleu_smoke_agrees_with_sacrebleu(smoke_results):
    from rxt_hf.benchmarks.tensorbleu import make_batch

    _, payloads = smoke_results
    payload = payloads["tensorbleu"]
    config, results = payload["config"], payload["results"]
    batch, length = config["batch_size"], config["length"]
    assert config["sweep_batch_sizes"][-1] == batch and set(results["levels"]) == {str(n) for n in config["sweep_batch_sizes"]}
    tensor_scores, loop_scores = results["tensorbleu_scores"], results["sacrebleu_scores"]
    assert len(tensor_scores) == len(loop_scores) == batch
    assert max(abs(a - b) for a, b in zip(tensor_scores, loop_scores)) == results["max_abs_difference"] <= 1e-4
    assert all(level["max_abs_difference"] <= 1e-4 for level in results["levels"].values())
    assert payload["targets"]["agreement"]["met"] is True
    assert results["speedup"] == timing.ratio(results["sacrebleu_median_s"], results["tensorbleu_median_s"])
    assert len({round(s, 6) for s in loop_scores}) > 1 and 0.0 < max(loop_scores) <= 1.0  # spread, not all zero
    # the batch is seeded; references are mutated copies of the candidates
    cand, ref, rate = make_batch(batch, length, config["vocab_size"], torch.Generator().manual_seed(config["seed"]))
    again = make_batch(batch, length, config["vocab_size"], torch.Generator().manual_seed(config["seed"]))
    assert torch.equal(cand, again[0]) and torch.equal(ref, again[1])
    assert cand.shape == ref.shape == (batch, length) and 0 <= int(cand.min()) and int(cand.max()) < config["vocab_size"]
    assert ((rate >= config["mutation_min"]) & (rate <= config["mutation_max"])).all()
    assert 0.0 < (cand == ref).float().mean() < 1.0


def test_results_table_and_reload(smoke_results):
    folder, payloads = smoke_results
    reloaded = load_results(folder)
    assert list(reloaded) == list(BENCHMARKS)
    table = targets_markdown(reloaded)
    assert table.count("\n") == 1 + sum(len(p["targets"]) for p in payloads.values())


# ------------------------------------------------------------------------------------------------------
# precached vs recomputed memory keys/values


def test_recomputed_memory_cache_same_tokens_and_projects_every_step():
    # a larger init spread than training's, so random weights generate varied tokens (a meaningful comparison)
    model = build_rxt("rxt-tiny", seed=3, initializer_range=0.5)
    generator = torch.Generator().manual_seed(1)
    query = rxt_query(model.config, 6, generator, batch=2)
    stm = torch.randn((2, *model.config.stm_shape), generator=generator)
    steps = 9
    with torch.inference_mode():
        both = generate_both(model, query, stm, steps)
    pre, rec = both["precached"], both["recomputed"]
    assert len(set(pre["sequences"][:, query.shape[1]:].flatten().tolist())) > 2
    assert torch.equal(pre["sequences"], rec["sequences"])
    torch.testing.assert_close(pre["logits"], rec["logits"], rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert pre["k_proj_calls"] == layers  # once per generate() call
    assert rec["k_proj_calls"] == layers * steps  # every step


def test_recomputed_memory_cache_replaces_instead_of_appending():
    model = build_rxt("rxt-tiny")
    query = rxt_query(model.config, 5, torch.Generator().manual_seed(0))
    cache = RecomputedMemoryCache(model.config)
    kw = generation_kwargs(4, model.config.pad_token_id, model.config.eos_token_id)
    with torch.inference_mode(), CallCounter(memory_key_projections(model)) as counter:
        out = model.generate(query, stm_state=model.init_memory(1), return_dict_in_generate=True, **{CACHE_FIELD: cache}, **kw)
    cross = output_cache(out).cross_attention_cache
    for layer in cross.layers:
        assert layer.keys.shape[-2] == model.config.stm_size  # one STM's worth, not one per step
    assert output_cache(out).self_attention_cache.get_seq_length() == query.shape[1] + 4 - 1
    assert counter.calls == model.config.num_hidden_layers * 4


# ------------------------------------------------------------------------------------------------------
# state-size arithmetic and the baseline


def test_stm_bytes_arithmetic():
    config = RxTConfig.from_preset("rxt-alpha-micro")
    assert stm_bytes(config) == 6 * 256 * 128 * 4 == 786432
    assert stm_bytes(config, torch.bfloat16, conversations=3) == 3 * 6 * 256 * 128 * 2
    model = build_rxt("rxt-tiny")
    stm = model.init_memory(2)
    assert stm.numel() * stm.element_size() == stm_bytes(model.config, conversations=2)


def test_llama_kv_bytes_arithmetic_matches_a_real_cache():
    rxt_config = RxTConfig.from_preset("rxt-tiny")
    llama = build_llama_baseline(rxt_config, max_position_embeddings=128)
    c = llama.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert llama_kv_bytes(c, 100) == 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 100 * 4
    assert kv_cache_bytes(6, 8, 16, 2048, torch.float32) == 2 * 6 * 8 * 16 * 2048 * 4
    ids = torch.randint(8, rxt_config.vocab_size, (1, 7))
    kw = generation_kwargs(5, rxt_config.pad_token_id, rxt_config.eos_token_id)
    with torch.inference_mode():
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **kw)
    cached = output_cache(out).get_seq_length()
    assert cached == 7 + 5 - 1
    assert cache_bytes(output_cache(out)) == llama_kv_bytes(c, cached)


def test_llama_baseline_matches_rxt_sizes():
    rxt_config = RxTConfig.from_preset("rxt-alpha-micro")
    llama = build_llama_baseline(rxt_config, max_position_embeddings=4096)
    c = llama.config
    assert c.hidden_size == rxt_config.hidden_size == 128
    assert c.num_hidden_layers == rxt_config.num_hidden_layers == 6
    assert c.num_attention_heads == rxt_config.num_attention_heads == 8
    assert c.num_key_value_heads == 8
    assert c.head_dim == 16
    assert c.vocab_size == rxt_config.vocab_size == 7500
    assert c.intermediate_size == active_feed_forward_size(rxt_config) == 2 * 256
    assert c.max_position_embeddings == 4096
    assert llama.lm_head.weight.shape == (7500, 128)
    assert len(llama.model.layers) == 6
    assert llama.model.layers[0].mlp.gate_proj.weight.shape == (512, 128)


def test_token_timer_records_new_tokens_only():
    model = build_rxt("rxt-tiny")
    query = rxt_query(model.config, 5, torch.Generator().manual_seed(0))
    timer = TokenTimer()
    kw = generation_kwargs(6, model.config.pad_token_id, model.config.eos_token_id)
    with torch.inference_mode():
        timer.start()
        model.generate(query, stm_state=model.init_memory(1), streamer=timer, **kw)
    assert len(timer.token_times) == 6
    assert 0 < timer.first_token_s <= timer.last_token_s
    assert timer.decode_tokens_per_s > 0


# ------------------------------------------------------------------------------------------------------
# timing helpers


def test_summarize():
    summary = timing.summarize([3.0, 1.0, 2.0, 10.0])
    assert summary["median"] == 2.5
    assert summary["min"] == 1.0 and summary["max"] == 10.0
    assert summary["mean"] == 4.0
    assert summary["samples"] == [3.0, 1.0, 2.0, 10.0]
    with pytest.raises(ValueError):
        timing.summarize([])


def test_measure_warmup_repeats_and_setup():
    calls, setups = [], []

    def setup():
        setups.append(1)
        return len(setups)

    summary, result = timing.measure(lambda arg: calls.append(arg) or arg, repeats=3, warmup=2, setup=setup)
    assert len(calls) == 5 and len(setups) == 5
    assert calls == [1, 2, 3, 4, 5]  # every call gets a fresh setup value
    assert result == 5
    assert len(summary["samples"]) == 3 and all(s >= 0 for s in summary["samples"])
    with pytest.raises(ValueError):
        timing.measure(lambda: None, repeats=0)


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with timing.torch_threads(1) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with timing.torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError):
        with timing.torch_threads(0):
            pass


def test_target_and_ratio():
    assert timing.target("x", 2.0, 1.5)["met"] is True
    assert timing.target("x", 1.2, 1.15, "<=")["met"] is False
    assert timing.target("x", True, True, "==")["met"] is True
    assert timing.target("x", 1.0, 1.0, ">")["met"] is False
    assert timing.ratio(1.0, 0.0) == math.inf
    with pytest.raises(ValueError):
        timing.target("x", 1, 1, "~")


def test_write_result_is_strict_json(tmp_path):
    payload = timing.new_payload("unit", "a test", True, {"lengths": (1, 2)})
    payload["results"] = {"inf": math.inf, "tensor": torch.tensor([1, 2]), "dtype": torch.float32}
    path = timing.write_result("unit", payload, tmp_path)
    assert path == tmp_path / "unit.json"
    data = json.loads(path.read_text())
    assert data["results"] == {"inf": "inf", "tensor": [1, 2], "dtype": "float32"}
    assert data["config"]["lengths"] == [1, 2]
    assert data["duration_s"] >= 0 and "_started" not in data
    assert set(data["machine"]) >= {"cpu", "logical_cores", "torch", "transformers", "git_commit", "git_dirty"}


def test_resolve_options():
    defaults, smoke = {"a": 1, "b": 2}, {"a": 10, "b": 20}
    assert timing.resolve_options(defaults, smoke, False, {}) == {"a": 1, "b": 2}
    assert timing.resolve_options(defaults, smoke, True, {"b": 3, "a": None}) == {"a": 10, "b": 3}
    with pytest.raises(TypeError, match="valid options"):
        timing.resolve_options(defaults, smoke, False, {"c": 1})


def test_every_benchmark_has_smoke_defaults_for_every_option():
    for name in BENCHMARKS:
        module = get_benchmark(name)
        assert module.NAME == name
        assert set(module.SMOKE) == set(module.DEFAULTS)
    with pytest.raises(ValueError, match="Unknown benchmark"):
        get_benchmark("nope")


def test_plot_without_matplotlib_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "have_matplotlib", lambda: False)
    assert timing.plot_lines(tmp_path / "x.png", {"a": ([1, 2], [3, 4])}, "t", "x", "y") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = timing.plot_lines(tmp_path / "x.png", {"a": ([1, 2], [3, 4])}, "t", "x", "y", logy=True)
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------
# command line


def test_bench_command_parses_and_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="rxt")
    subparsers = parser.add_subparsers(dest="command")
    add_bench_command(subparsers)
    args = parser.parse_args(["bench"])
    assert args.name == "all" and not args.smoke and args.threads is None
    args = parser.parse_args(
        ["bench", "memory-precache", "--smoke", "--threads", "1", "--output-dir", str(tmp_path), "--no-plot"]
    )
    assert args.func(args) == 0
    assert (tmp_path / "memory-precache.json").exists()
    assert "| memory-precache |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "nope"])


# ------------------------------------------------------------------------------------------------------
# quality-vs-stateless


def test_quality_vs_stateless_smoke(tmp_path):
    payload = run_benchmark("quality-vs-stateless", smoke=True, output_dir=tmp_path, threads=1)
    written = json.loads((tmp_path / "quality-vs-stateless.json").read_text(encoding="utf-8"))
    assert PAYLOAD_KEYS <= set(written) and written["smoke"] is True
    results = payload["results"]
    assert results["mode"] == "from-scratch-smat"
    rxt, llamas = results["rxt"], results["llamas"]
    # one Llama of the RxT's parameter count and one of twice it (within a few percent), all reported
    assert [llama["size"] for llama in llamas] == [1.0, 2.0]
    assert rxt["parameters"] == payload["config"]["parameters"]["rxt"]["total"]
    for llama, counted, config in zip(llamas, payload["config"]["parameters"]["llamas"], payload["config"]["llamas"]):
        assert llama["parameters"] == counted["total"]
        assert 0.9 < llama["parameters"] / (llama["size"] * rxt["parameters"]) < 1.1
        assert config["hidden_size"] == payload["config"]["rxt"]["hidden_size"]
    assert llamas[1]["parameters"] > 1.8 * llamas[0]["parameters"]
    for record in (rxt, *llamas):
        assert record["train_minutes"] > 0 and record["steps"] >= 1 and record["tokens"] > 0
        assert record["answer_perplexity"] >= 1.0
        assert set(record["recall_accuracy"]) == set(record["recall_count"])
        assert all(0.0 <= v <= 1.0 for v in record["recall_accuracy"].values())
    for llama in llamas:
        assert llama["budget_minutes"] == rxt["train_minutes"]  # each Llama gets the RxT's training time
        assert rxt["recall_count"] == llama["recall_count"]  # scored on the same recall turns
    # all models are scored on exactly the same answer tokens
    assert results["same_scored_answer_tokens"] is True
    assert set(payload["targets"]) == {"rxt_perplexity_le_llama_1x", "rxt_recall_d3_gt_llama_1x",
                                       "rxt_perplexity_le_llama_2x", "rxt_recall_d3_gt_llama_2x"}
    for row in written["targets"].values():
        assert TARGET_KEYS <= set(row) and isinstance(row["met"], bool)
    if timing.have_matplotlib():
        assert written["plots"] and (tmp_path / "quality-vs-stateless.png").exists()


def test_quality_vs_stateless_refuses_bad_llama_sizes():
    from rxt_hf.benchmarks.quality_vs_stateless import _llama_sizes

    assert _llama_sizes([1, 2]) == [1.0, 2.0] and _llama_sizes(2) == [2.0]
    for bad in ([], [0], [-1, 2], "two"):
        with pytest.raises(ValueError, match="llama_sizes"):
            _llama_sizes(bad)


def test_quality_vs_stateless_llama_matches_the_rxt_parameter_count():
    from rxt_hf.benchmarks.quality_vs_stateless import count_llama_parameters, matched_llama_config
    from rxt_hf.modeling_rxt import RxTForCausalLM

    config = RxTConfig.from_preset(
        "rxt-alpha-micro", vocab_size=2000, num_hidden_layers=4, num_attention_heads=4, num_query_heads=4,
        num_key_value_heads=4, decoder_feed_forward="dense", decoder_intermediate_size=384,
        encoder_intermediate_size=384, stm_size=32, max_position_embeddings=128, memory_attention_variant="simple",
    )
    total = sum(p.numel() for p in RxTForCausalLM(config).parameters())
    llama = matched_llama_config(config, total, max_position_embeddings=1024)
    assert abs(count_llama_parameters(llama) - total) / total < 0.01
    assert (llama.hidden_size, llama.num_attention_heads, llama.vocab_size) == (128, 4, 2000)
    assert llama.max_position_embeddings == 1024 and llama.intermediate_size % 8 == 0


def test_quality_vs_stateless_conversation_encoding(tiny_tokenizer):
    from rxt_hf.benchmarks.quality_vs_stateless import encode_conversation
    from rxt_hf.trainers.data import tokenize_interaction

    row = {"query": "Ann has a red cat.", "answer": "Nice.", "interactions": [
        {"query": "Bob lives in Oslo.", "answer": "Noted."},
        {"query": "What colour is the cat of Ann?", "answer": "The cat of Ann is red."},
    ], "recall_distance": [0, 2], "answer_keywords": [[], ["red"]]}
    ids, weights = encode_conversation(tiny_tokenizer, row, 64, recall_weight=3.0)
    parts = [tokenize_interaction(tiny_tokenizer, q, a, 64) for q, a in (
        (row["query"], row["answer"]), *((t["query"], t["answer"]) for t in row["interactions"]))]
    assert ids == [i for p in parts for i in p["input_ids"]]  # the interactions back to back, SMAT's framing
    assert len(weights) == len(ids)
    offset = 0
    for part, weight in zip(parts, (1.0, 1.0, 3.0)):
        n, q = len(part["input_ids"]), part["query_length"]
        assert weights[offset:offset + q] == [0.0] * q  # [BOS][Q] query [A]: no loss
        assert weights[offset + q:offset + n] == [weight] * (n - q)  # answer + [EOS]; recall answers weighted
        offset += n


def test_quality_vs_stateless_reads_a_trained_folder(tmp_path):
    from rxt_hf.benchmarks.quality_vs_stateless import trained_rxt_facts

    folder = tmp_path / "final"
    folder.mkdir()
    (tmp_path / "run_summary.json").write_text(json.dumps({"train_minutes": 30.5}))
    history = [{"stage": "joint-sft", "steps": 10, "tokens_seen": 100, "train_runtime_s": 60.0, "config": {}},
               {"stage": "smat", "steps": 20, "tokens_seen": 300, "train_runtime_s": 120.0,
                "config": {"learning_rate": 0.002, "per_device_batch_size": 32}}]
    (folder / "rxt_training_history.json").write_text(json.dumps(history))
    facts = trained_rxt_facts(folder)
    assert facts["run_summary_train_minutes"] == 30.5
    assert facts["stage_minutes"] == 3.0 and facts["steps"] == 30 and facts["tokens"] == 400
    assert facts["smat_config"]["per_device_batch_size"] == 32


def test_bench_option_parsing():
    from rxt_hf.benchmarks.cli import parse_options

    assert parse_options(["rxt_model=outputs/default/final", "minutes=2.5", "model_overrides={\"stm_size\": 8}"]) == {
        "rxt_model": "outputs/default/final", "minutes": 2.5, "model_overrides": {"stm_size": 8}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["minutes"])
