"""Load a Hugging Face model directory: config.json (+ generation_config.json), the safetensors
weights (one model.safetensors, or shards listed in model.safetensors.index.json), and the
tokenizer (tokenizer.json, tokenizer_config.json).

load_model_dir checks everything it can before any weight is read: the config, the tokenizer,
and every tensor's presence, shape and dtype from the safetensors headers, so a broken directory
fails at once with one line naming the file. The weights themselves are read lazily, one
tensor at a time, while the model copies them in (`LoadedModel.weights` is an iterable of
(name, tensor)), so loading never holds a second copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import safe_open

from vibee.runtime.model import expected_weight_shapes
from vibee.runtime.model_config import LoadError, ModelConfig
from vibee.runtime.prequantized import CheckpointQuantization, checkpoint_quantization
from vibee.runtime.tokenizer import Tokenizer, read_json

__all__ = ["LoadError", "LoadedModel", "SafetensorsWeights", "load_model_dir", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """A torch dtype, a name, or "auto"/None: the checkpoint's dtype (float32 when it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return DTYPES.get(config.torch_dtype or "float32", torch.float32)
    if dtype not in DTYPES:
        raise LoadError(f"dtype: unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


class SafetensorsWeights:
    """The checkpoint's tensors as (Hugging Face name, tensor) pairs in the target dtype and
    device, read lazily shard by shard; iterating shows a progress bar over the tensors."""

    def __init__(self, shards: dict[Path, list[str]], dtype: torch.dtype, device: torch.device, progress: bool, source: str,
                 quantized_layers: frozenset[str] = frozenset()):
        self.shards = shards
        self.dtype = dtype
        self.device = device
        self.progress = progress
        self.quantized_layers = quantized_layers
        self.source = source  # the model directory, for error messages

    def __len__(self) -> int:
        return sum(len(names) for names in self.shards.values())

    def names(self) -> list[str]:
        return [name for names in self.shards.values() for name in names]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.progress:
            yield from self._tensors(None)
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]loading weights"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("", total=len(self))
            yield from self._tensors(lambda desc: bar.update(task, advance=1, description=desc))

    def _tensors(self, advance) -> Iterator[tuple[str, torch.Tensor]]:
        for path, names in self.shards.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in names:
                        tensor = f.get_tensor(name)
                        # Floats in the model's dtype; a quantized layer's codes and scales as stored.
                        as_stored = name.rpartition(".")[0] in self.quantized_layers or not tensor.is_floating_point()
                        tensor = tensor.to(device=self.device, dtype=None if as_stored else self.dtype)
                        if advance is not None:
                            advance(path.name)
                        yield name, tensor
            except (OSError, RuntimeError, ValueError) as err:  # a file changed or truncated since the check
                raise LoadError(f"{path}: cannot read tensors ({_one_line(err)})") from None


