"""Meta fairscale shards -> Distributed Checkpoint (DCP), and DCP -> a sharded model.

Conversion: every rank memory-maps all `consolidated.XX.pth` shards and assembles only its
own slice of each weight, which it hands to DCP as a DTensor. DCP stores
chunks with their global offsets, so the result loads at any tensor-parallel degree.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.tensor import DTensor, Shard

from llama import meta_format, quantize
from llama.args import ModelArgs
from llama.distributed import Runtime, log, max_over_ranks, peak_rss_bytes
from llama.errors import UserError
from llama.model import Transformer
from llama.parallel import build_sharded
from llama.tokenizer import Tokenizer

SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")
# Present in every Llama 2 shard, recomputed by the model, never needed.
IGNORED_KEYS = {"rope.freqs"}
ARGS_FILE = "model_args.json"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# bf16 everywhere. On CPU it was measured against fp16 (AMD EPYC, 2 cores, llama3.2-1b shape):
# with oneDNN bypassed for one-row products (generation.single_row_kernels) a bf16 decode step
# takes as long as an fp16 one (61 vs 56 ms), while fp16 matrix-matrix products, all of
# prefill, run about 7x slower than bf16 (19 vs 134 GFLOP/s at 128 rows); bf16 also has
# fp32's range, so no activation can overflow.
DEFAULT_DTYPE = "bfloat16"


@dataclass
class MergePlan:
    """How one weight is split across the Meta shards: concatenated along `dim`, or replicated.
    `duplicates` > 1: each run of that many consecutive shards holds the same rows (Llama 3.1
    405B MP16's KV heads), read from the first of each run and checked against the others."""

    shape: tuple[int, ...]
    dim: int | None
    source: str  # key in the shards; output.weight may come from the tied embedding
    duplicates: int = 1


class MetaCheckpoint:
    """A Meta-format checkpoint directory, memory-mapped and validated against params.json.

    Besides bf16 shards it reads Meta's other layouts (see meta_format): FP8 feed-forward
    weights with their fp8_scales_X.pt (dequantized here, slice by slice) and duplicated KV
    heads (read once)."""

    def __init__(self, ckpt_dir: Path, tokenizer_path: Path | None = None, model_parallel_size: int | None = None,
                 **arg_overrides: object) -> None:
        self.dir = Path(ckpt_dir)
        if not self.dir.is_dir() or not any(self.dir.iterdir()):
            raise UserError(f"--original_ckpt_dir {self.dir}: missing or empty; pass the folder that holds "
                            "params.json and consolidated.*.pth (download.py prints it)")
        self.paths = _shard_paths(self.dir)
        self.tokenizer = tokenizer = Tokenizer(tokenizer_path or self.dir / TOKENIZER_FILE)
        if model_parallel_size is not None and model_parallel_size != len(self.paths):
            raise UserError(f"--model_parallel_size {model_parallel_size} does not match the {len(self.paths)} "
                            f"consolidated.*.pth file(s) in {self.dir}; omit the flag to detect it")
        args = ModelArgs.from_params_json(self.dir / "params.json", **arg_overrides)
        if args.vocab_size == -1:  # Llama 2 leaves it to the tokenizer
            args.vocab_size = tokenizer.n_words
        elif args.vocab_size != tokenizer.n_words:
            raise UserError(f"--tokenizer_path {tokenizer.path}: {tokenizer.n_words} tokens, but params.json says "
                            f"vocab_size {args.vocab_size}; pass the tokenizer that came with this checkpoint")
        args.check(str(self.dir / "params.json"))
        self.int4_eo8 = meta_format.read_int4_eo8(self.dir / "params.json")
        if self.int4_eo8 and len(self.paths) != 1:
            raise UserError(f"{self.dir}: {len(self.paths)} shards with quantization_args; Meta's INT4_EO8 "
                            "checkpoints are one consolidated.00.pth: re-download it")
        self.shards = [self._open(p) for p in self.paths]
        if self.int4_eo8:
            meta_format.check_int4_eo8(self.paths[0], self.shards[0], args, self.int4_eo8)
        self.fp8_scales = meta_format.read_fp8_scales(self.paths, self.shards)
        self.kv_duplicates = meta_format.kv_head_duplicates(args, self.shards)
        args.n_kv_heads //= self.kv_duplicates
        self.args = args
        self.plans = self._plan()

    @property
    def format(self) -> str:
        """What the files are, in a few words (the conversion's log line)."""
        kinds = ["FP8 feed-forward weights with row-wise scales"] if self.fp8_scales else []
        if self.int4_eo8:
            kinds.append(self.int4_eo8.scheme.describe())
        if self.kv_duplicates > 1:
            kinds.append(f"each KV head duplicated {self.kv_duplicates}x (read once)")
        return "; ".join(kinds) or "bf16"

    def _open(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); re-download it") from None

    def _plan(self) -> dict[str, MergePlan]:
        expected = self.args.weight_shapes()
        keys = set(self.shards[0]) - IGNORED_KEYS
        if self.int4_eo8:  # each weight's scales, zeros and adaptors: checked with it (check_int4_eo8)
            keys = {k for k in keys if not k.endswith(meta_format.INT4_EO8_PARTS)}
        for path, shard in zip(self.paths, self.shards):
            if set(shard) - IGNORED_KEYS != set(self.shards[0]) - IGNORED_KEYS:
                raise UserError(f"{path}: holds different weights than {self.paths[0].name}; re-download it")
        if "output.weight" not in keys:  # tied output (Llama 3.2 1B/3B)
            keys.add("output.weight")
        unexpected, missing = sorted(keys - expected.keys()), sorted(expected.keys() - keys)
        if unexpected or missing:
            detail = f"unexpected {unexpected[:3]}" if unexpected else f"missing {missing[:3]}"
            raise UserError(f"{self.dir}: weights do not match params.json ({detail}); "
                            "is params.json from the same model?")
        plans = {}
        for name, shape in expected.items():
            source = name if name in self.shards[0] else "tok_embeddings.weight"
            duplicates = self.kv_duplicates if meta_format.is_kv_projection(name) else 1
            plans[name] = MergePlan(shape, self._concat_dim(source, shape, duplicates), source, duplicates)
        return plans

    def _concat_dim(self, name: str, shape: tuple[int, ...], duplicates: int) -> int | None:
        shapes = [tuple(s[name].shape) for s in self.shards[::duplicates]]
        if all(s == shape for s in shapes):
            for path, shard in zip(self.paths[1:], self.shards[1:]):
                if not torch.equal(shard[name], self.shards[0][name]):
                    raise UserError(f"{path}: replicated weight {name} differs from {self.paths[0].name}")
            return None
        for dim in range(len(shape)):
            others_match = all(s[:dim] + s[dim + 1:] == shape[:dim] + shape[dim + 1:] for s in shapes)
            if others_match and sum(s[dim] for s in shapes) == shape[dim]:
                return dim
        raise UserError(f"{self.paths[0]}: {name} has shape {list(shapes[0])} in each of {len(self.paths)} shard(s), "
                        f"which does not add up to {list(shape)} from params.json; are the shards and params.json "
                        "from the same download, all of them?")

    def _pieces(self, name: str, dim: int, start: int, stop: int,
                first: int = 0) -> list[tuple[int, torch.Tensor, int]]:
        """The parts of [start, stop) along `dim` of the merged weight, each as (shard index,
        that shard's tensor narrowed, the shard's row its first row is), in order; with
        duplicated shards, from the `first`-th of each run."""
        plan = self.plans[name]
        indices = list(range(first, len(self.shards), plan.duplicates))
        parts = [self.shards[i][plan.source] for i in indices]
        if plan.dim is None:
            return [(0, parts[0].narrow(dim, start, stop - start), start if dim == 0 else 0)]
        if plan.dim != dim:
            return [(i, p.narrow(dim, start, stop - start), start if dim == 0 else 0) for i, p in zip(indices, parts)]
        pieces, offset = [], 0
        for i, p in zip(indices, parts):
            lo, hi = max(start, offset), min(stop, offset + p.shape[dim])
            if lo < hi:
                pieces.append((i, p.narrow(dim, lo - offset, hi - lo), lo - offset if dim == 0 else 0))
            offset += p.shape[dim]
        return pieces

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) along `dim` of the merged weight, reading only that part of the shards
        and copying nothing when it is exactly one bf16 shard. FP8 parts come dequantized to
        float32 with their own shard's row scales; duplicated parts are checked equal."""
        plan = self.plans[name]
        pieces = self._pieces(name, dim, start, stop)
        for copy in range(1, plan.duplicates):
            for (i, piece, _), (j, twin, _) in zip(pieces, self._pieces(name, dim, start, stop, copy)):
                if not torch.equal(piece, twin):
                    raise UserError(f"{self.paths[j]}: {name} should duplicate the KV head in {self.paths[i].name} "
                                    "(params.json's n_kv_heads counts each duplicate) but differs from it; "
                                    "re-download the shards")
        tensors = [self._dequantized(name, i, piece, row) for i, piece, row in pieces]
        cat_dim = dim if plan.dim == dim else plan.dim if plan.dim is not None else dim
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=cat_dim)

    def fp8_rows(self, name: str, start: int, stop: int) -> dict[str, torch.Tensor] | None:
        """Rows [start, stop) of an FP8 weight as they are stored, with their shards' row scales
        ({"weight", "scales"}, llama.quantize's fp8 layout), when the shards split it by rows
        (w1, w3); None when each row is split over shards scaled apart (w2)."""
        if self.plans[name].dim != 0:
            return None
        pieces = self._pieces(name, 0, start, stop)
        scales = [self.fp8_scales[i][name].narrow(0, row, piece.shape[0]) for i, piece, row in pieces]
        return {"weight": torch.cat([piece for _, piece, _ in pieces]), "scales": torch.cat(scales)}

    def int4_eo8_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of an INT4_EO8 linear in llama.quantize's int4 layout: the same
        values (q + 8, two a byte), Meta's float32 scales, zero = -(Meta's zero) x scale, and
        the LoRA adaptors (A whole, B's rows times the LoRA scale)."""
        shard, prefix = self.shards[0], name.removesuffix("weight")
        q = shard[name][start:stop]
        scales = shard[prefix + "scales"][start:stop].float()
        zeros = shard.get(prefix + "zeros")
        out = {"weight": quantize.pack_int4((q + 8).to(torch.uint8)), "scales": scales,
               "zeros": torch.zeros_like(scales) if zeros is None else -zeros[start:stop].float() * scales}
        if self.int4_eo8.lora_rank:
            b = shard[prefix + "adaptor.B.weight"][start:stop].float() * self.int4_eo8.lora_scale
            out |= {"adaptor_a": shard[prefix + "adaptor.A.weight"].to(dtype), "adaptor_b": b.to(dtype)}
        return out

    def _dequantized(self, name: str, shard: int, piece: torch.Tensor, row: int) -> torch.Tensor:
        """FP8 (405B) and int8 (INT4_EO8's embedding and output) parts times their rows' scales, in float32."""
        if piece.dtype == torch.float8_e4m3fn:
            scales = self.fp8_scales[shard][name]
        elif piece.dtype == torch.int8:
            scales = self.shards[shard][self.plans[name].source.removesuffix("weight") + "scales"].reshape(-1)
        else:
            return piece
        return piece.float() * scales.narrow(0, row, piece.shape[0])[:, None]


def _shard_paths(ckpt_dir: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := SHARD_PATTERN.fullmatch(p.name))}
    if not found:
        raise UserError(f"--original_ckpt_dir {ckpt_dir}: no consolidated.*.pth files; is this a Meta-format "
                        "checkpoint (not the -hf safetensors)?")
    if sorted(found) != list(range(len(found))):
        raise UserError(f"--original_ckpt_dir {ckpt_dir}: shard files {sorted(found)} are not numbered "
                        f"0..{len(found) - 1}; a download is incomplete")
    return [found[i] for i in range(len(found))]


