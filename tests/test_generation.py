"""generate() with memory, interact(), chat sessions, batches, memory files, pipeline and PEFT."""

import threading

import pytest
import torch

from rxt_hf.modeling_rxt import RxTChat, RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.format_rxt import pad_rows
from transformers import (
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TopKLogitsWarper,
    pipeline,
)


def make_model(tokenizer=None, seed=0, **overrides):
    torch.manual_seed(seed)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", **overrides)).eval()


def query_ids(model, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    content = torch.randint(8, 400, (tokens,), generator=generator).tolist()
    config = model.config
    return [config.bos_token_id, config.query_token_id, *content, config.answer_token_id]


def random_memory(model, batch=1, seed=0):
    return model.init_memory(batch, mode="normal", generator=torch.Generator().manual_seed(seed)) * 50


def greedy_loop(model, ids, stm, steps):
    """Reference decoding: full forward without any cache at every step."""
    eos = model.config.eos_token_id
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, stm_state=stm, use_cache=False).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            if token.item() == eos:
                break
    return ids


def test_generate_equals_a_plain_greedy_loop():
    model = make_model()
    stm = random_memory(model)
    ids = torch.tensor([query_ids(model, 9)])
    generated = model.generate(ids, stm_state=stm, max_new_tokens=15, do_sample=False)
    assert torch.equal(generated, greedy_loop(model, ids, stm, 15))


