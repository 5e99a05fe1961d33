"""Shared pytest fixtures. Everything runs on CPU, offline, in seconds."""

import os
import sys

# No network in tests: set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def remote_python() -> str:
    """The interpreter of the remote-code loading tests: `$RXT_REMOTE_PYTHON` when set (a virtualenv with torch and
    transformers but not this project, e.g. the newest transformers: `.ci/run` makes one), else this interpreter
    (whose subprocess never imports the project either)."""
    return os.environ.get("RXT_REMOTE_PYTHON") or sys.executable


def remote_env(tmp_path) -> dict[str, str]:
    """A clean offline environment for a remote-code subprocess: no project on the path, its own HF cache."""
    import torch

    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # same kernels as this process: bit-identical logits
    }

def run_two_cpu_processes(script, cwd, timeout: float):
    """Run `script` on two CPU processes (gloo) with torchrun and return the finished process. `accelerate launch
    --cpu --num_processes 2` needs mpirun for multi-CPU; without MPI the same Accelerate multi-CPU path is reached
    through torchrun, which `accelerate launch --multi_gpu` itself wraps."""
    import socket
    import subprocess
    from pathlib import Path

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "true"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(port), str(script),
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


_NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
_THINGS = ["apple", "book", "cat", "dog", "kite", "lamp", "pen", "ship"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
_PLACES = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo"]


def tiny_corpus(n: int = 240) -> list[str]:
    """A small deterministic corpus of simple sentences, questions and answers."""
    out = []
    for i in range(n):
        name = _NAMES[i % len(_NAMES)]
        thing = _THINGS[(i * 3) % len(_THINGS)]
        colour = _COLOURS[(i * 5) % len(_COLOURS)]
        place = _PLACES[(i * 7) % len(_PLACES)]
        k = i % 4
        if k == 0:
            out.append(f"{name} has a {colour} {thing}.")
        elif k == 1:
            out.append(f"What colour is the {thing} of {name}?")
        elif k == 2:
            out.append(f"{name} lives in {place} and likes the number {i % 10}.")
        else:
            out.append(f"Where does {name} live? {name} lives in {place}.")
    return out


@pytest.fixture(scope="session")
def tiny_corpus_texts() -> list[str]:
    return tiny_corpus()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus_texts):
    """A tiny RxT tokenizer (byte-level BPE, vocab <= 400) shared by the test session.

    Do not mutate it in tests (padding_side etc.); copy it first if needed.
    """
    from rxt_hf.modeling_rxt.tokenization_rxt import build_tokenizer

    return build_tokenizer(tiny_corpus_texts, vocab_size=400, min_frequency=2, model_max_length=128)
