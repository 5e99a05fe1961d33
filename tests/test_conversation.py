"""The conversation primitive (`modeling_rxt.conversation_rxt`) against a hand-written turn-by-turn loop of
`model.forward` + `model.update_memory`: teacher-forced and generated answers, ragged conversations, detach policy."""

import pytest
import torch

from rxt_hf.modeling_rxt import ConversationBatch, RxTConfig, RxTForCausalLM, play_conversations
from rxt_hf.modeling_rxt.conversation_rxt import close_answer, token_entropies, token_log_probs
from rxt_hf.modeling_rxt.format_rxt import pad_rows

BOS, EOS, PAD, Q, A = 0, 1, 2, 5, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=64)).eval()


def interaction(query, answer):
    return [BOS, Q, *query, A, *answer, EOS]


# conversation 0: three turns, 1: one turn, 2: two turns (ragged)
CHATS = [
    [interaction([10, 11], [12]), interaction([13], [14, 15, 16]), interaction([17, 18, 19], [20])],
    [interaction([21], [22, 23])],
    [interaction([24, 25], [26]), interaction([27], [28, 29])],
]


def hand_loop(model, chats, stm=None):
    """Per conversation, one row at a time: logits of every turn and the STM after every turn."""
    logits, stms = {}, {}
    for b, chat in enumerate(chats):
        memory = model.init_memory(1) if stm is None else stm[b : b + 1]
        for k, ids in enumerate(chat):
            ids = torch.tensor([ids])
            logits[b, k] = model(input_ids=ids, stm_state=memory, use_cache=False).logits[0]
            memory = model.update_memory(memory, ids)
            stms[b, k] = memory[0]
    return logits, stms


