"""RETRO-fitting a pretrained decoder (the paper's section 4.2): the base LM frozen and unchanged, a
neighbour encoder and chunked cross-attention (CCA) trained beside it.

    x = base token embeddings of idx                                   (frozen)
    for each base decoder layer i (1-based):                           (frozen)
        x = layer_i(x)
        if i in cca_layers:  x += CCA_i(ln(x), E)                      (trained)
    E = encoder(base token embeddings of [N, F], conditioned on x after the first CCA layer)  (trained)
    logits = base head(base final norm(x))                             (frozen)

Every CCA block's output projection starts at zero, so the model starts as exactly the base; with
retrieval off, or a chunk without neighbours, CCA adds exactly zero and the logits are the base's.
The CCA blocks hook the base's own decoder layers (``register_forward_hook``), so any Hugging Face
causal LM whose layers return their hidden states works: the Llama family (Llama, Qwen2, Mistral,
SmolLM) and GPT-2 are tested. The trained weights are saved apart from the base, which is referenced
by path and sha256 (``model.checkpoint``), as PEFT saves adapters.

The interface is ``model.model.Retro``'s (``config``, ``forward(idx, neighbours, targets,
encoder_cache)``, ``retrieval_parameters``), so training, evaluation, generation, explanation and
the service take either. ``decode`` adds what a 135M-parameter base needs to generate: the base's KV
cache, the encoded neighbours and CCA's projected neighbours kept between calls.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.model import ChunkedCrossAttention, EncoderBlock, RetroConfig


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The base's decoder layers, in order: its one ModuleList of ``num_hidden_layers`` modules."""
    n = base.config.num_hidden_layers
    found = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ValueError(
            f"{type(base).__name__}: cannot tell its {n} decoder layers apart ({len(found)} lists of {n} modules)"
        )
    return found[0]


