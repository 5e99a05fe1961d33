"""modeling_rxt.format_rxt: special ids, framing, padding, streamed text and the one STM file format."""

import random

import pytest
import torch

from rxt_hf.modeling_rxt import RxTConfig, RxTForCausalLM
from rxt_hf.modeling_rxt.format_rxt import (
    IGNORE_INDEX,
    IncrementalDetokenizer,
    encode_interaction,
    frame_interaction,
    pad_grid,
    pad_rows,
    special_token_ids,
    stm_from_bytes,
    stm_to_bytes,
)

IDS = {"bos_token_id": 0, "eos_token_id": 1, "query_token_id": 5, "answer_token_id": 6, "think_token_id": 7}


def test_frame_interaction_template_labels_and_truncation():
    framed = frame_interaction(IDS, [10, 11], [20, 21, 22])
    assert framed.input_ids == [0, 5, 10, 11, 6, 20, 21, 22, 1] and framed.prompt_length == 5
    assert framed.labels == [IGNORE_INDEX] * 5 + [20, 21, 22, 1]
    assert frame_interaction(IDS, [10], thinking_ids=[30]).input_ids == [0, 5, 10, 7, 30, 6]  # a prompt
    config = RxTConfig.from_preset("rxt-tiny")  # the config carries the same ids
    assert frame_interaction(config, [10], [20]).input_ids == [0, 5, 10, 6, 20, 1]
    # too long: an error, or (training data) the answer is cut first, then the thinking, then the query
    with pytest.raises(ValueError, match="max_length=8"):
        frame_interaction(IDS, [10, 11], [20, 21, 22], max_length=8)
    assert frame_interaction(IDS, [10, 11], [20, 21, 22], max_length=7, truncate=True).input_ids == [
        0, 5, 10, 11, 6, 20, 1,
    ]
    cut = frame_interaction(IDS, [10, 11, 12], [20], [30, 31], max_length=7, truncate=True)
    assert cut.input_ids == [0, 5, 10, 11, 7, 6, 1]
    with pytest.raises(ValueError, match="too small"):
        frame_interaction(IDS, [10], [20], max_length=3, truncate=True)


def test_special_token_ids_and_encode_interaction_name_what_is_missing(tiny_tokenizer):
    ids = special_token_ids(tiny_tokenizer)
    assert [ids[k] for k in ("bos_token_id", "query_token_id", "answer_token_id", "eos_token_id")] == [0, 5, 6, 1]
    encoded = encode_interaction(tiny_tokenizer, "Hi?", "Ann.", thinking="Hm")
    assert encoded == tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Ann.", "thinking": "Hm"}],
        tokenize=True,
    )["input_ids"]

    class NoThink:
        unk_token_id = 3

        def convert_tokens_to_ids(self, token):
            return 3 if token == "[T]" else tiny_tokenizer.convert_tokens_to_ids(token)

    with pytest.raises(ValueError, match=r"missing the RxT special token\(s\) \['\[T\]'\]"):
        special_token_ids(NoThink())


def test_pad_rows_sides_length_multiple_and_dtype():
    ids, mask = pad_rows([[1, 2, 3], [4], []], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_rows([[1, 2, 3], [4]], 9, side="left", multiple_of=4)
    assert ids.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    labels, _ = pad_rows([torch.tensor([5, 6])], IGNORE_INDEX, length=4)
    assert labels.tolist() == [[5, 6, IGNORE_INDEX, IGNORE_INDEX]] and labels.dtype == torch.long
    weights, _ = pad_rows([[0.5], [1.0, 2.0]], 0.0, dtype=torch.float32)
    assert weights.tolist() == [[0.5, 0.0], [1.0, 2.0]]
    with pytest.raises(ValueError, match="side"):
        pad_rows([[1]], 0, side="middle")


def test_pad_grid_places_rows_in_their_cells():
    values, mask = pad_grid({(0, 1): [1, 2], (1, 0): [3]}, (2, 2), 9)  # conversation, turn
    assert values.tolist() == [[[9, 9], [1, 2]], [[3, 9], [9, 9]]]
    assert mask.tolist() == [[[0, 0], [1, 1]], [[1, 0], [0, 0]]]
    labels, _ = pad_grid({(1, 1): [IGNORE_INDEX, 4]}, (2, 2), IGNORE_INDEX, length=3)
    assert labels.shape == (2, 2, 3) and labels[1, 1].tolist() == [IGNORE_INDEX, 4, IGNORE_INDEX]


def test_incremental_detokenizer_pieces_join_to_the_decoded_text(tiny_tokenizer):
    text = "café 日本 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(tiny_tokenizer.decode([i]) for i in ids)  # one token at a time is wrong
    detokenizer = IncrementalDetokenizer(tiny_tokenizer)
    pieces = [detokenizer.add(i) for i in [0, 5, *ids, 1, 2]]  # special tokens give ""
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    rng = random.Random(0)  # any ids: the pieces join to decode(ids), but for an incomplete character at the end
    for _ in range(200):
        ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(rng.randrange(1, 20))]
        detokenizer = IncrementalDetokenizer(tiny_tokenizer)
        streamed = "".join(detokenizer.add(i) for i in ids)
        full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        assert full.startswith(streamed) and set(full[len(streamed) :]) <= {"\ufffd"}


