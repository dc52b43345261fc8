"""Shared fixtures: tiny models of both families built from configs, and a blocked network.

Nothing here downloads anything. Checkpoints, tokenizer files and model directories are written
by the fixtures themselves into temporary folders.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# Libraries that could reach for a hub must stay offline during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mmelkit  # noqa: E402  (applies the torchvision compat fix before open_clip loads)
from mmelkit.models.open_clip_backend import open_clip  # noqa: E402
from mmelkit.models.vlm import scene_llava  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Network: only loopback and unix sockets (papermill's kernels talk over localhost).
# ---------------------------------------------------------------------------------------------


class NetworkBlocked(OSError):
    """Raised by any attempt to open a connection off this machine during the tests."""


def _is_local(address: Any) -> bool:
    if not isinstance(address, tuple):  # unix socket path
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: off the machine


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    if not _is_local(address):
        raise NetworkBlocked(f"tests must not use the network (tried to connect to {address!r})")
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> Any:
    if not _is_local(address):
        raise NetworkBlocked(f"tests must not use the network (tried to connect to {address!r})")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if host not in (None, "localhost") and not _is_local((host,)):
        raise NetworkBlocked(f"tests must not resolve host names off this machine ({host!r})")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def block_network() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _guarded_getaddrinfo  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = _real_getaddrinfo  # type: ignore[assignment]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test, restored after. Tiny models are all overhead:
    on a small, busy machine extra threads only contend (a 32 px forward: ~3 ms -> ~300 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------

TINY_OPEN_CLIP: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _randomize_biases(model: torch.nn.Module, seed: int) -> None:
    # Default inits leave biases and norm affines at 0/1, which would hide layout or bias bugs.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "norm" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def make_open_clip(variant: str = "default", seed: int = 0) -> torch.nn.Module:
    """A tiny open_clip CLIP. Variants: default (NLD, nn.MultiheadAttention), lnd (same weights run
    sequence-first), custom (open_clip's own Attention with qk-norm and head scaling)."""
    config = json.loads(json.dumps(TINY_OPEN_CLIP))
    if variant == "custom":
        for tower in ("vision_cfg", "text_cfg"):
            config[tower]["qk_norm"] = True
            config[tower]["scale_heads"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config)
        _randomize_biases(model, seed)
    if variant == "lnd":
        for transformer in (model.visual.transformer, model.transformer):
            transformer.batch_first = False
            for block in transformer.resblocks:
                block.attn.batch_first = False
    return model.eval()


def write_clip_tokenizer_files(directory: Path) -> None:
    """vocab.json and merges.txt of OpenAI CLIP's BPE, taken from the copy open_clip ships."""
    bpe = open_clip.SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")


def make_hf_clip(attn_implementation: str = "eager", seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel._from_config(config, attn_implementation=attn_implementation)
        _randomize_biases(model, seed)
    return model.eval()


def save_hf_clip(model: torch.nn.Module, directory: Path) -> Path:
    """save_pretrained the model with a real CLIP tokenizer beside it."""
    from transformers import CLIPTokenizer

    model.save_pretrained(directory)
    write_clip_tokenizer_files(directory)
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(directory)
    return directory


OPEN_CLIP_VARIANTS = ["default", "lnd", "custom"]
HF_VARIANTS = ["eager", "sdpa"]
ALL_VARIANTS = [f"open_clip-{v}" for v in OPEN_CLIP_VARIANTS] + [f"hf-{v}" for v in HF_VARIANTS]


def make_model(variant: str, seed: int = 0) -> torch.nn.Module:
    family, kind = variant.split("-", 1)
    return make_open_clip(kind, seed) if family == "open_clip" else make_hf_clip(kind, seed)


@pytest.fixture(params=ALL_VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def adapter(variant: str) -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_model(variant), device="cpu")


@pytest.fixture
def images() -> torch.Tensor:
    """Three raw images (3, 32, 32) in [0, 1] with structure (not just noise)."""
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(3, 3, 32, 32, generator=generator)
    base[0, :, 8:20, 8:20] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    base[1, :, 16:30, 4:12] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    return base


TEXTS = ["a red square", "a blue bar on the left", "nothing at all"]


# -- tiny generative VLMs (LLaVA with a CLIP vision tower and a Llama decoder) ------------------------
TEXT = {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "heads": 2}
VISION = {"image_size": 48, "patch_size": 8, "hidden_size": 32, "layers": 2, "heads": 2}
EOS = scene_llava.VOCABULARY.index(scene_llava.EOS)


def tiny_llava(seed: int = 0, vision: dict[str, int] | None = None, strategy: str = "default") -> Any:
    """A tiny random scene-llava. Larger-than-default init (and a stronger eos row) make its greedy
    answers differ between rows and stop at different lengths, so equality tests mean something."""
    config = scene_llava.build_config(text=TEXT, vision=vision or VISION)
    config.vision_feature_select_strategy = strategy
    for sub in (config, config.text_config, config.vision_config):
        sub.initializer_range = 0.1
    model = scene_llava.build_model(seed, vision_from_scene_clip=False, config=config)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 3.0
    return model.eval()
