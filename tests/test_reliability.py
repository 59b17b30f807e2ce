"""Specification of train.py's reliability: bad input is one line and exit status 2 with nothing
written, damaged checkpoints are refused cleanly, NaN steps are skipped and counted, and an
optimizer that cannot compile stops the run or runs eagerly. (A run killed and resumed:
test_checkpoints.py.)

The bad inputs run in this process, through train.cli() with sys.argv set, as `python train.py`
would run them (a new Python and torch for each would cost seconds a case); four of them, one of
each kind, also run as real `python train.py` commands, for the command line and exit status end
to end.

Most runs here use a tiny random BERT (hidden 16, 2 layers, the real 30522-token vocab), written
as a real checkpoint folder: the properties do not depend on the model's size, and it keeps the
file fast on one CPU core.
"""
import json
import random
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import train
from bert import BertModel, CheckpointError, read_safetensors
from conftest import make_tiny_checkpoint, poisoned_task_loss, read_metrics, snapshot, write_safetensors

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def data_folder(tmp, data_dir, file="ids-sst-dev.csv", edit=None):
    """Links to the real task files, except `file`: its header and 20 rows edited by edit(lines)
    (lines[0] is the header), or, with no edit, left out."""
    folder = tmp / "data"
    folder.mkdir()
    for real in data_dir.glob("*.csv"):
        if real.name != file:
            (folder / real.name).symlink_to(real)
    if edit is not None:
        lines = (data_dir / file).read_bytes().split(b"\n")[:21]
        (folder / file).write_bytes(b"\n".join(edit(lines)) + b"\n")
    return folder


def set_field(row, column, value):
    """edit(): tab-separated field `column` of line `row` becomes `value`."""
    def edit(lines):
        fields = lines[row].split(b"\t")
        fields[column] = value
        lines[row] = b"\t".join(fields)
        return lines
    return edit


def add_field(row, value):
    def edit(lines):
        lines[row] += b"\t" + value
        return lines
    return edit


def damaged_copy(tmp, tiny, damage):
    """A copy of the tiny checkpoint folder, with damage(folder) done to it."""
    folder = tmp / "bert"
    shutil.copytree(tiny, folder)
    damage(folder)
    return folder


def safetensors_bytes(edit):
    """damage(): model.safetensors becomes edit(its bytes, its header length, its header)."""
    def damage(folder):
        path = folder / "model.safetensors"
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        path.write_bytes(edit(data, n, json.loads(data[8:8 + n])))
    return damage


def safetensors_header(edit):
    """damage(): model.safetensors' JSON header is changed in place by edit(header)."""
    def new_bytes(data, n, header):
        edit(header)
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return safetensors_bytes(new_bytes)


def overlap_pooler(header):
    begin = header["pooler.weight"]["data_offsets"][0]
    header["pooler.bias"]["data_offsets"] = [begin, begin + 64]


def config_json(**fields):
    def damage(folder):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return damage


def delete(name):
    return lambda folder: (folder / name).unlink()


