"""The four tasks: reading their files, turning examples into batches, the heads that sit on
the shared encoder, and the metrics that score them.

| task   | data (CS224N layout)    | input                        | head                              | metric    |
| ------ | ----------------------- | ---------------------------- | --------------------------------- | --------- |
| sst    | ids-sst-{split}.csv     | one sentence                 | mean pool, dropout, linear (5)    | accuracy  |
| para   | quora-{split}.csv       | the pair, encoded jointly    | mean pool, dropout, linear (1)    | accuracy  |
| sts    | sts-{split}.csv         | each sentence on its own     | cosine of mean-pooled embeddings  | Pearson r |
| cfimdb | ids-cfimdb-{split}.csv  | one review                   | mean pool, dropout, linear (2)    | accuracy  |

Why these heads:
- SST and CFIMDB classify one text from its sentence vector. BERT's own choice is the pooled
  [CLS] vector tanh(W h_CLS) (`pooling="cls"`), but the default checkpoint, all-MiniLM-L6-v2,
  was trained for mean pooling and its pooler was left stale: on SST dev sentences its outputs
  vary by a std of 0.035 per dimension, against 0.17 for the mean-pooled tokens. So the heads
  read the mean-pooled vector by default (`pooling="mean"`). Measured with `train.py --limit
  2000 --epochs 1 --hidden_dropout_prob 0.3 --batch_size 8 --lr 5e-5 --lr_schedule constant
  --loss gls --sampler roundrobin` (250 steps): SST 0.275 -> 0.304, PARA 0.620 -> 0.689 dev
  accuracy, cls -> mean.
- PARA is a cross-encoder: `[CLS] q1 [SEP] q2 [SEP]` lets every token of one question attend
  to every token of the other, which judges "same question?" far better than comparing two
  separate embeddings (Reimers & Gurevych, 2019, Table 1, measure cross- vs bi-encoders).
  A cross-encoder is not symmetric, though being a paraphrase is; training on both orders
  and scoring their mean logit was tried and left PARA where it was (0.837 over four seeds), so
  each pair is encoded once, in the order of the file.
- STS is a bi-encoder: the cosine of the two sentences' mean-pooled token embeddings. The
  default checkpoint (all-MiniLM-L6-v2) was trained for exactly this, so the head starts good.
  The cosine lies in [-1, 1]; 5 * cosine, clipped to [0, 5], is the predicted score, and the
  loss is the squared error of 5 * cosine against the score (losses.similarity_mse_loss).

The study's overall dev score is mean(SST acc, PARA acc, (STS r + 1) / 2), over the tasks run.
"""
import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line) in one line."""


TASKS = ("sst", "para", "sts", "cfimdb")
FILE_PATTERNS = {"sst": "ids-sst-{}.csv", "para": "quora-{}.csv", "sts": "sts-{}.csv", "cfimdb": "ids-cfimdb-{}.csv"}
SPLITS = ("train", "dev", "test-student")
PAIR_TASKS = ("para", "sts")
LABEL_COLUMNS = {"sst": "sentiment", "para": "is_duplicate", "sts": "similarity", "cfimdb": "sentiment"}
# Column names of the CS224N leaderboard files, spelling included ("Similiary").
PREDICTION_COLUMNS = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase",
                      "sts": "Predicted_Similiary", "cfimdb": "Predicted_Sentiment"}


# ----------------------------------------------------------------------------- reading files

@dataclass
class Example:
    id: str
    text: str
    pair: str | None  # the second sentence of PARA and STS
    label: float | int | None  # None in the test files


def parse_label(task, raw):
    """The label as the task uses it, or ValueError with what was wrong."""
    value = float(raw)  # ValueError: could not convert string to float: 'x'
    if task == "sts":
        if not 0.0 <= value <= 5.0:  # also refuses nan
            raise ValueError(f"similarity {raw!r} is outside 0..5")
        return value
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"label {raw!r} is not a whole number")
    n_classes = 5 if task == "sst" else 2
    if not 0 <= int(value) < n_classes:
        raise ValueError(f"label {raw!r} is outside 0..{n_classes - 1}")
    return int(value)


def data_path(data_dir, task, split):
    return Path(data_dir) / FILE_PATTERNS[task].format(split)


def read_examples(data_dir, task, split, report=print):
    """Read one split of one task. Test files have no labels (label None).

    A training row with an empty label is skipped, counted and reported; anything else that
    is malformed (missing columns, wrong field count, bad label, empty sentence) is an error."""
    path = data_path(data_dir, task, split)
    if not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: data folder not found (point --data_dir at the folder holding the task files)")
    if not path.is_file():
        raise DataError(f"{path}: data file not found (point --data_dir at the folder holding the task files)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            examples, skipped = parse_rows(path, reader, task, split)
        except UnicodeDecodeError:  # raised for a whole chunk read ahead: find the line itself
            raise DataError(f"{path}:{first_non_utf8_line(path)}: not UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
    if skipped:
        report(f"{path}: skipped {skipped} row(s) with an empty label")
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def first_non_utf8_line(path):
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data[:e.start].count(b"\n") + 1


def parse_rows(path, reader, task, split):
    """(examples, number of training rows skipped for an empty label) from a csv.DictReader."""
    text_columns = ["sentence1", "sentence2"] if task in PAIR_TASKS else ["sentence"]
    label_column = None if split == "test-student" else LABEL_COLUMNS[task]
    wanted = ["id"] + text_columns + ([label_column] if label_column else [])
    missing = [c for c in wanted if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} in the header")
    examples, skipped = [], 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            raise DataError(f"{where}: expected {len(reader.fieldnames)} tab-separated fields")
        texts = [row[c] for c in text_columns]
        if any(not t.strip() for t in texts):
            raise DataError(f"{where}: empty sentence")
        label = None
        if label_column:
            raw = row[label_column].strip()
            if raw == "" and split == "train":
                skipped += 1
                continue
            try:
                label = parse_label(task, raw)
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        examples.append(Example(row["id"], texts[0], texts[1] if len(texts) > 1 else None, label))
    return examples, skipped


def fold_of(example_id, n_folds):
    """The fold, 0 to n_folds - 1, an example falls in: from its id alone (a hash), so the same
    whatever the file's order, --limit or the seed. A teacher trained without fold k (train.py
    --fold k/n) and its student agree on which examples it never saw."""
    return int(hashlib.sha256(example_id.encode()).hexdigest(), 16) % n_folds


# ----------------------------------------------------------------------------- token ids and batches

class TaskData:
    """One split of one task, tokenised and padded once up front, held on `device`; a batch is
    rows of those tensors, cut to the batch's longest rounded up to a multiple of `pad_multiple`
    (at most max_length).

    sst/cfimdb keep one id sequence per example, para one joint pair sequence
    `[CLS] q1 [SEP] q2 [SEP]`, sts two (one per sentence). Why hold them on the device: a GPU step
    then copies only its row numbers from the host (a few hundred bytes, asynchronously), not its
    token ids (the largest split, Quora's training file, is 16k rows: 32 MiB of ids and types). Why
    round up: a compiled model is specialised to its input shapes, and CUDA graphs record one graph
    per shape. Lengths rounded to multiples of 16 give at most 8 shapes up to 128 tokens, not one
    per length; padding is masked, so the outputs are the same but for float rounding
    (tests/test_tasks.py)."""

    def __init__(self, task, examples, tokenizer, max_length, pad_multiple=1, device="cpu"):
        self.task, self.examples = task, examples
        self.pad_id = tokenizer.pad_token_id
        self.max_length, self.pad_multiple, self.device = max_length, pad_multiple, torch.device(device)
        if task == "sts":
            self.encodings = [[tokenizer.encode_with_types(e.text, max_length=max_length) for e in examples],
                              [tokenizer.encode_with_types(e.pair, max_length=max_length) for e in examples]]
        else:
            self.encodings = [[tokenizer.encode_with_types(e.text, e.pair, max_length=max_length) for e in examples]]
        # per sequence (sts has two an example): each one's length, on the host and on the device
        self.sequence_lengths = [[len(ids) for ids, _ in enc] for enc in self.encodings]
        # the cost of an example is its longest sequence: what batches are bucketed by
        self.lengths = [max(lengths) for lengths in zip(*self.sequence_lengths)]
        self.labels = [e.label for e in examples]
        self.length_tensors = [torch.tensor(n, dtype=torch.long, device=self.device) for n in self.sequence_lengths]
        self.split_tensors = [self.pad_split(enc) for enc in self.encodings]
        self.label_tensor = None
        if examples and self.labels[0] is not None:
            dtype = torch.float if task in ("sts", "para") else torch.long
            self.label_tensor = torch.tensor(self.labels, dtype=dtype, device=self.device)

    def __len__(self):
        return len(self.examples)

    def width(self, longest):
        """The padded length of a batch whose longest sequence has `longest` tokens."""
        return min(-(-longest // self.pad_multiple) * self.pad_multiple, max(self.max_length, longest))

    def pad_split(self, encodings):
        """{'input_ids', 'token_type_ids'}: the whole split's, every row padded to the split's
        longest (rounded up). Padded as Python lists, then one torch.tensor call per field (a call
        per row costs more than the padding itself); `view` keeps the 2-d shape of an empty split."""
        width = self.width(max((len(ids) for ids, _ in encodings), default=1))
        return {name: torch.tensor([seq + [pad] * (width - len(seq)) for seq in (pair[k] for pair in encodings)],
                                   dtype=torch.long, device=self.device).view(len(encodings), width)
                for name, k, pad in (("input_ids", 0, self.pad_id), ("token_type_ids", 1, 0))}

    def batch(self, indices):
        """{'inputs': [encoder inputs: one, or sts's two sentences], 'labels': tensor or None,
        'rows': `indices` as a tensor}, on the data's device. Each input is the rows `indices`, cut
        to their longest: padding to the batch's longest, not the split's."""
        rows, inputs = to_device(torch.tensor(indices, dtype=torch.long), self.device), []
        for tensors, lengths, length_tensor in zip(self.split_tensors, self.sequence_lengths, self.length_tensors):
            width = self.width(max(lengths[i] for i in indices))  # from the host's copy: the GPU is not asked
            positions = torch.arange(width, device=self.device)
            inputs.append({"input_ids": tensors["input_ids"][rows, :width],
                           "token_type_ids": tensors["token_type_ids"][rows, :width],
                           "attention_mask": (positions < length_tensor[rows, None]).long()})
        labels = None if self.label_tensor is None else self.label_tensor[rows]
        return {"inputs": inputs, "labels": labels, "rows": rows}

    def ordered_batches(self, batch_size, indices=None):
        """Index batches for evaluation, of every example or of `indices`: sorted by length (little
        padding), order restored later."""
        order = sorted(range(len(self)) if indices is None else indices, key=self.lengths.__getitem__)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def to_device(tensor, device):
    """A host tensor copied to `device`: from pinned memory on CUDA, so that the copy does not
    wait for the GPU's queued work."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


# ----------------------------------------------------------------------------- heads

def mean_pool(hidden, attention_mask):
    """Average of the real (non-padding) token vectors: the sentence embedding of SBERT."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MultitaskBert(nn.Module):
    """One shared encoder and a small head per task. forward(task, inputs) -> the head's output:
    logits (sst, cfimdb: (B, classes); para: (B,)) or a cosine similarity (sts: (B,))."""

    def __init__(self, encoder, tasks, dropout, pooling="mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling  # what the classification heads read: "mean" or "cls" (the pooler)
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict()
        if "sst" in tasks:
            self.heads["sst"] = nn.Linear(hidden, 5)
        if "para" in tasks:
            self.heads["para"] = nn.Linear(hidden, 1)
        if "cfimdb" in tasks:
            self.heads["cfimdb"] = nn.Linear(hidden, 2)

    def forward(self, task, inputs, embeds=None):
        """`embeds` optionally replaces the word embeddings of each input (SMART perturbs them)."""
        # with inputs_embeds given, the encoder uses them in place of the ids' word embeddings
        outputs = [self.encoder(**enc, inputs_embeds=None if embeds is None else embeds[k])
                   for k, enc in enumerate(inputs)]
        if task == "sts":
            a, b = (mean_pool(out["last_hidden_state"], enc["attention_mask"]) for out, enc in zip(outputs, inputs))
            return F.cosine_similarity(a, b, dim=-1)
        (output,), (enc,) = outputs, inputs  # the one input: a sentence, or para's joint pair
        logits = self.heads[task](self.dropout(self.features(output, enc)))
        return logits.squeeze(-1) if task == "para" else logits

    def features(self, output, inputs):
        """The sentence vector a classification head reads."""
        if self.pooling == "cls":
            return output["pooler_output"]
        return mean_pool(output["last_hidden_state"], inputs["attention_mask"])


def predictions_from_outputs(task, outputs):
    """Head outputs -> what the leaderboard files hold: a class, 0/1, or a score in 0..5."""
    if task == "sts":
        return (5.0 * outputs).clamp(0.0, 5.0)
    if task == "para":
        return (outputs > 0).long()
    return outputs.argmax(dim=-1)


# ----------------------------------------------------------------------------- metrics

def accuracy(predicted, gold):
    return sum(int(p == g) for p, g in zip(predicted, gold)) / len(gold)


def pearson_r(x, y):
    """Pearson correlation, in float64 (a constant prediction has no correlation: 0)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else 0.0


def task_score(task, predicted, gold):
    return pearson_r(predicted, gold) if task == "sts" else accuracy(predicted, gold)


def overall_score(scores):
    """The study's overall dev score: mean of accuracies and (r + 1) / 2 for STS."""
    parts = [(s + 1) / 2 if task == "sts" else s for task, s in scores.items()]
    return sum(parts) / len(parts)