def tiny_model():
    torch.manual_seed(0)
    return RxTForCausalLM(RxTConfig.from_preset("rxt-tiny")).eval()


def test_stm_bytes_round_trip_and_files_of_earlier_releases(tmp_path):
    from safetensors.torch import save, save_file

    model = tiny_model()
    state = model.init_memory(2, mode="normal", generator=torch.Generator().manual_seed(1))
    tensor, metadata = stm_from_bytes(stm_to_bytes(state, model_fingerprint="f" * 64, conversation_version="3"))
    assert torch.equal(tensor, state) and metadata == {"model_fingerprint": "f" * 64, "conversation_version": "3"}

    layers, slots, dim = model.config.stm_shape
    old_file = tmp_path / "old.stm.safetensors"  # what save_memory wrote before the format module
    old_metadata = {"format": "rxt-stm", "version": "1", "layers": str(layers), "slots": str(slots),
                    "dim": str(dim), "model_type": "rxt"}
    save_file({"stm_state": state}, str(old_file), metadata=old_metadata)
    torch.testing.assert_close(model.load_memory(old_file), state)
    old_row = tmp_path / "row.stm.safetensors"  # a serving-store row of the former `rxt-stm-store/1` format
    old_row.write_bytes(save({"stm_state": state[:1]}, metadata={
        "format": "rxt-stm-store/1", "fingerprint": "a" * 64, "dtype": "float32", "shape": str(list(state[:1].shape)),
    }))
    torch.testing.assert_close(model.load_memory(old_row), state[:1])

    model.save_memory(state, tmp_path / "new.stm.safetensors")  # readable by the previous release's check
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.stm.safetensors"), framework="pt") as handle:
        assert {key: handle.metadata()[key] for key in old_metadata} == old_metadata


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("garbage", "not safetensors data"),
        ("other-format", "format 'other' is not an RxT memory state"),
        ("newer-version", "version '2' is newer than this release reads"),
        ("mislabelled", "its metadata says layers/slots/dim"),
        ("no-tensor", "no 'stm_state' tensor"),
    ],
)
def test_unreadable_memory_files_name_the_file_and_the_fix(tmp_path, kind, problem):
    from safetensors.torch import save

    model = tiny_model()
    layers, slots, dim = model.config.stm_shape
    metadata = {"format": "rxt-stm", "version": "1", "layers": str(layers), "slots": str(slots), "dim": str(dim)}
    tensors = {"stm_state": model.init_memory(1)}
    if kind == "other-format":
        metadata["format"] = "other"
    elif kind == "newer-version":
        metadata["version"] = "2"
    elif kind == "mislabelled":
        metadata["slots"] = "999"
    elif kind == "no-tensor":
        tensors = {"something_else": tensors["stm_state"]}
    path = tmp_path / "broken.stm.safetensors"
    path.write_bytes(b"not a memory file" if kind == "garbage" else save(tensors, metadata=metadata))
    with pytest.raises(ValueError, match="broken.stm.safetensors") as error:
        model.load_memory(path)
    assert problem in str(error.value) and "Fix: pass a file written by model.save_memory" in str(error.value)
