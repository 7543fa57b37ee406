"""Model hyper-parameters: read from Meta's params.json, stored as model_args.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from llama.errors import UserError

# Fields every Meta params.json has; the rest have defaults shared by all Llama releases.
REQUIRED_FIELDS = ("dim", "n_layers", "n_heads")
# model_args.json fields added after the format was first written: absent means the default.
LATER_FIELDS = ("quantize", "group_size", "lora_rank", "spinquant")


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    # Llama 3.1 frequency scaling; Meta's reference uses factor 8 unless params.json says otherwise.
    rope_scaling_factor: float = 8.0
    rope_high_freq_factor: float = 4.0
    max_seq_len: int = 2048
    max_batch_size: int = 4
    dtype: str = "bfloat16"
    # How the stored linear weights are quantized, as llama.quantize names it (None: not at
    # all); that module reads and checks these two fields.
    quantize: str | None = None
    group_size: int | None = None
    # Rank of the LoRA adaptors on the quantized linears (Meta's QLoRA checkpoints), or None.
    lora_rank: int | None = None
    # SpinQuant checkpoints: w2's input is rotated at run time (llama.quantize.hadamard).
    spinquant: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size, computed exactly as Meta's FeedForward does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Global shape of every weight, keyed by its name in Meta's checkpoints."""
        kv_dim = self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "tok_embeddings.weight": (self.vocab_size, self.dim),
            "norm.weight": (self.dim,),
            "output.weight": (self.vocab_size, self.dim),
        }
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes |= {
                p + "attention.wq.weight": (self.n_heads * self.head_dim, self.dim),
                p + "attention.wk.weight": (kv_dim, self.dim),
                p + "attention.wv.weight": (kv_dim, self.dim),
                p + "attention.wo.weight": (self.dim, self.n_heads * self.head_dim),
                p + "feed_forward.w1.weight": (self.ffn_hidden_dim, self.dim),
                p + "feed_forward.w2.weight": (self.dim, self.ffn_hidden_dim),
                p + "feed_forward.w3.weight": (self.ffn_hidden_dim, self.dim),
                p + "attention_norm.weight": (self.dim,),
                p + "ffn_norm.weight": (self.dim,),
            }
        return shapes

    def check(self, source: str) -> None:
        if self.dim % self.n_heads:
            raise UserError(f"{source}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"{source}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.vocab_size <= 0:
            raise UserError(f"{source}: vocab_size must be positive, got {self.vocab_size}")

    @classmethod
    def from_params_json(cls, path: Path, **overrides: object) -> ModelArgs:
        """Read Meta's params.json; unknown keys (vision, quantization, ...) are ignored."""
        params = _read_json(path)
        missing = [f for f in REQUIRED_FIELDS if f not in params]
        if missing:
            raise UserError(f"{path}: missing field(s) {', '.join(missing)}; is this a Meta-format params.json?")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known} | overrides
        return cls(**kwargs)

    @classmethod
    def load(cls, path: Path) -> ModelArgs:
        """Read a model_args.json written by convert_checkpoints.py."""
        params = _read_json(path)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - params.keys() - set(LATER_FIELDS))
        if missing:
            raise UserError(f"{path}: missing field(s) {', '.join(missing)}; re-run convert_checkpoints.py")
        args = cls(**{k: params[k] for k in names if k in params})
        args.check(str(path))
        return args

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
