"""GGUF checkpoints (llama.cpp's one-file format) as base models, converted once to a folder.

transformers reads a GGUF by dequantizing every tensor as it loads
(`from_pretrained(folder, gguf_file=name)`); each embed worker, fine-tune process and
evaluation would repeat that, and the trained folder must come from the same weights the
base was scored with. So a GGUF is converted once into an ordinary transformers folder
(fp32 safetensors, config, tokenizer) under the project's state folder:

    .sift/gguf/<md5 of the GGUF>-<conversion key>/

The conversion key covers this module's code and the transformers version (what turns the
same bytes into weights); the GGUF's md5 is what the model's fingerprint is
(steps/modeling.py model_source), so lineage records it and a changed file re-embeds and
re-trains. A folder is written under a temporary name and renamed when complete, its record
(RECORD) last inside it: an interrupted conversion leaves no folder that a later run uses.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from steps.hashing import code_fingerprint, file_md5, text_md5
from steps.paths import private_partial

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (llama.cpp's gguf.md)
GGUF_SUFFIX = ".gguf"
RECORD = "sift-gguf.json"  # written last inside a converted folder: what it came from


class GgufError(ValueError):
    """A GGUF checkpoint that cannot be used; the message names the file and the setting."""


@dataclass(frozen=True)
class GgufCheckpoint:
    """A local GGUF file and the setting that names it (model.name or model.gguf_file)."""

    path: Path
    setting: str

    def __str__(self) -> str:
        return f"{self.setting} '{self.path}'"


def names_gguf(name: str, gguf_file: str | None) -> bool:
    """Whether a model section names a GGUF checkpoint (model.name=*.gguf or model.gguf_file)."""
    return gguf_file is not None or name.lower().endswith(GGUF_SUFFIX)


def named_checkpoint(name: str, gguf_file: str | None, revision: str | None) -> GgufCheckpoint:
    """The local GGUF file model.name / model.gguf_file name; a hub repo's file is fetched
    into the Hugging Face cache. A missing file is a GgufError naming the setting."""
    if gguf_file is None:
        checkpoint = GgufCheckpoint(Path(name).expanduser(), "model.name")
    elif Path(name).expanduser().is_dir():
        checkpoint = GgufCheckpoint(Path(name).expanduser() / gguf_file, "model.gguf_file")
    else:
        checkpoint = GgufCheckpoint(_hub_file(name, gguf_file, revision), "model.gguf_file")
    if not checkpoint.path.is_file():
        raise GgufError(f"{checkpoint}: no such file")
    return checkpoint


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as error:  # offline, no such repo or file, no access: all one answer
        raise GgufError(
            f"model.gguf_file '{filename}' of hub model.name '{repo_id}' could not be fetched: "
            f"{error}"
        ) from None


def check_checkpoint(checkpoint: GgufCheckpoint, state_dir: Path | None = None) -> str:
    """The file's architecture, once its header, tensor table and size agree and
    transformers builds a config from it; else a GgufError naming the file and the setting:
    not a GGUF (magic bytes), truncated or damaged, an architecture transformers cannot read.
    Reads no tensor data. The config try-load (seconds for a 49k vocabulary) is skipped
    where state_dir holds this file's finished conversion, and its verdict kept per file
    (path, size, mtime) for the process: `sift run` checks before its flow and again in it."""
    stat = checkpoint.path.stat()
    architecture = _architecture_if_whole(checkpoint, stat.st_size)
    if state_dir is not None and complete(_folder(state_dir, gguf_md5(checkpoint))):
        return architecture  # converted with this code and transformers: it loads
    _loads_config(checkpoint, architecture, stat.st_size, stat.st_mtime_ns)
    return architecture


def gguf_width(checkpoint: GgufCheckpoint) -> int | None:
    """The hidden size: the width of the token embedding table (llama.cpp names it
    token_embd.weight in every architecture), read from the header alone."""
    from transformers.integrations.gguf.reader import GgufHeader

    header = GgufHeader.from_file(str(checkpoint.path))
    shapes = {tensor.name: tensor.shape for tensor in header.tensors}
    shape = shapes.get("token_embd.weight")
    return int(shape[-1]) if shape else None


@cache
def _loads_config(checkpoint: GgufCheckpoint, architecture: str, size: int, mtime_ns: int) -> None:
    """transformers builds a config from the file; else a GgufError naming it."""
    from transformers import AutoConfig, __version__

    try:  # transformers' own verdict: the architectures it maps move with its version
        AutoConfig.from_pretrained(checkpoint.path.parent, gguf_file=checkpoint.path.name)
    except Exception as error:
        raise GgufError(
            f"{checkpoint}: transformers {__version__} cannot load GGUF architecture "
            f"{architecture!r} ({type(error).__name__}: {error})"
        ) from None


def _architecture_if_whole(checkpoint: GgufCheckpoint, size: int) -> str:
    """general.architecture, once the header and tensor table parse and the tensor data they
    describe ends within the file (a download cut short does not). transformers' own reader
    of them (integrations/gguf/reader.py): metadata arrays are walked, not decoded, so a
    49k-token vocabulary costs milliseconds (the gguf package's GGUFReader took 2.5 s)."""
    from transformers.integrations.gguf.reader import GgufHeader

    with checkpoint.path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if len(magic) < len(GGUF_MAGIC):
        raise GgufError(f"{checkpoint} is truncated: {size} bytes, not even a GGUF header")
    if magic != GGUF_MAGIC:
        raise GgufError(
            f"{checkpoint} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}"
        )
    try:
        header = GgufHeader.from_file(str(checkpoint.path))
    except Exception as error:  # struct.error, IndexError, ValueError on missing bytes
        raise GgufError(
            f"{checkpoint} is truncated or damaged: reading its header and tensor table failed "
            f"({type(error).__name__}: {error})"
        ) from None
    needed = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    if size < needed:
        raise GgufError(
            f"{checkpoint} is truncated: its tensors end at byte {needed}, the file has {size}"
        )
    return header.architecture


@cache
def conversion_key() -> str:
    """What else turns the same GGUF into these weights: this module's code and transformers."""
    from transformers import __version__

    return text_md5(f"{code_fingerprint(__name__)} transformers=={__version__}")[:8]


def _folder(state_dir: Path, md5: str) -> Path:
    return state_dir / "gguf" / f"{md5}-{conversion_key()}"


def converted_folder(checkpoint: GgufCheckpoint, md5: str, state_dir: Path) -> Path:
    """The checkpoint (whose file md5 is `md5`) as a transformers folder under
    state_dir/gguf/, converted now unless an earlier conversion finished there. One line on
    stderr says which (in a flow, Prefect's log_prints records it)."""
    folder = _folder(state_dir, md5)
    if complete(folder):
        print(f"{checkpoint}: using {folder}, converted before (md5 {md5})", file=sys.stderr)
        return folder
    started = time.perf_counter()
    check_checkpoint(checkpoint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = private_partial(folder)
    try:
        _convert(checkpoint, md5, partial)
        _publish(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - started
    print(f"{checkpoint}: converted to {folder} in {seconds:.1f} s (md5 {md5})", file=sys.stderr)
    return folder


def _convert(checkpoint: GgufCheckpoint, md5: str, out_dir: Path) -> None:
    """Dequantized to fp32 and saved as a plain folder; the record is written last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, __version__

    folder, name = checkpoint.path.parent, checkpoint.path.name
    try:
        # dequantize=True: plain weights even where `kernels` could keep them packed
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as error:
        raise GgufError(
            f"{checkpoint}: transformers {__version__} cannot load it as a causal LM "
            f"({type(error).__name__}: {error})"
        ) from None
    # The loaded model still names its GGUF quantizer; save_pretrained refuses to serialize
    # it ("not serializable"), and a saved quantization_config would make every later load
    # look for the GGUF again. The weights are plain fp32 tensors by now.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"gguf": str(checkpoint.path), "setting": checkpoint.setting, "md5": md5,
              "transformers": __version__, "dtype": "float32"}  # fmt: skip
    (out_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _publish(partial: Path, folder: Path) -> None:
    """Renames the finished folder into place. Another process may have finished the same
    conversion first: its folder is kept and ours discarded (the caller removes it)."""
    try:
        partial.rename(folder)
    except OSError:
        if not complete(folder):  # damaged since, or never finished: replaced
            shutil.rmtree(folder)
            partial.rename(folder)


def complete(folder: Path) -> bool:
    """A finished conversion: its record (written last), config and weights are there."""
    named = all((folder / name).is_file() for name in (RECORD, "config.json"))
    return named and any(folder.glob("*.safetensors"))


def gguf_md5(checkpoint: GgufCheckpoint) -> str:
    """The fingerprint of a GGUF base model: its file's md5 (lineage's model.base_md5)."""
    return file_md5(checkpoint.path)