@dataclass
class LoadedModel:
    config: ModelConfig
    model_dir: Path
    weights: SafetensorsWeights
    tokenizer: Tokenizer
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    generation_config: dict = field(default_factory=dict)
    quantization: CheckpointQuantization | None = None  # a pre-quantized checkpoint's format (GPTQ, AWQ, GGUF)
    quantized_layers: frozenset[str] = frozenset()  # its quantized layers, by Hugging Face prefix


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _headers(path: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, safetensors dtype) from a file's header, without reading the tensors."""
    if not path.is_file():
        raise LoadError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: (list(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for a corrupt header
        raise LoadError(f"{path}: not a valid safetensors file ({_one_line(err)})") from None


def _weight_files(model_dir: Path) -> tuple[dict[str, Path], Path]:
    """Each tensor name's file, and the file that says so (index or weights) for messages."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index}: no 'weight_map' object of tensor name -> shard file")
        for shard in set(weight_map.values()):
            if Path(shard).name != shard:  # a shard name must not leave the model directory
                raise LoadError(f"{index}: shard {shard!r} is not a file name in the model directory")
        return {name: model_dir / shard for name, shard in weight_map.items()}, index
    single = model_dir / "model.safetensors"
    files = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (pytorch_model.bin checkpoints are not supported; save with safe_serialization)" if any(
            model_dir.glob("*.bin")) else ""
        raise LoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")
    names: dict[str, Path] = {}
    for path in files:
        for name in _headers(path):
            names.setdefault(name, path)
    return names, files[0] if len(files) == 1 else model_dir


def _check_weights(model_dir: Path, config: ModelConfig, quantization: CheckpointQuantization | None = None
                   ) -> tuple[dict[Path, list[str]], frozenset[str]]:
    """The tensors the config needs, grouped by file, each checked in its file's header, and the
    layers a pre-quantized checkpoint holds as codes (qweight, qzeros, scales) instead of weights."""
    where, listed_in = _weight_files(model_dir)
    expected = expected_weight_shapes(config)
    quantized: set[str] = set()
    if quantization is not None:
        for name, shape in list(expected.items()):
            layer = name.removesuffix(".weight")
            if name.endswith("_proj.weight") and layer + ".qweight" in where:
                del expected[name]
                quantized.add(layer)
                parts = quantization.tensor_shapes(*shape)
                expected.update({f"{layer}.{suffix}": part for suffix, part in parts.items()
                                 if suffix != "g_idx" or f"{layer}.g_idx" in where})
        if not quantized:
            raise LoadError(f"{listed_in}: config.json has a {quantization.method} quantization_config but no "
                            "layer has a qweight tensor")
    headers: dict[Path, dict[str, tuple[list[int], str]]] = {}
    shards: dict[Path, list[str]] = {}
    for name, shape in expected.items():
        if name not in where:
            raise LoadError(f"{listed_in}: missing tensor {name}")
        path = where[name]
        if path not in headers:
            if not path.is_file():
                raise LoadError(f"{path}: missing (listed in {listed_in.name})")
            headers[path] = _headers(path)
        if name not in headers[path]:
            raise LoadError(f"{path}: missing tensor {name} ({listed_in.name} says it is in this file)")
        got, stored = headers[path][name]
        if tuple(got) != shape:
            raise LoadError(f"{path}: tensor {name} has shape {got}, but config.json needs {list(shape)}")
        suffix = name.rpartition(".")[2]
        codes = name.rpartition(".")[0] in quantized and suffix != "scales"
        if codes and stored != "I32":
            raise LoadError(f"{path}: tensor {name} is stored as {stored}; {quantization.method} stores it as int32")
        if not codes and stored not in _FLOAT_STORAGE:
            raise LoadError(f"{path}: tensor {name} is stored as {stored}; only float checkpoints and GPTQ/AWQ ones "
                            "are supported (quantize at load time with --quant instead)")
        shards.setdefault(path, []).append(name)
    return shards, frozenset(quantized)


class GGUFWeights:
    """A GGUF file's tensors by Hugging Face name (gguf_file.py), read as the model copies them in."""

    def __init__(self, gguf: Any, dtype: torch.dtype, device: torch.device):
        self.gguf, self.dtype, self.device, self.source = gguf, dtype, device, str(gguf.path)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.gguf.tensors(self.dtype, self.device)


def _check_head_dim(config: ModelConfig, head_dims: Sequence[int] | None, source: str) -> None:
    if head_dims is not None and config.head_dim not in head_dims:
        raise LoadError(f"{source}: head_dim {config.head_dim} is not supported by the generated attention "
                        f"(it is compiled for head_dims {list(head_dims)}; add it to head_dims in the flash_attention spec)")


def load_gguf(path: Path, dtype: torch.dtype | str | None, device: torch.device | str,
              head_dims: Sequence[int] | None = None) -> LoadedModel:
    """A .gguf file as a LoadedModel: its metadata as the config, its tokenizer, its tensors."""
    from vibee.runtime.gguf_file import GGUFFile

    gguf = GGUFFile(path)
    config = ModelConfig.from_hf_dict(gguf.config, source=str(path))
    _check_head_dim(config, head_dims, str(path))
    tokenizer = gguf.tokenizer()
    tokenizer.eos_token_ids |= set(config.eos_token_ids)
    torch_dtype, torch_device = resolve_dtype(dtype, config), torch.device(device)
    layers = gguf.quantized_layers()
    return LoadedModel(config=config, model_dir=path, weights=GGUFWeights(gguf, torch_dtype, torch_device),
                       tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
                       quantization=gguf.quantization, quantized_layers=layers)


def load_model_dir(path: str | Path, *, dtype: torch.dtype | str | None = "auto", device: torch.device | str = "cpu",
                   progress: bool = True, head_dims: Sequence[int] | None = None) -> LoadedModel:
    """Read and check a model directory. head_dims: the head dims the generated attention was
    compiled for (its HEAD_DIMS); a model outside them is a LoadError here, before any weight
    is read. Raises LoadError("<file>: <problem>")."""
    model_dir = Path(path).expanduser()
    if model_dir.suffix == ".gguf" and model_dir.is_file():
        return load_gguf(model_dir, dtype, device, head_dims)
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: no such model directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{config_path}: missing (not a Hugging Face model directory?)")
    gen_path = model_dir / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.is_file() else None
    raw_config = read_json(config_path)
    config = ModelConfig.from_hf_dict(raw_config, source=str(config_path),
                                      generation_config=generation_config, generation_source=str(gen_path))
    quantization = checkpoint_quantization(raw_config, str(config_path))
    _check_head_dim(config, head_dims, str(config_path))
    tokenizer = Tokenizer.from_dir(model_dir)
    shards, quantized_layers = _check_weights(model_dir, config, quantization)

    # One set of stop ids for both: the tokenizer's eos token and the config's / generation config's.
    tokenizer.eos_token_ids |= set(config.eos_token_ids)
    extra_eos = sorted(tokenizer.eos_token_ids - set(config.eos_token_ids))
    config = config.model_copy(update={"eos_token_ids": [*config.eos_token_ids, *extra_eos]})
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token_id = config.bos_token_id

    torch_dtype = resolve_dtype(dtype, config)
    torch_device = torch.device(device)
    weights = SafetensorsWeights(shards, torch_dtype, torch_device, progress, str(model_dir), quantized_layers)
    return LoadedModel(config=config, model_dir=model_dir, weights=weights, tokenizer=tokenizer, dtype=torch_dtype,
                       device=torch_device, generation_config=generation_config or {},
                       quantization=quantization, quantized_layers=quantized_layers)
