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

``reader="attention"`` reads the neighbours with the base's own weights instead (no encoder, no CCA
block): the frozen base runs over each neighbour [N, F] alone, placed just before the sequence (rotary
positions -r..-1), as In-Context RALM places a passage, and in every layer of ``cca_layers`` a position
that chunk u's neighbours condition (RETRO's chunked causality) attends to those neighbours' keys and
values (all but each neighbour's first, the attention sink of its own read) and to its own context in
one softmax. What is trained is a gate per layer and head, from 0 (exactly the base) towards that joint
attention. The base's attention already copies from text it reads; a 135M-parameter base RETRO-fitted
on a CPU's few hundred thousand tokens does not learn that from new CCA weights (docs/BENCHMARKS.md).
It reads only the neighbours that share a run of more than a tenth of the chunk that retrieved them
(``min_query_overlap``, in training and at inference): attention copies, and a neighbour that holds none
of its chunk's text has nothing to copy but still draws attention from the context.

The CCA blocks hook the base's own decoder layers (``register_forward_hook``), so any Hugging Face
causal LM whose layers return their hidden states works: the Llama family (Llama, Qwen2, Mistral,
SmolLM) and GPT-2 are tested. The trained weights are saved apart from the base, which is referenced
by path and sha256 (``model.checkpoint``), as PEFT saves adapters.

The interface is ``model.model.Retro``'s (``config``, ``forward(idx, neighbours, targets,
encoder_cache)``, ``retrieval_parameters``), so training, evaluation, generation, explanation and
the service take either. ``decode`` adds what a 135M-parameter base needs to generate: the base's KV
cache, the encoded neighbours and CCA's projected neighbours (or the neighbours' keys and values)
kept between calls.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from model.model import ChunkedCrossAttention, EncoderBlock, RetroConfig, neighbours_sharing_text

READERS = ("cca", "attention")
ATTENTION = "retrofit_sdpa"  # the base's attention implementation under reader="attention"
# (the RetroFit and its read neighbours) while one of its forwards runs; None: the base's own attention
_READING: ContextVar[tuple | None] = ContextVar("retrofit_reading", default=None)


def _attention(module, query, key, value, attention_mask, **kwargs):
    """The base's sdpa attention, then, inside a RetroFit's forward, the neighbours mixed in (``RetroFit.mix``)."""
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    reading = _READING.get()
    if reading is not None:
        model, read = reading
        out = model.mix(module, read, query, key, value, out, kwargs.get("scaling"))
    return out, weights