def test_memory_keys_and_values_are_projected_once_per_call():
    model = make_model()
    calls = []
    for layer in model.model.decoder.layers:
        layer.memory_cross_attn.k_proj.register_forward_hook(lambda *args: calls.append("k"))
        layer.memory_cross_attn.v_proj.register_forward_hook(lambda *args: calls.append("v"))
    ids = torch.tensor([query_ids(model, 6)])
    out = model.generate(ids, stm_state=random_memory(model), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 10
    layers = model.config.num_hidden_layers
    assert calls.count("k") == layers and calls.count("v") == layers


def test_different_memories_give_different_answers():
    model = make_model()
    ids = torch.tensor([query_ids(model, 8)])
    answers = {
        tuple(model.generate(ids, stm_state=random_memory(model, seed=s), max_new_tokens=12, do_sample=False)[0].tolist())
        for s in range(4)
    }
    assert len(answers) > 1


def test_generate_without_memory_uses_a_fresh_one():
    model = make_model()
    ids = torch.tensor([query_ids(model, 5)])
    torch.testing.assert_close(
        model.generate(ids, max_new_tokens=6, do_sample=False),
        model.generate(ids, stm_state=model.init_memory(1), max_new_tokens=6, do_sample=False),
    )


def test_beams_and_multiple_return_sequences_follow_the_memory():
    model = make_model()
    ids = torch.tensor([query_ids(model, 6), query_ids(model, 6, seed=1)])
    stm = random_memory(model, batch=2)
    sampled = model.generate(
        ids, stm_state=stm, do_sample=True, num_return_sequences=3, max_new_tokens=5, top_k=20, top_p=0.9,
        temperature=0.8, repetition_penalty=1.1,
    )
    assert sampled.shape[0] == 6
    beams = model.generate(ids, stm_state=stm, num_beams=3, num_return_sequences=2, max_new_tokens=5, do_sample=False)
    assert beams.shape[0] == 4
    # the best beam with one beam is plain greedy: beam search keeps reading the right memory row
    single = model.generate(ids[1:], stm_state=stm[1:], num_beams=1, max_new_tokens=5, do_sample=False)
    one_beam = model.generate(ids, stm_state=stm, num_beams=1, max_new_tokens=5, do_sample=False)
    assert torch.equal(one_beam[1, : single.shape[1]], single[0])


def test_usual_generation_arguments_work_with_memory(tiny_tokenizer):
    model = make_model()
    ids = torch.tensor([query_ids(model, 6)])
    stm = random_memory(model)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 3, dtype=torch.bool)

    stopped = model.generate(
        ids, stm_state=stm, max_new_tokens=20, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter()])
    )
    assert stopped.shape[1] == ids.shape[1] + 3
    out = model.generate(
        ids, stm_state=stm, max_new_tokens=4, do_sample=True, logits_processor=LogitsProcessorList([TopKLogitsWarper(1)]),
        return_dict_in_generate=True, output_scores=True,
    )
    greedy = model.generate(ids, stm_state=stm, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, greedy) and len(out.scores) == out.sequences.shape[1] - ids.shape[1]

    streamer = TextIteratorStreamer(tiny_tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(
        target=model.generate,
        kwargs=dict(inputs=ids, stm_state=stm, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=streamer),
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    full = model.generate(ids, stm_state=stm, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert streamed == tiny_tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------
# batches of conversations


def padded_batch(model, rows):
    return pad_rows(rows, model.config.pad_token_id, side="left", device=model.device)


def test_batched_generation_and_memory_update_equal_each_conversation_alone():
    model = make_model()
    rows = [query_ids(model, 3, seed=1), query_ids(model, 11, seed=2), query_ids(model, 6, seed=3)]
    stm = torch.cat([random_memory(model, seed=s) for s in range(3)])
    ids, mask = padded_batch(model, rows)
    batched = model.generate(ids, attention_mask=mask, stm_state=stm, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), stm_state=stm[i : i + 1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert batched[i, ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()

    batch_events = list(model.interact(rows, stm_state=stm, max_new_tokens=8, min_new_tokens=8, do_sample=False))
    new_batch = batch_events[-1].stm_state
    for i, row in enumerate(rows):
        events = list(model.interact([row], stm_state=stm[i : i + 1], max_new_tokens=8, min_new_tokens=8, do_sample=False))
        assert events[-1].kind == "memory_update_end"
        assert batch_events[-3].answer_ids[i] == events[-3].answer_ids[0]
        torch.testing.assert_close(new_batch[i : i + 1], events[-1].stm_state, atol=1e-5, rtol=1e-5)


def test_update_memory_batch_with_padding_equals_single():
    model = make_model()
    rows = [query_ids(model, 4, seed=5) + [30, 31, 1], query_ids(model, 12, seed=6) + [40, 1]]
    ids, mask = pad_rows(rows, model.config.pad_token_id)
    stm = torch.cat([random_memory(model, seed=7), random_memory(model, seed=8)])
    batched = model.update_memory(stm, ids, mask)
    for i, row in enumerate(rows):
        alone = model.update_memory(stm[i : i + 1], torch.tensor([row]))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# interact and chat sessions


def test_interact_streams_then_updates_memory(tiny_tokenizer):
    model = make_model()
    stm = model.init_memory(1)
    events = list(model.interact("Where does Ann live?", stm_state=stm, tokenizer=tiny_tokenizer, max_new_tokens=6))
    kinds = [e.kind for e in events]
    assert kinds[-3:] == ["answer", "memory_update_start", "memory_update_end"]
    assert set(kinds[:-3]) == {"token"}
    answer = events[-3]
    query = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where does Ann live?"}], tokenize=True, add_generation_prompt=True
    )["input_ids"]
    expected = model.update_memory(stm, torch.tensor([query + answer.answer_ids[0]]))
    torch.testing.assert_close(events[-1].stm_state, expected)


def test_chat_answers_before_its_memory_update_and_matches_synchronous_updates(tiny_tokenizer):
    model = make_model()
    log, release, calls = [], [threading.Event() for _ in range(3)], []
    original_update = model.update_memory

    def gated_update(stm, ids, mask=None):
        gate = release[len(calls)]
        calls.append(ids)
        log.append("update_blocked")
        gate.wait(timeout=30)
        return original_update(stm, ids, mask)

    model.update_memory = gated_update
    chat = RxTChat(model, tiny_tokenizer, on_event=log.append, max_new_tokens=6)
    stm = model.init_memory(1)
    for turn, text in enumerate(["Ann has a red kite.", "Bob lives in Oslo.", "What colour is the kite of Ann?"]):
        answer = chat.send(text)
        # the answer is back while this turn's memory update is still blocked
        assert isinstance(answer, str) and chat.updating
        assert log[-1] in ("memory_update_started", "update_blocked", "answer_ready")
        release[turn].set()
        chat.wait()
        assert log[-1] == "memory_updated"
        query = tiny_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)["input_ids"]
        generated = model.generate(torch.tensor([query]), stm_state=stm, max_new_tokens=6, do_sample=False)
        answer_ids = generated[0, len(query) :].tolist()
        answer_ids = answer_ids[: answer_ids.index(1) + 1] if 1 in answer_ids else answer_ids + [1]
        assert answer == tiny_tokenizer.decode(answer_ids, skip_special_tokens=True)
        stm = original_update(stm, torch.tensor([query + answer_ids]))
        torch.testing.assert_close(chat.memory, stm)
    assert log.count("answer_ready") == 3
    first = log.index("answer_ready")
    assert log.index("memory_update_started") > first and log.index("memory_updated") > first


class ForcedAnswer(LogitsProcessor):
    """Makes generate() write `token_ids`, one per step, whatever the model would say."""

    def __init__(self, token_ids):
        self.token_ids, self.step = token_ids, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_ids[min(self.step, len(self.token_ids) - 1)]] = 0.0
        self.step += 1
        return forced


def test_chat_streams_non_ascii_text_as_whole_characters(tiny_tokenizer):
    text = "café 日本 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sum(tiny_tokenizer.decode([i]) == "\ufffd" for i in ids) >= 4  # é, 日, 本 span several byte tokens
    model = make_model()
    chat = RxTChat(model, tiny_tokenizer, max_new_tokens=len(ids) + 1)
    pieces = list(chat.stream("Ann has a kite.", logits_processor=LogitsProcessorList([ForcedAnswer(ids + [1])])))
    assert "".join(pieces) == text == chat.last_answer
    assert not any("\ufffd" in piece for piece in pieces)
    assert {"é", "日", "本"} <= set(pieces)  # each character as soon as its last byte is generated
    chat.wait()


def test_next_message_waits_for_the_pending_update(tiny_tokenizer):
    model = make_model()
    order = []
    original_update = model.update_memory

    def slow_update(stm, ids, mask=None):
        order.append("update_start")
        result = original_update(stm, ids, mask)
        order.append("update_end")
        return result

    model.update_memory = slow_update
    original_generate = model.generate

    def tracking_generate(*args, **kwargs):
        order.append("generate")
        return original_generate(*args, **kwargs)

    model.generate = tracking_generate
    chat = RxTChat(model, tiny_tokenizer, max_new_tokens=4)
    chat.send("Ann has a cat.")
    chat.send("Who has a cat?")
    chat.wait()
    assert order == ["generate", "update_start", "update_end", "generate", "update_start", "update_end"]


def test_many_conversations_share_one_model(tiny_tokenizer):
    model = make_model()
    messages = [["Ann has a cat.", "Who has a cat?"], ["Bob lives in Rome.", "Where does Bob live?"]]
    sequential = []
    for texts in messages:
        chat = RxTChat(model, tiny_tokenizer, max_new_tokens=5)
        sequential.append(([chat.send(t) for t in texts], chat.memory))
    results = [None, None]

    def run(i):
        chat = RxTChat(model, tiny_tokenizer, max_new_tokens=5)
        results[i] = ([chat.send(t) for t in messages[i]], chat.memory)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (answers, memory), (expected_answers, expected_memory) in zip(results, sequential):
        assert answers == expected_answers
        torch.testing.assert_close(memory, expected_memory)


def test_memory_file_round_trip_system_prompt_and_reset(tiny_tokenizer, tmp_path):
    model = make_model()
    chat = RxTChat(model, tiny_tokenizer, system_prompt="You help Ann.", max_new_tokens=4)
    prompted = model.memory_from_prompt("You help Ann.", tokenizer=tiny_tokenizer)
    torch.testing.assert_close(chat.memory, prompted)
    assert (prompted - model.init_memory(1)).abs().max() > 1e-6
    chat.send("Ann has a kite.")
    chat.save(tmp_path / "stm.safetensors")
    other = RxTChat(model, tiny_tokenizer)
    other.load(tmp_path / "stm.safetensors")
    torch.testing.assert_close(other.memory, chat.memory)
    chat.reset()
    torch.testing.assert_close(chat.memory, prompted)
    bigger = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", stm_size=16))
    with pytest.raises(ValueError, match="slots"):
        bigger.load_memory(tmp_path / "stm.safetensors")


# ----------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_clear_errors(tiny_tokenizer):
    model = make_model()
    ids = torch.tensor([query_ids(model, 4)])
    with pytest.raises(ValueError, match="expected"):
        model.generate(ids, stm_state=torch.zeros(1, 2, 9, 32), max_new_tokens=2)
    with pytest.raises(TypeError, match="dtype"):
        model.generate(ids, stm_state=torch.zeros(1, 2, 8, 32, dtype=torch.float64), max_new_tokens=2)
    with pytest.raises(ValueError, match="meta"):
        model.generate(ids, stm_state=torch.zeros(1, 2, 8, 32, device="meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        list(model.interact("Ann " * 80, tokenizer=tiny_tokenizer))
    with pytest.raises(ValueError, match="empty"):
        list(model.interact("   ", tokenizer=tiny_tokenizer))
    with pytest.raises(ValueError, match="empty"):
        list(model.interact([[0, 5, 6]]))
    with pytest.raises(ValueError, match="tokenizer"):
        list(model.interact("Hello"))


# ----------------------------------------------------------------------------------------------------
# tokenizer next to the model, pipeline, PEFT


def test_saved_model_and_tokenizer_work_in_a_pipeline(tiny_tokenizer, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == tiny_tokenizer.chat_template
    generator = pipeline("text-generation", model=str(tmp_path), trust_remote_code=True, device="cpu")
    out = generator([{"role": "user", "content": "Where does Ann live?"}], max_new_tokens=5, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    stm = random_memory(model)
    with_memory = generator(
        [{"role": "user", "content": "Where does Ann live?"}], max_new_tokens=5, do_sample=False, stm_state=stm
    )
    assert isinstance(with_memory[0]["generated_text"][-1]["content"], str)


def test_peft_lora_trains_saves_reloads_and_generates_with_memory(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = make_model()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("memory_cross_attn" in n for n in names) and any("memory_attention" in n for n in names)
    ids = torch.tensor([query_ids(model, 6)])
    stm = random_memory(model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    peft_model.train()
    for _ in range(10):
        new_stm = peft_model.base_model.model.update_memory(stm, ids)
        loss = peft_model(input_ids=ids, stm_state=new_stm, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    peft_model.eval()
    expected = peft_model.generate(input_ids=ids, stm_state=stm, max_new_tokens=5, do_sample=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_model(), tmp_path / "adapter").eval()
    assert torch.equal(reloaded.generate(input_ids=ids, stm_state=stm, max_new_tokens=5, do_sample=False), expected)