def test_teacher_forced_ragged_matches_a_hand_written_loop(model):
    with torch.no_grad():
        turns = play_conversations(model, CHATS, return_logits=True, return_logps=True, write_last_turn=True)
        logits, stms = hand_loop(model, CHATS)
    assert [t.rows.tolist() for t in turns] == [[0, 1, 2], [0, 2], [0]]
    for turn in turns:
        for i, b in enumerate(turn.rows.tolist()):
            length = len(CHATS[b][turn.turn])
            assert int(turn.attention_mask[i].sum()) == length
            torch.testing.assert_close(turn.logits[i, :length], logits[b, turn.turn], atol=2e-5, rtol=1e-4)
            expected = logits[b, turn.turn].float().log_softmax(-1)[:-1].gather(
                -1, torch.tensor(CHATS[b][turn.turn][1:])[:, None])[:, 0]
            torch.testing.assert_close(turn.token_logps[i, : length - 1], expected, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(turn.stm_after[b], stms[b, turn.turn], atol=2e-5, rtol=1e-4)
    # padded turns leave the row's STM exactly as it was
    assert torch.equal(turns[1].stm_after[1], turns[0].stm_after[1])
    assert torch.equal(turns[2].stm_after[1], turns[0].stm_after[1])
    assert torch.equal(turns[2].stm_after[2], turns[1].stm_after[2])
    assert turns[1].written.tolist() == [0, 2] and turns[2].written.tolist() == [0]


def test_tensor_grid_equals_a_batched_loop_bit_for_bit(model):
    """A [B, N, T] batch where every row has every turn: the same tensors as a batched hand loop."""
    chats = [CHATS[0][:2], CHATS[2]]
    ids = torch.full((2, 2, 9), PAD)
    mask = torch.zeros_like(ids)
    for b, chat in enumerate(chats):
        for k, row in enumerate(chat):
            ids[b, k, : len(row)] = torch.tensor(row)
            mask[b, k, : len(row)] = 1
    with torch.no_grad():
        turns = play_conversations(model, ids, mask, return_logits=True)
        stm = model.init_memory(2)
        for k in range(2):
            logits = model(input_ids=ids[:, k], attention_mask=mask[:, k], stm_state=stm, use_cache=False).logits
            assert torch.equal(turns[k].logits, logits)
            assert torch.equal(turns[k].stm_before, stm)
            if k == 0:  # the last turn is not written by default (nothing reads it)
                stm = model.update_memory(stm, ids[:, k], mask[:, k])
                assert torch.equal(turns[k].stm_after, stm)
    assert turns[1].written is None and torch.equal(turns[1].stm_after, turns[1].stm_before)


def test_generated_answers_match_a_hand_written_loop(model):
    queries = [[[BOS, Q, 10, 11, A], [BOS, Q, 13, A]], [[BOS, Q, 21, 22, 23, A]]]
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        turns = play_conversations(model, queries=queries, generate_kwargs=kwargs, write_last_turn=True)
        for b, chat in enumerate(queries):
            memory = model.init_memory(1)
            for k, prompt in enumerate(chat):
                prompt = torch.tensor([prompt])
                out = model.generate(prompt, stm_state=memory, pad_token_id=PAD, eos_token_id=EOS, **kwargs)
                answer = close_answer(out[0, prompt.shape[1]:].tolist(), EOS, PAD)
                i = turns[k].rows.tolist().index(b)
                assert turns[k].answers[i] == answer
                memory = model.update_memory(memory, torch.tensor([prompt[0].tolist() + answer]))
                torch.testing.assert_close(turns[k].stm_after[b], memory[0], atol=2e-5, rtol=1e-4)
    assert turns[1].rows.tolist() == [0]
    assert torch.equal(turns[1].stm_after[1], turns[0].stm_after[1])


def test_generated_memory_with_teacher_forced_scores(model):
    """Evaluation's mode: score reference interactions, generate answers, write the generated ones."""
    queries = [[c[: c.index(A) + 1] for c in chat] for chat in CHATS]
    with torch.no_grad():
        turns = play_conversations(model, CHATS, queries=queries, memory_from="generated", return_logps=True,
                                   write_last_turn=True, generate_kwargs=dict(max_new_tokens=3, do_sample=False))
        memory = model.init_memory(1)
        for k, prompt in enumerate(queries[0]):
            answer = turns[k].answers[0]
            memory = model.update_memory(memory, torch.tensor([prompt + answer]))
            torch.testing.assert_close(turns[k].stm_after[0], memory[0], atol=2e-5, rtol=1e-4)
    assert all(t.token_logps is not None for t in turns)


def test_stateless_rows_read_their_initial_memory(model):
    with torch.no_grad():
        batch = ConversationBatch(model, batch_size=2, stateless=[False, True])
        turns = list(batch.play([CHATS[0], CHATS[0]], write_last_turn=True))
    fresh = model.init_memory(1)[0]
    assert all(torch.equal(t.stm_after[1], fresh) for t in turns)
    assert not torch.equal(turns[0].stm_after[0], fresh)
    assert turns[0].written.tolist() == [0, 1]  # asked to write both; the stateless row kept its state


def test_memory_group_updates_once_and_shares(model):
    with torch.no_grad():
        grouped = play_conversations(model, [CHATS[0]] * 4, memory_group=torch.tensor([0, 0, 1, 1]))
        single = play_conversations(model, [CHATS[0]])
    for t, s in zip(grouped, single):
        for b in range(4):
            torch.testing.assert_close(t.stm_after[b], s.stm_after[0], atol=2e-5, rtol=1e-4)


def test_memory_only_turns_and_scored_subset(model):
    scored = torch.tensor([[False, False, True], [False, False, False], [False, True, False]])
    with torch.no_grad():
        turns = play_conversations(model, CHATS, scored=scored, return_logps=True)
        full = play_conversations(model, CHATS, return_logps=True)
    assert [t.rows.tolist() for t in turns] == [[], [2], [0]]
    assert turns[0].token_logps is None
    torch.testing.assert_close(turns[2].token_logps, full[2].token_logps, atol=2e-5, rtol=1e-4)


def _gradient_norms(model, backprop_turns):
    model.zero_grad()
    turns = list(ConversationBatch(model, batch_size=1, backprop_turns=backprop_turns).play(
        [CHATS[0]], return_logps=True))
    turns[-1].token_logps.sum().backward()  # only the last turn's loss: it reaches turn 0 through the memory
    encoder = sum(float(p.grad.abs().sum()) for p in model.model.encoder.parameters() if p.grad is not None)
    return encoder, turns


def test_detach_policy_stops_gradients():
    torch.manual_seed(0)
    model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=64)).train()
    through, turns = _gradient_norms(model, None)
    assert through > 0 and turns[-1].stm_before.requires_grad
    # backprop_turns=1: the STM is detached before every update, so the last turn's loss reaches only the update of
    # the turn just before it (the encoder still gets a gradient from that one update)...
    one, turns = _gradient_norms(model, 1)
    assert 0 < one and turns[0].stm_after.grad_fn is not None
    # ...and nothing of turn 0's update: its output, the STM read at turn 1, was detached before turn 1's update
    model.zero_grad()
    batch = ConversationBatch(model, batch_size=1, backprop_turns=1)
    play = batch.play([CHATS[0]], return_logps=True)
    first = next(play)
    stm0 = first.stm_after  # the memory written at turn 0
    stm0.retain_grad()
    rest = list(play)
    rest[-1].token_logps.sum().backward()
    assert stm0.grad is None
    model.zero_grad()
    batch = ConversationBatch(model, batch_size=1, backprop_turns=None)
    play = batch.play([CHATS[0]], return_logps=True)
    stm0 = next(play).stm_after
    stm0.retain_grad()
    list(play)[-1].token_logps.sum().backward()
    assert stm0.grad is not None and float(stm0.grad.abs().sum()) > 0