AttentionInterface.register(ATTENTION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


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
    reader: str = "cca",
    min_query_overlap: float | None = None,
    **overrides,
) -> RetroConfig:
    """A ``RetroConfig`` whose widths are those of the base ``lm``. CCA every third layer from the middle up by default:
    the paper's choice for 12 layers (6, 9, 12) scaled to the base's depth (15, 18, ..., 30 of 30), so the
    encoder is conditioned on mid-depth states and the upper half of the decoder reads the neighbours.
    ``reader="attention"``: every layer reads them by default (a gate per head chooses), and only neighbours
    that share a run of more than a tenth of the chunk that retrieved them (``min_query_overlap``, measured in
    docs/BENCHMARKS.md; the CCA reader reads every neighbour by default)."""
    c = lm.config
    n_layer = c.num_hidden_layers
    if reader not in READERS:
        raise ValueError(f"reader {reader!r}: one of {READERS}")
    if cca_layers is None:
        cca_layers = list(range(1, n_layer + 1)) if reader == "attention" else list(range(n_layer // 2, n_layer + 1, 3))
    fields = dict(
        vocab_size=c.vocab_size,
        n_layer=n_layer,
        n_head=c.num_attention_heads,
        n_embd=c.hidden_size,
        enc_n_layer=enc_n_layer,
        chunk_size=chunk_size,
        max_chunks=max_chunks,
        pad_id=pad_id,
        cca_layers=cca_layers,
        reader=reader,
        min_query_overlap=(0.1 if reader == "attention" else 0.0) if min_query_overlap is None else min_query_overlap,
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
        self.gates = None
        if config.reader == "attention" and cca:
            self.gates = nn.Parameter(torch.zeros(len(cca), config.n_head))  # 0: exactly the base
            self._gate_row = {i - 1: row for row, i in enumerate(cca)}  # the base's layer_idx -> gates row
            self._rotary = hasattr(base.base_model, "rotary_emb")  # else absolute positions (GPT-2)
            base.set_attn_implementation(ATTENTION)
            cca = []  # no encoder, no CCA blocks
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

    @torch.no_grad()
    def read(self, neighbours) -> dict:
        """The frozen base's keys and values of each neighbour (b, l, k, r), read alone at positions -r..-1
        (0..r-1 for absolute positions), in the layers that read neighbours: {layer_idx: (b, kv heads,
        l*k*r, head dim) each}, and which of those keys are attended (b, l*k*r): real tokens, each neighbour's
        first (its attention sink) excepted."""
        b, l, k, r = neighbours.shape
        real = neighbours != self.config.pad_id
        # only the rows that hold a neighbour are read (in generation, chunks not yet complete hold none)
        rows = real.reshape(b * l * k, r).any(-1)
        rows[0] |= not rows.any()  # the base needs one row to say what its keys look like
        ids = torch.where(real, neighbours, 0).reshape(b * l * k, r)[rows]
        positions = torch.arange(r, device=ids.device) - (r if self._rotary else 0)
        outer = _READING.set(None)  # the neighbours are read by the base alone
        try:
            cache = self.base(input_ids=ids, position_ids=positions.expand(len(ids), r), use_cache=True).cache
        finally:
            _READING.reset(outer)

        def per_sequence(x):  # (rows read, heads, r, d) -> (b, heads, l*k*r, d), zeros where nothing was read
            full = x.new_zeros(b * l * k, *x.shape[1:])
            full[rows] = x
            return full.view(b, l, k, *x.shape[1:]).permute(0, 3, 1, 2, 4, 5).reshape(b, x.shape[1], l * k * r, -1)

        layers = enumerate(cache.layers)
        kv = {i: (per_sequence(c.keys), per_sequence(c.values)) for i, c in layers if i in self._gate_row}
        # a causal LM's first position is where its heads put the attention nothing else draws (an attention
        # sink); the context has its own, and each neighbour's beside it would draw attention from the context
        attended = real.clone()
        attended[..., 0] = False
        return {"kv": kv, "attended": attended.reshape(b, l * k * r), "chunks": l}

    def mix(self, module, read: dict, query, key, value, out, scaling):
        """The attention output ``out`` (b, t, h, d) of the base's layer ``module`` moved, by the layer's gates, towards
        attention over the neighbours' and the context's keys together. query (b, h, t, d) of the last t of the
        s positions whose keys and values are ``key``, ``value`` (b, kv heads, s, d)."""
        row = self._gate_row.get(module.layer_idx)
        if row is None:
            return out
        k_n, v_n = read["kv"][module.layer_idx]
        (b, h, t, _), s, m = query.shape, key.shape[2], self.config.chunk_size
        positions = torch.arange(s - t, s, device=query.device)
        # position p reads chunk (p - m + 1) // m (RETRO's CCA): the neighbours of a chunk it has seen whole
        chunk = torch.div(positions - m + 1, m, rounding_mode="floor")
        # only the keys of the chunks these positions read (decoding: one chunk's k*r, not l*k*r)
        per_chunk = k_n.shape[2] // read["chunks"]
        first, last = max(int(chunk[0]), 0), min(max(int(chunk[-1]), 0), read["chunks"] - 1)
        keys = slice(first * per_chunk, (last + 1) * per_chunk)
        key_chunk = torch.arange(first, last + 1, device=query.device).repeat_interleave(per_chunk)
        neighbour_keys = (chunk[:, None] == key_chunk[None, :])[None] & read["attended"][:, None, keys]  # (b, t, n)
        context_keys = (torch.arange(s, device=query.device)[None, :] <= positions[:, None]).expand(b, t, s)
        mask = torch.cat([neighbour_keys, context_keys], -1)[:, None]  # (b, 1, t, n + s)
        joint = F.scaled_dot_product_attention(
            query,
            torch.cat([k_n[:, :, keys].to(key.dtype), key], 2),
            torch.cat([v_n[:, :, keys].to(value.dtype), value], 2),
            attn_mask=mask,
            scale=scaling,
            enable_gqa=h != k_n.shape[1],
        ).transpose(1, 2)  # (b, t, h, d)
        gate = neighbour_keys.any(-1)[:, :, None, None] * self.gates[row].to(out.dtype)[:, None]  # (b, t, h, 1)
        return out + gate * (joint - out)

    @contextmanager
    def _reading(self, neighbours, kept: dict):
        """While the base runs inside: the attention reader's neighbours, read once and kept in ``kept``."""
        if self.gates is None or neighbours is None:
            yield
            return
        if "read" not in kept:
            kept["read"] = self.read(neighbours)
        token = _READING.set((self, kept["read"]))
        try:
            yield
        finally:
            _READING.reset(token)

    def forward(self, idx, neighbours=None, targets=None, encoder_cache: dict | None = None):
        """As ``Retro.forward``: logits (b, t, vocab), and with targets the mean and per-token losses."""
        b, t = idx.shape
        if t % self.config.chunk_size:
            raise ValueError(f"sequence length {t} is not a multiple of the chunk size {self.config.chunk_size}")
        if neighbours is not None:
            neighbours = neighbours_sharing_text(idx, neighbours, self.config)
        use = self.encoder is not None and neighbours is not None
        self._step = ({} if encoder_cache is None else encoder_cache) if use else None
        if use:
            self._step["neighbours"] = neighbours
        try:  # padding comes after every real token (it may lie past the base's vocabulary)
            with self._reading(neighbours, {} if encoder_cache is None else encoder_cache):
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
        if neighbours is not None:
            if "neighbours" not in state:  # the first call holds every chunk that has neighbours
                state["neighbours"] = neighbours_sharing_text(idx, neighbours, self.config)
            neighbours = state["neighbours"]
        step = state.setdefault("encoder", {}) if self.encoder is not None and neighbours is not None else None
        if step is not None:
            step.update(neighbours=neighbours, start=start)
        self._step = step
        try:
            with self._reading(neighbours, state):
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