def _local_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Index range of `rank` under DTensor's Shard(d), which splits like torch.chunk."""
    chunk = -(-size // world_size)
    return min(rank * chunk, size), min((rank + 1) * chunk, size)


def convert(ckpt: MetaCheckpoint, out_dir: Path, runtime: Runtime, dtype: str, overwrite: bool,
            scheme: quantize.Scheme | None = None) -> None:
    """Write `ckpt` as a DCP checkpoint plus model_args.json and tokenizer.model in `out_dir`,
    with its linear weights quantized if `scheme` is given (llama.quantize).

    All of it is written to a staging folder of its own beside `out_dir` that takes its place
    at the end (see _replace), so `out_dir` is either the whole checkpoint or untouched."""
    out_dir = Path(out_dir)
    _check_output(out_dir, [ckpt.dir, ckpt.tokenizer.path], overwrite)
    if ckpt.int4_eo8:
        if scheme:
            raise UserError(f"--{'keep_fp8' if scheme.name == 'fp8' else 'quantize'}: {ckpt.dir} is already quantized "
                            "(Meta's INT4_EO8, which is kept as it is); leave the flag out")
        scheme = ckpt.int4_eo8.scheme
    if scheme and scheme.name == "int4":
        quantize.check_group_size(ckpt.args, scheme.group_size, "--group_size")
    if scheme and scheme.name == "fp8":
        _check_fp8_kept(ckpt)
    start = time.perf_counter()
    # Everything is read and checked before anything is written: a bad part of the shards
    # that only one rank reads (a duplicated KV head that differs) stops every rank alike.
    try:
        state, problem = _local_state(ckpt, runtime, DTYPES[dtype], scheme), None
    except UserError as e:
        state, problem = {}, str(e)
    problems = [None] * runtime.world_size
    dist.all_gather_object(problems, problem)
    if any(problems):
        raise UserError(next(p for p in problems if p))
    log(f"{ckpt.dir}: {len(ckpt.paths)} shard(s) ({ckpt.format}), {ckpt.args.n_layers} layers, dim "
        f"{ckpt.args.dim}, vocab {ckpt.args.vocab_size}; converting on {runtime.world_size} rank(s)")
    names = [None]
    if runtime.is_main:  # a name no other job uses: two conversions to one folder never share it
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        names = [tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-")]
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(names[0], 0o777 & ~umask)  # the permissions of a folder made as usual, not mkdtemp's 0700
    dist.broadcast_object_list(names, src=0)
    staging = Path(names[0])
    try:
        _write(ckpt, state, staging, runtime, dtype, scheme, out_dir, start)
    except BaseException:
        if runtime.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _write(ckpt: MetaCheckpoint, state: dict[str, torch.Tensor], staging: Path, runtime: Runtime, dtype: str,
           scheme: quantize.Scheme | None, out_dir: Path, start: float) -> None:
    dcp.save(state, checkpoint_id=staging)

    if runtime.is_main:
        ckpt.args.dtype = dtype
        if scheme:
            scheme.record(ckpt.args)
        ckpt.args.save(staging / ARGS_FILE)
        shutil.copyfile(ckpt.tokenizer.path, staging / TOKENIZER_FILE)
        _replace(out_dir, staging)
    [peak] = max_over_ranks([peak_rss_bytes()], runtime.device)
    stored = sum(t.numel() * t.element_size() for t in state.values())  # DTensors count their global size
    log(f"converted {len(ckpt.plans)} weights in {time.perf_counter() - start:.1f}s -> {out_dir}: "
        f"{stored / 1e6:.1f} MB{f', {scheme.describe()}' if scheme else ''} "
        f"(peak memory per rank {peak / 2**30:.2f} GiB)")


def _is_converted_file(name: str) -> bool:
    """The files convert_checkpoints.py writes into a checkpoint's folder."""
    return name in (".metadata", ARGS_FILE, TOKENIZER_FILE) or name.endswith(".distcp")


def _check_output(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that holds the inputs, and one that is not empty unless
    --overwrite, and then only a converted checkpoint (nothing a user put there is deleted)."""
    flag = f"--save_checkpoint_dir {out_dir}"
    target = out_dir.resolve()
    for path in inputs:
        if path.resolve().is_relative_to(target):
            raise UserError(f"{flag}: holds the input {path}; write the checkpoint to a folder of its own")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise UserError(f"{flag}: exists and is not a folder; pass the path of a new folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries and not overwrite:
        raise UserError(f"{flag}: exists and is not empty; pass --overwrite to replace it")
    foreign = [name for name in entries if not _is_converted_file(name) or not (out_dir / name).is_file()]
    if foreign:
        raise UserError(f"{flag}: holds {foreign[0]}, which convert_checkpoints.py did not write; --overwrite "
                        "replaces only a converted checkpoint: move that file or choose another folder")


def _replace(out_dir: Path, staging: Path) -> None:
    """Put the finished `staging` folder at `out_dir`: the old folder is renamed aside, the new
    one renamed in, and only then the old one deleted, so `out_dir` is always whole."""
    if not out_dir.exists() and not out_dir.is_symlink():
        staging.rename(out_dir)
        return
    aside = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    out_dir.rename(aside / out_dir.name)
    staging.rename(out_dir)
    shutil.rmtree(aside)


def _local_state(ckpt: MetaCheckpoint, runtime: Runtime, torch_dtype: torch.dtype,
                 scheme: quantize.Scheme | None) -> dict[str, torch.Tensor]:
    """This rank's part of every weight, as DTensors of the whole (norms whole on every rank)."""
    state: dict[str, torch.Tensor] = {}
    for name, plan in ckpt.plans.items():
        if len(plan.shape) == 1:  # norms: tiny, kept whole on every rank (DCP writes one copy)
            state[name] = ckpt.slice(name, 0, 0, plan.shape[0]).to(torch_dtype)
            continue
        if quantize.quantizes(scheme, name, ckpt.args.n_layers):
            # Whole rows on each rank, so that every scale sees its whole row or group.
            lo, hi = _local_range(plan.shape[0], runtime.rank, runtime.world_size)
            prefix = name.removesuffix("weight")
            if scheme.meta_eo8:
                stored = ckpt.int4_eo8_rows(name, lo, hi, torch_dtype)
            else:
                stored = scheme.name == "fp8" and ckpt.fp8_rows(name, lo, hi)
            for key, local in (stored or quantize.quantize(ckpt.slice(name, 0, lo, hi), scheme, torch_dtype)).items():
                # A LoRA adaptor's A is small and whole on every rank (DCP writes one copy).
                state[prefix + key] = local if key == "adaptor_a" else _row_sharded(local, plan.shape[0], runtime)
            continue
        # Split the way Meta did, so that converting on as many ranks as there are shards
        # hands each shard's memory-mapped tensor to DCP as it is, without a copy.
        dim = plan.dim or 0
        lo, hi = _local_range(plan.shape[dim], runtime.rank, runtime.world_size)
        local = ckpt.slice(name, dim, lo, hi).to(torch_dtype).contiguous()
        state[name] = DTensor.from_local(local, runtime.mesh, [Shard(dim)], shape=torch.Size(plan.shape),
                                         stride=torch.empty(plan.shape, device="meta").stride())
    return state


def _check_fp8_kept(ckpt: MetaCheckpoint) -> None:
    """--keep_fp8 stores FP8 exactly the weights llama.quantize's fp8 scheme names."""
    if not ckpt.fp8_scales:
        raise UserError(f"--keep_fp8: {ckpt.dir} holds no FP8 weights (no fp8_scales_*.pt beside FP8 shards); "
                        "leave the flag out, or use --quantize")
    fp8 = {name for name, t in ckpt.shards[0].items() if t.dtype == meta_format.FP8}
    expected = {name for name in ckpt.plans if quantize.quantizes(quantize.Scheme("fp8"), name, ckpt.args.n_layers)}
    if fp8 != expected:
        odd = sorted(fp8 ^ expected)[0]
        raise UserError(f"--keep_fp8: {ckpt.paths[0]}: {odd} is {'' if odd in fp8 else 'not '}FP8, unlike Meta's FP8 "
                        "checkpoints (w1/w3/w2 of every layer but the first and last); convert without --keep_fp8 "
                        "(dequantized to bf16)")


def _row_sharded(local: torch.Tensor, rows: int, runtime: Runtime) -> DTensor:
    """This rank's rows of a (rows, ...) tensor as a Shard(0) DTensor."""
    shape = torch.Size((rows, *local.shape[1:]))
    return DTensor.from_local(local.contiguous(), runtime.mesh, [Shard(0)], shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


# What a converted checkpoint's .metadata may name: DCP's own metadata classes, tensor sizes,
# dtypes and layouts, and the path DCP records of where it was saved. Nothing else is built
# while it is read (DCP itself reads it with plain pickle, which runs any code it names).
_METADATA_GLOBALS = {
    **{("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
       for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                    "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): lambda *parts: str(PurePosixPath(*parts)),  # kept as text, never opened
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _METADATA_GLOBALS:
            return _METADATA_GLOBALS[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


def read_metadata(ckpt_dir: Path) -> dcp_metadata.Metadata:
    """`ckpt_dir`/.metadata, read without running anything it names (only DCP's metadata classes,
    sizes, dtypes and plain containers), and checked to describe tensors only, each stored in a
    file inside `ckpt_dir`; else a UserError naming the file."""
    path = Path(ckpt_dir) / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # pickle raises many types for truncated or foreign data
        raise UserError(f"{path}: not the metadata of a converted checkpoint ({e}); convert the checkpoint "
                        "again with convert_checkpoints.py") from None
    root = Path(ckpt_dir).resolve()

    def inside(relative: object) -> bool:
        return (isinstance(relative, str) and not Path(relative).is_absolute()
                and (root / relative).resolve().is_relative_to(root))

    problem = None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        problem = "it holds no DCP Metadata"
    elif not all(isinstance(m, dcp_metadata.TensorStorageMetadata) for m in metadata.state_dict_metadata.values()):
        problem = "it describes something other than tensors"
    elif not isinstance(metadata.storage_data, dict) or not all(
            isinstance(info, _StorageInfo) and inside(info.relative_path) and not info.transform_descriptors
            for info in metadata.storage_data.values()):
        problem = "it stores data outside the checkpoint's folder or in a form convert_checkpoints.py never writes"
    if problem:
        raise UserError(f"{path}: not the metadata of a converted checkpoint ({problem}); convert the checkpoint "
                        "again with convert_checkpoints.py")
    return metadata


class CheckedReader(dcp.FileSystemReader):
    """DCP's file reader with read_metadata above (tensor data DCP reads with weights_only)."""

    def read_metadata(self, *args: object, **kwargs: object) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        metadata.storage_meta = dcp_metadata.StorageMeta(load_id=self.load_id)
        return metadata


def check_dcp_matches(ckpt_dir: Path, args: ModelArgs, args_path: Path) -> None:
    """Fail clearly if `ckpt_dir` is not a DCP checkpoint of the model `args` describes."""
    if not (ckpt_dir / ".metadata").is_file():
        raise UserError(f"--converted_ckpt_dir {ckpt_dir}: not a DCP checkpoint (no .metadata); "
                        "create it with convert_checkpoints.py")
    stored = read_metadata(ckpt_dir).state_dict_metadata
    found, expected = _stored_scheme(stored, args), quantize.scheme_of(args)
    if found and expected and found.meta_eo8:  # SpinQuant leaves no trace in the tensors
        found = dataclasses.replace(found, spinquant=expected.spinquant)
    if found != expected:
        def describe(scheme: quantize.Scheme | None) -> str:
            return f"{scheme.describe()}-quantized" if scheme else "unquantized"
        raise UserError(f"--converted_ckpt_dir {ckpt_dir}: holds {describe(found)} weights but {args_path} says "
                        f"{describe(expected)}; restore its \"quantize\" and \"group_size\" as "
                        "convert_checkpoints.py wrote them")
    for name, (shape, _) in quantize.stored_tensors(args).items():
        if name not in stored or tuple(stored[name].size) != shape:
            found = list(stored[name].size) if name in stored else "nothing"
            raise UserError(f"--converted_ckpt_dir {ckpt_dir}: {name} is {found} but {args_path} expects "
                            f"{list(shape)}; the checkpoint was converted from another model")


def _stored_scheme(stored: dict[str, object], args: ModelArgs) -> quantize.Scheme | None:
    """The quantization a checkpoint's tensors show (the output projection's, like every linear's
    in int8 and int4; fp8 leaves it and shows in the feed-forward)."""
    if any(getattr(getattr(t, "properties", None), "dtype", None) == quantize.FP8 for t in stored.values()):
        return quantize.Scheme("fp8")
    output = stored.get("output.weight")
    dtype = getattr(getattr(output, "properties", None), "dtype", None)
    if dtype == torch.int8:
        return quantize.Scheme("int8")
    if dtype == torch.uint8 and "output.zeros" in stored:
        return quantize.Scheme("int4", args.dim // stored["output.zeros"].size[1])
    if "layers.0.attention.wq.zeros" in stored:  # int4 with the output left as it was: INT4_EO8
        adaptor = stored.get("layers.0.attention.wq.adaptor_a")
        return quantize.Scheme("int4", args.dim // stored["layers.0.attention.wq.zeros"].size[1], meta_eo8=True,
                               lora_rank=adaptor.size[0] if adaptor else None)
    return None


def load_parallel_model(ckpt_dir: Path, args: ModelArgs, runtime: Runtime, dtype: torch.dtype) -> Transformer:
    """Build on meta, shard over the mesh, allocate only local shards, read them from DCP, and
    lay quantized weights out for the device's kernels."""
    quantize.check_dtype(quantize.scheme_of(args), dtype, runtime.device)
    model = build_sharded(args, runtime.mesh, runtime.device, dtype)
    dcp.load(model.state_dict(), storage_reader=CheckedReader(ckpt_dir))
    quantize.pack_for_device(model)
    return model.eval().requires_grad_(False)


def load_converted(ckpt_dir: Path, runtime: Runtime, dtype: torch.dtype, model_args: Path | None = None,
                   tokenizer_path: Path | None = None, max_seq_len: int | None = None,
                   max_batch_size: int | None = None) -> tuple[Transformer, Tokenizer]:
    """Everything generate.py and benchmark.py need from a converted checkpoint directory.

    model_args and the tokenizer default to the copies convert_checkpoints.py wrote there;
    max_seq_len and max_batch_size may be changed at load time (they size only the cache)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"--converted_ckpt_dir {ckpt_dir}: not found; create it with convert_checkpoints.py")
    args_path = Path(model_args) if model_args else ckpt_dir / ARGS_FILE
    args = ModelArgs.load(args_path)
    quantize.check_args(args, str(args_path))
    if max_seq_len:
        args.max_seq_len = max_seq_len
    if max_batch_size:
        args.max_batch_size = max_batch_size
    tokenizer = Tokenizer(Path(tokenizer_path) if tokenizer_path else ckpt_dir / TOKENIZER_FILE)
    if tokenizer.n_words != args.vocab_size:
        raise UserError(f"--tokenizer_path {tokenizer.path}: {tokenizer.n_words} tokens, but {args_path} says "
                        f"vocab_size {args.vocab_size}; pass the tokenizer of this model")
    check_dcp_matches(ckpt_dir, args, args_path)
    return load_parallel_model(ckpt_dir, args, runtime, dtype), tokenizer