def write_file(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# (name, flags built from (tmp_path, data_dir, tiny checkpoint), the message expected on stderr)
BAD_INPUTS = [
    # flags, refused before anything is read
    ("--limit 0", lambda t, d, b: ["--limit", "0"], r"--limit must be at least 1"),
    ("negative --lr", lambda t, d, b: ["--lr", "-0.001"], r"--lr must be positive, got -0.001"),
    ("fls focus not in tasks", lambda t, d, b: ["--loss", "fls", "--focus", "para"],
     r"--focus para names a task not in --tasks sst"),
    ("unknown task", lambda t, d, b: ["--tasks", "sst,nli"], r"unknown task 'nli'"),
    ("not a number", lambda t, d, b: ["--batch_size", "eight"], r"argument --batch_size: invalid int value: 'eight'"),
    ("nan --weight_decay", lambda t, d, b: ["--weight_decay", "nan"],
     r"argument --weight_decay: must be a finite number, got nan"),
    ("negative --weight_decay", lambda t, d, b: ["--weight_decay", "-1"], r"--optimizer adamw: .*weight_decay"),
    ("SMART's beta of 1", lambda t, d, b: ["--smart", "--bregman_beta", "1"], r"--smart: SMART needs .*beta"),
    ("--max_length 2", lambda t, d, b: ["--max_length", "2"], r"--max_length must be at least 3"),
    ("--warmup 1", lambda t, d, b: ["--warmup", "1"], r"--warmup and --hidden_dropout_prob must lie in \[0, 1\)"),
    ("an abbreviated flag", lambda t, d, b: ["--epo", "2"], r"unrecognized arguments: --epo 2"),
    ("--resume with --eval_only", lambda t, d, b: ["--resume", "--eval_only", "--checkpoint", "best.pt"],
     r"--eval_only and --resume exclude each other"),
    ("pretrain with only the weightless STS head", lambda t, d, b: ["--option", "pretrain", "--tasks", "sts"],
     r"--option pretrain --tasks sts has nothing to train"),
    # data files
    ("no data folder", lambda t, d, b: ["--data_dir", str(t / "nowhere")], r"nowhere: data folder not found"),
    ("missing data file", lambda t, d, b: ["--data_dir", str(data_folder(t, d))],
     r"data/ids-sst-dev\.csv: data file not found"),
    ("wrong columns", lambda t, d, b: ["--data_dir", str(data_folder(t, d, edit=set_field(0, 3, b"label")))],
     r"ids-sst-dev\.csv: missing column\(s\) sentiment in the header"),
    ("wrong field count", lambda t, d, b: ["--data_dir", str(data_folder(t, d, edit=add_field(2, b"4")))],
     r"ids-sst-dev\.csv:3: expected 4 tab-separated fields"),
    ("non-numeric label", lambda t, d, b: ["--data_dir", str(data_folder(t, d, edit=set_field(2, 3, b"good")))],
     r"ids-sst-dev\.csv:3: could not convert string to float: 'good'"),
    ("label out of range", lambda t, d, b: ["--data_dir", str(data_folder(t, d, edit=set_field(2, 3, b"7")))],
     r"ids-sst-dev\.csv:3: label '7' is outside 0\.\.4"),
    ("empty sentence", lambda t, d, b: ["--data_dir", str(data_folder(t, d, edit=set_field(2, 2, b" ")))],
     r"ids-sst-dev\.csv:3: empty sentence"),
    ("similarity above 5", lambda t, d, b: ["--tasks", "sts", "--data_dir", str(
        data_folder(t, d, "sts-train.csv", edit=set_field(1, 4, b"5.5")))],
     r"sts-train\.csv:2: similarity '5\.5' is outside 0\.\.5"),
    ("not UTF-8", lambda t, d, b: ["--data_dir", str(data_folder(t, d, edit=set_field(2, 2, b"No \xff one")))],
     r"ids-sst-dev\.csv:3: not UTF-8 text"),
    # the BERT checkpoint folder
    ("no checkpoint folder", lambda t, d, b: ["--bert", str(t / "nowhere")], r"nowhere: checkpoint folder not found"),
    ("no vocab.txt", lambda t, d, b: ["--bert", str(damaged_copy(t, b, delete("vocab.txt")))],
     r"bert/vocab\.txt: not found"),
    ("no weights", lambda t, d, b: ["--bert", str(damaged_copy(t, b, delete("model.safetensors")))],
     r"bert: no model\.safetensors or pytorch_model\.bin"),
    ("config.json not JSON", lambda t, d, b: ["--bert", str(damaged_copy(
        t, b, lambda f: (f / "config.json").write_text('{"hidden_size": 16,')))], r"config\.json: not valid JSON"),
    ("config.json bad value", lambda t, d, b: ["--bert", str(damaged_copy(t, b, config_json(hidden_size="16")))],
     r"config\.json: hidden_size '16' is not a valid value"),
    ("header length past the end", lambda t, d, b: ["--bert", str(damaged_copy(t, b, safetensors_bytes(
        lambda data, n, h: struct.pack("<Q", len(data)) + data[8:])))], r"header length \d+ runs past the end"),
    ("truncated weights", lambda t, d, b: ["--bert", str(damaged_copy(t, b, safetensors_bytes(
        lambda data, n, h: data[:-100])))], r"has offsets \[\d+, \d+\] outside the file"),
    ("overlapping offsets", lambda t, d, b: ["--bert", str(damaged_copy(t, b, safetensors_header(overlap_pooler)))],
     r"entries 'pooler\.(weight|bias)' and 'pooler\.(weight|bias)' overlap"),
    ("unknown dtype", lambda t, d, b: ["--bert", str(damaged_copy(t, b, safetensors_header(
        lambda h: h["pooler.bias"].update(dtype="F7"))))], r"entry 'pooler\.bias' has unknown dtype 'F7'"),
    ("shape disagrees with config.json", lambda t, d, b: ["--bert", str(damaged_copy(
        t, b, config_json(intermediate_size=48)))],
     r"weight 'layers\.0\.ffn_in\.weight' has shape \(32, 16\), config\.json implies \(48, 16\)"),
    ("vocab does not fit", lambda t, d, b: ["--bert", str(damaged_copy(t, b, config_json(vocab_size=1000)))],
     r"vocab\.txt has 30522 tokens but config\.json only 1000 embeddings"),
    ("--max_length past the positions", lambda t, d, b: ["--max_length", "65"],
     r"--max_length 65 exceeds the checkpoint's 64 position embeddings"),
    # runs and saved models
    ("--resume without last.pt", lambda t, d, b: ["--resume"], r"run/last\.pt not found, nothing to resume"),
    ("out_dir holds a run", lambda t, d, b: [] if write_file(t / "run" / "metrics.jsonl", b"{}\n") else [],
     r"run already holds a run \(metrics\.jsonl\): add --resume to continue it"),
    ("--eval_only into a run's folder", lambda t, d, b: ["--eval_only"] if write_file(
        t / "run" / "predictions" / "sst-dev-output.csv", b"id \t Predicted_Sentiment \n") else [],
     r"run already holds a run \(predictions\): choose another --out_dir"),
    ("--resume of a file that is no run", lambda t, d, b: ["--resume"] if write_file(
        t / "run" / "last.pt", b"not a checkpoint") else [], r"run/last\.pt: not a readable checkpoint"),
    ("--checkpoint not found", lambda t, d, b: ["--eval_only", "--checkpoint", str(t / "best.pt")],
     r"best\.pt: checkpoint not found"),
    ("--checkpoint not a checkpoint", lambda t, d, b: ["--eval_only", "--checkpoint", str(
        write_file(t / "best.pt", b"PK\x03\x04 no zip"))], r"best\.pt: not a readable checkpoint"),
]


# One of each kind, also run as `python train.py`: a flag, a data file, a checkpoint, an --out_dir.
END_TO_END = ["an abbreviated flag", "wrong field count", "truncated weights", "out_dir holds a run"]


def bad_inputs(names):
    cases = {name: (build, message) for name, build, message in BAD_INPUTS}
    return [pytest.param(*cases[name], id=name) for name in names]


def bad_input_flags(tmp_path, data_dir, tiny, build):
    """A small run's flags into tmp_path/run, then the case's flags (later flags win)."""
    out_dir = tmp_path / "run"
    flags = build(tmp_path, data_dir, tiny)
    return out_dir, ["--data_dir", str(data_dir), "--bert", str(tiny), "--tasks", "sst", "--limit", "16",
                     "--eval_limit", "8", "--max_length", "32", "--epochs", "1", "--device", "cpu",
                     "--out_dir", str(out_dir), *flags]


def assert_one_error_line(status, stderr, message):
    assert status == 2, stderr
    assert "Traceback" not in stderr
    (line,) = stderr.splitlines()
    assert line.startswith("error: ") and re.search(message, line), line


# The warnings a new `python train.py` does not print (Python's default filters): these, but for
# a DeprecationWarning raised by train.py itself, its __main__.
UNSHOWN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_cli(monkeypatch, capsys, flags):
    """Run `python train.py <flags>` in this process, to its exit. Returns the exit status, and
    what it printed to stderr, after the warnings `python train.py` would have printed there
    (pytest would collect them for its summary instead)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *flags])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as stopped:
        warnings.simplefilter("always")
        train.cli()
    shown = [w for w in caught if not issubclass(w.category, UNSHOWN_WARNINGS)
             or issubclass(w.category, DeprecationWarning) and Path(w.filename) == Path(train.__file__)]
    printed = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in shown)
    return stopped.value.code, printed + capsys.readouterr().err


@pytest.mark.parametrize("build, message", bad_inputs([name for name, _, _ in BAD_INPUTS]))
def test_bad_input_is_one_line_exit_status_2_and_nothing_written(tmp_path, data_dir, tiny, build, message,
                                                                 monkeypatch, capsys):
    out_dir, flags = bad_input_flags(tmp_path, data_dir, tiny, build)
    before = snapshot(out_dir)
    assert_one_error_line(*run_cli(monkeypatch, capsys, flags), message)
    assert snapshot(out_dir) == before


@pytest.mark.parametrize("build, message", bad_inputs(END_TO_END))
def test_bad_input_on_the_command_line_is_one_line_exit_status_2_and_nothing_written(tmp_path, data_dir, tiny,
                                                                                     build, message):
    out_dir, flags = bad_input_flags(tmp_path, data_dir, tiny, build)
    before = snapshot(out_dir)
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], capture_output=True, text=True,
                          timeout=120)
    assert_one_error_line(done.returncode, done.stderr, message)
    assert snapshot(out_dir) == before


# ----------------------------------------------------------------------------- damaged safetensors files

def as_bytes(tensor):
    return tensor.reshape(-1).view(torch.uint8)


def test_write_safetensors_is_read_back_by_both_readers_and_reads_what_they_write(tmp_path):
    import safetensors.torch as safetensors_torch  # the reference reader (requirements-dev.txt)
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "i64": torch.arange(7), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors, metadata={"format": "pt"})
    safetensors_torch.save_file(tensors, theirs)
    assert struct.unpack("<Q", ours.read_bytes()[:8])[0] % 8 == 0  # header padded as the library pads it
    for loaded in (read_safetensors(ours), safetensors_torch.load_file(ours), read_safetensors(theirs)):
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [0, -1], ids=["first", "last"])
def test_one_non_finite_weight_anywhere_is_refused(tmp_path, bad, where):
    """from_pretrained checks each weight by its min and max (one pass): NaN, +inf and -inf must
    each be caught, in the first element of the first weight and the last of the last."""
    folder = make_tiny_checkpoint(tmp_path / "small", None)
    state = read_safetensors(folder / "model.safetensors")
    name = sorted(state)[where]
    state[name] = state[name].clone()
    state[name].view(-1)[where] = bad
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(CheckpointError, match="holds NaN or inf"):
        BertModel.from_pretrained(folder)


def test_flipped_or_cut_bytes_of_a_safetensors_file_never_load_silently(tmp_path):
    """Random damage to a small model.safetensors gives CheckpointError, or a file that is valid
    for what its bytes now say. A flip in the data area is such a file: the tensor that holds the
    byte has one different number (and from_pretrained refuses it if that number is NaN or inf).
    A flip in the header that still parses (e.g. a name or a dtype letter) must be refused by
    from_pretrained, unless it changed nothing (e.g. a space). A file with bytes cut never loads."""
    folder = make_tiny_checkpoint(tmp_path / "small", None, vocab_size=64, hidden_size=8, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=16, max_position_embeddings=16)
    path = folder / "model.safetensors"
    original = path.read_bytes()
    data_start = 8 + struct.unpack("<Q", original[:8])[0]
    header = json.loads(original[8:data_start])
    tensors = read_safetensors(path)
    owner = {}  # byte position in the file -> name of the tensor it belongs to
    for name, entry in header.items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            owner.update((data_start + i, name) for i in range(begin, end))
    assert len(owner) == len(original) - data_start

    rng = random.Random(0)
    outcomes = {"refused": 0, "data flip loaded": 0, "data flip non-finite": 0, "neutral header flip": 0}
    for _ in range(400):
        damaged, kind = bytearray(original), rng.choice(["flip", "flip", "flip", "cut", "cut out"])
        if kind == "flip":  # half in the header; 0x7f and 0xff in a float's top byte can make it NaN or inf
            at = rng.randrange(data_start) if rng.random() < 0.5 else rng.randrange(data_start, len(damaged))
            value = rng.choice([0x7F, 0xFF, rng.randrange(256)])
            damaged[at] = value if value != damaged[at] else value ^ 1
        elif kind == "cut":
            damaged = damaged[:rng.randrange(len(damaged))]
        else:
            at = rng.randrange(len(damaged))
            del damaged[at:at + rng.randrange(1, 64)]
        path.write_bytes(damaged)
        try:
            loaded = read_safetensors(path)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        assert kind == "flip", f"a file with bytes cut out loaded ({kind})"
        if at >= data_start:
            changed = [name for name in tensors if not torch.equal(as_bytes(tensors[name]), as_bytes(loaded[name]))]
            assert changed == [owner[at]]
            assert (as_bytes(tensors[owner[at]]) != as_bytes(loaded[owner[at]])).sum() == 1
            if torch.isfinite(loaded[owner[at]]).all():
                BertModel.from_pretrained(folder)
                outcomes["data flip loaded"] += 1
            else:
                with pytest.raises(CheckpointError, match="NaN or inf"):
                    BertModel.from_pretrained(folder)
                outcomes["data flip non-finite"] += 1
        elif loaded.keys() == tensors.keys() and all(
                loaded[n].dtype == tensors[n].dtype and torch.equal(as_bytes(loaded[n]), as_bytes(tensors[n]))
                for n in tensors):
            outcomes["neutral header flip"] += 1
        else:
            with pytest.raises(CheckpointError):
                BertModel.from_pretrained(folder)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200 and outcomes["data flip loaded"] > 50 and outcomes["data flip non-finite"] > 5


# ----------------------------------------------------------------------------- NaN and inf steps

def tiny_run_flags(data_dir, tiny, out_dir, *flags):
    return ["--data_dir", str(data_dir), "--bert", str(tiny), "--out_dir", str(out_dir), "--device", "cpu",
            "--tasks", "sst", "--limit", "48", "--batch_size", "8", "--eval_limit", "8", "--max_length", "32",
            "--epochs", "1", "--lr", "1e-3", *flags]


def test_nan_loss_and_nan_gradient_steps_are_skipped_and_counted(tmp_path, data_dir, tiny, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    monkeypatch.setattr(train, "task_loss", poisoned_task_loss(train.task_loss, nan_loss_calls={1}, nan_gradient_calls={3}))
    train.main(tiny_run_flags(data_dir, tiny, out_dir))
    assert "step 1: non-finite loss or gradient, step skipped (1 so far)" in capsys.readouterr().out
    (record,) = read_metrics(out_dir)
    assert record["skipped_steps"] == 2 and record["train_loss"] > 0
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert last["progress"]["skipped"] == 2 and last["progress"]["bad_in_a_row"] == 0
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert {s["step"] for s in last["optimizer"]["state"].values()} == {6 - 2}  # AdamW stepped 4 times


def test_nan_on_every_step_stops_the_run_with_exit_status_2(tmp_path, data_dir, tiny, monkeypatch, capsys):
    monkeypatch.setattr(train, "MAX_BAD_STEPS_IN_A_ROW", 3)
    monkeypatch.setattr(train, "task_loss", poisoned_task_loss(train.task_loss, nan_loss_calls=range(2, 10**6)))
    last_line = cli_error(monkeypatch, capsys, tiny_run_flags(data_dir, tiny, tmp_path / "run"))
    assert last_line == "error: 3 non-finite steps in a row (epoch 1, step 4): lower --lr or set --clip_grad"


def cli_error(monkeypatch, capsys, flags):
    """Run `python train.py <flags>` in this process; it must stop with exit status 2 and no
    traceback. Returns the last line it printed to stderr."""
    monkeypatch.setattr(sys, "argv", ["train.py", *flags])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_fused_optimizer_that_cannot_compile_stops_before_training(tmp_path, data_dir, tiny, monkeypatch, capsys):
    # What a machine without a C++ compiler does to torch.compile, simulated: the run must stop at
    # once with one line, not with a traceback at the first step.
    def no_compiler(optimizer):
        raise RuntimeError("Compiler: cc is not found.\nlong diagnostics")
    monkeypatch.setattr(train.optim, "compile_fused_update", no_compiler)
    last_line = cli_error(monkeypatch, capsys, [*tiny_run_flags(data_dir, tiny, tmp_path / "run"), "--fused_optimizer"])
    assert last_line == ("error: --fused_optimizer: torch.compile could not build the update "
                         "(RuntimeError: Compiler: cc is not found.); run with --no-fused_optimizer")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_without_the_flag_an_optimizer_that_cannot_compile_runs_eagerly(tmp_path, data_dir, tiny, monkeypatch,
                                                                        capsys):
    def no_compiler(optimizer):
        raise RuntimeError("Compiler: cc is not found.\nlong diagnostics")
    monkeypatch.setattr(train.optim, "compile_fused_update", no_compiler)
    train.main(tiny_run_flags(data_dir, tiny, tmp_path / "run"))
    assert "the optimizer runs its eager update: torch.compile could not build the update " \
           "(RuntimeError: Compiler: cc is not found.)" in capsys.readouterr().out
    assert (tmp_path / "run" / "scores.json").is_file()