def retrofit_config(
    lm: nn.Module,
    *,
    pad_id: int,
    chunk_size: int = 64,
    max_chunks: int = 4,
    cca_layers: list[int] | None = None,
    enc_n_layer: int = 2,
    **overrides,
) -> RetroConfig:
    """A ``RetroConfig`` whose widths are those of the base ``lm``. CCA every third layer from the middle up by default:
    the paper's choice for 12 layers (6, 9, 12) scaled to the base's depth (15, 18, ..., 30 of 30), so the
    encoder is conditioned on mid-depth states and the upper half of the decoder reads the neighbours."""
    c = lm.config
    n_layer = c.num_hidden_layers
    fields = dict(
        vocab_size=c.vocab_size,
        n_layer=n_layer,
        n_head=c.num_attention_heads,
        n_embd=c.hidden_size,
        enc_n_layer=enc_n_layer,
        chunk_size=chunk_size,
        max_chunks=max_chunks,
        pad_id=pad_id,
        cca_layers=list(range(n_layer // 2, n_layer + 1, 3)) if cca_layers is None else cca_layers,
    )
    return RetroConfig(**{**fields, **overrides})


class RetroFit(nn.Module):
    """A frozen Hugging Face causal LM with a trained neighbour encoder and CCA blocks (see the module)."""

    def __init__(self, base: nn.Module, config: RetroConfig):
        super().__init__()
        self.config = config
        self.base = base.requires_grad_(False).eval()
        layers = decoder_layers(base)
        cca = sorted(set(config.cca_layers)) if config.retrieval else []
        if cca and (cca[0] < 1 or cca[-1] > len(layers)):
            raise ValueError(f"cca_layers {cca} must lie in 1..{len(layers)}")
        self.ln_cca = nn.ModuleDict({str(i): nn.LayerNorm(config.n_embd) for i in cca})
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(config) for i in cca})
        self.encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.enc_n_layer)) if cca else None
        self.ln_enc = nn.LayerNorm(config.n_embd) if cca else None
        for block in self.cca.values():
            nn.init.zeros_(block.attn.proj.weight)  # the model starts as exactly the base
        self._step = None  # the current forward's neighbours and encoder cache, read by the hooks
        for i in cca:
            layers[i - 1].register_forward_hook(self._hook(str(i)))

    def _hook(self, name: str):
        def add_cca(module, args, output):
            step = self._step
            if step is None:
                return output
            h = output[0] if isinstance(output, tuple) else output
            start = step.get("start", 0)  # the position of h's first state (decoding: after the cached ones)
            if "encoded" not in step:  # the first CCA layer's states condition the encoder
                if start:
                    raise ValueError("the neighbours' encoding needs the states of their chunks: decode from 0 first")
                l = step["neighbours"].shape[1]
                step["encoded"] = self.encode(
                    F.pad(h, (0, 0, 0, l * self.config.chunk_size - h.shape[1])), step["neighbours"]
                )
            memory = step.setdefault(f"memory {name}", {}) if "start" in step else None  # decoding: kept
            h = h + self.cca[name](self.ln_cca[name](h), *step["encoded"], start=start, memory=memory)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return add_cca

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # frozen: the base never runs dropout
        return self

    def retrieval_parameters(self):
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield p

    def state_dict(self, *args, **kwargs):
        """The trained weights only: the base is referenced by the checkpoint, never copied into it."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("base.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        missing, unexpected = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in missing if not k.startswith("base.")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"RetroFit state: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return missing, unexpected

    def encode(self, h, neighbours):
        """h (b, t, c) states after the first CCA layer; neighbours (b, l, k, r) -> (b, l, k, r, c), token mask."""
        b, l, k, r = neighbours.shape
        m, c = self.config.chunk_size, h.shape[-1]
        real = neighbours != self.config.pad_id
        keys = (real | ~real.any(-1, keepdim=True)).reshape(b * l * k, 1, 1, r)
        # the base's own token embeddings; padding (which may lie past the base's vocabulary) is never a key
        x = self.base.get_input_embeddings()(torch.where(real, neighbours, 0).reshape(b * l * k, r)).to(h.dtype)
        condition = h.reshape(b, l, 1, m, c).expand(b, l, k, m, c).reshape(b * l * k, m, c)
        for block in self.encoder:
            x = block(x, condition, keys)
        return self.ln_enc(x).reshape(b, l, k, r, c), real

    def forward(self, idx, neighbours=None, targets=None, encoder_cache: dict | None = None):
        """As ``Retro.forward``: logits (b, t, vocab), and with targets the mean and per-token losses."""
        b, t = idx.shape
        if t % self.config.chunk_size:
            raise ValueError(f"sequence length {t} is not a multiple of the chunk size {self.config.chunk_size}")
        use = self.encoder is not None and neighbours is not None
        self._step = ({} if encoder_cache is None else encoder_cache) if use else None
        if use:
            self._step["neighbours"] = neighbours
        try:  # padding comes after every real token (it may lie past the base's vocabulary)
            logits = self.base(input_ids=torch.where(idx == self.config.pad_id, 0, idx), use_cache=False).logits
        finally:
            self._step = None
        if targets is None:
            return logits, None, None
        token_loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).view(b, t)
        return logits, token_loss.sum() / (targets != -100).sum().clamp(min=1), token_loss

    @torch.no_grad()
    def decode(self, idx, neighbours, state: dict):
        """Logits (b, t, vocab) of ``idx`` (b, t), the tokens after those of earlier calls with the same
        ``state`` (empty at first): the frozen decoder's KV cache, the encoded neighbours and CCA's projected
        memory are kept there, so each call costs its new tokens only. ``neighbours`` (b, l, k, r) of the
        sequence's chunks, the same in every call; the first call must hold every chunk that has neighbours."""
        start = state.get("start", 0)
        step = state.setdefault("encoder", {}) if self.encoder is not None and neighbours is not None else None
        if step is not None:
            step.update(neighbours=neighbours, start=start)
        self._step = step
        try:
            out = self.base(
                input_ids=torch.where(idx == self.config.pad_id, 0, idx),
                cache=state.get("cache"),
                use_cache=True,
            )
        finally:
            self._step = None
        state["cache"], state["start"] = out.cache, start + idx.shape[1]
        return out.logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