def test_token_scores_match_full_vocabulary_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(11, 5, 40)
    targets = torch.randint(0, 40, (11, 5))
    full = logits.log_softmax(-1)
    assert torch.equal(token_log_probs(logits, targets, chunk_rows=3), full.gather(-1, targets[..., None])[..., 0])
    torch.testing.assert_close(token_entropies(logits, chunk_rows=4), -(full.exp() * full).sum(-1))


def test_close_answer():
    assert close_answer([7, 8, EOS, PAD], EOS, PAD) == [7, 8, EOS]
    assert close_answer([7, 8, PAD, PAD], EOS, PAD) == [7, 8, EOS]
    assert close_answer([7, 8], EOS, PAD) == [7, 8, EOS]


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="backprop_turns"):
        ConversationBatch(model, batch_size=1, backprop_turns=0)
    with pytest.raises(ValueError, match="input_ids.*queries"):
        play_conversations(model)
    with pytest.raises(ValueError, match="memory_from"):
        play_conversations(model, CHATS, memory_from="reference")
    with pytest.raises(ValueError, match="batch of 3"):
        ConversationBatch(model, batch_size=2).play(CHATS).__next__()
    ids, mask = pad_rows([CHATS[0][0]], PAD)
    with pytest.raises(ValueError, match="stateless"):
        ConversationBatch(model, batch_size=2, stateless=[True])
    assert ConversationBatch(model, batch_size=1).read(ids, mask).logits is None  # only what is asked for


def test_chat_and_play_write_the_same_memory(model, tiny_tokenizer):
    """`RxTChat` (one turn per message) and `play_conversations` with generated answers agree."""
    from rxt_hf.modeling_rxt import RxTChat
    from rxt_hf.modeling_rxt.format_rxt import render_interaction

    chat_model = RxTForCausalLM(RxTConfig.from_preset("rxt-tiny", vocab_size=len(tiny_tokenizer))).eval()
    messages = ["Ann has a red cat.", "What colour is the cat of Ann?"]
    chat = RxTChat(chat_model, tiny_tokenizer, max_new_tokens=5)
    answers = [chat.send(text) for text in messages]
    queries = [[render_interaction(tiny_tokenizer, text) for text in messages]]
    with torch.no_grad():
        turns = play_conversations(chat_model, queries=queries, write_last_turn=True,
                                   generate_kwargs=dict(max_new_tokens=5, do_sample=False))
    assert [tiny_tokenizer.decode(t.answers[0], skip_special_tokens=True) for t in turns] == answers
    torch.testing.assert_close(chat.memory[0], turns[-1].stm_after[0], atol=1e-6, rtol=1e-5)


def test_generated_memory_for_scored_rows_given_memory_for_the_others(model):
    """MRL's mode: only some turns generate; the others write their reference interaction."""
    queries = [[c[: c.index(A) + 1] for c in chat] for chat in CHATS]
    scored = torch.tensor([[False, True, False], [False, False, False], [True, False, False]])
    with torch.no_grad():
        turns = play_conversations(model, CHATS, queries=queries, scored=scored, memory_from="generated",
                                   generate_kwargs=dict(max_new_tokens=3, do_sample=False))
        memory = model.init_memory(1)
        for k, written in ((0, CHATS[0][0]), (1, queries[0][1] + turns[1].answers[0])):
            memory = model.update_memory(memory, torch.tensor([written]))
            torch.testing.assert_close(turns[k].stm_after[0], memory[0], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="generated no answer"):
        play_conversations(model, queries=queries, scored=scored, generate_kwargs=dict(max_new_tokens=2))
