"""RETRO (Borgeaud et al. 2021) in one file: a decoder-only LM with chunked cross-attention (CCA)
to an encoder over retrieved neighbours, and the baseline (the same decoder, no CCA).

Axes: b batch, t tokens (= l * m), l chunks, m chunk size, k neighbours, r retrieved tokens per
neighbour (r = 2m: the neighbour chunk N and its continuation F), c channels.

- Decoder block: x += attn(ln(x)); [x += cca(ln(x), E)]; x += mlp(ln(x)); CCA in the blocks listed
  in ``cca_layers`` (1-based, the paper's 6, 9, 12 for 12 layers).
- Encoder: 2 bidirectional blocks over each neighbour, each self-attention + cross-attention to
  the decoder states of the chunk that retrieved it (taken at the first CCA layer) + MLP.
- Positions: rotary embeddings (relative) in decoder and encoder self-attention.
- Neighbours: [N, F] windows aligned to the retrieving chunk when ``align_neighbours`` (see RetroConfig);
  with ``min_query_overlap``, only those sharing a run of that chunk's tokens (``neighbours_sharing_text``).
- CCA causality: the attending chunk u is the last token of chunk u plus the first m-1 tokens of
  chunk u+1; it attends to the encoded neighbours of chunk u, softmax over k and r together.
  Tokens 0..m-2 attend to nothing. A chunk with no neighbours (id -1 everywhere) contributes
  exactly zero, so retrieval off is the decoder alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RetroConfig:
    vocab_size: int = 8192
    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 896
    enc_n_layer: int = 2
    chunk_size: int = 64  # m
    max_chunks: int = 32  # l: sequences of n = l * m tokens
    cca_layers: list = field(default_factory=lambda: [6, 9, 12])
    retrieval: bool = True  # False: the baseline, same decoder without encoder or CCA
    dropout: float = 0.0
    pad_id: int = 1
    # each neighbour's [N, F] window moved along its document to line up with the chunk that retrieved it
    # (``TokenStore.alignment_shifts``), in training and at inference: CCA copies by relative position,
    # and an edit between two versions of a text shifts every later chunk against its copy
    align_neighbours: bool = True
    # RETRO-fitting (``model.retrofit``): a frozen pretrained decoder's model directory and the sha256 of its
    # weights; the decoder fields above are then the base's. Empty: RETRO trained from scratch (this file)
    base: str = ""
    base_sha256: str = ""
    # how a RETRO-fit reads its neighbours: "cca", the paper's encoder and CCA blocks; "attention", the
    # base's own attention over the base's reading of them, gated per head (``model.retrofit``)
    reader: str = "cca"
    # a neighbour row is read only if it shares a run of more than this share of the tokens of the chunk that
    # retrieved it (``neighbours_sharing_text``); 0: every retrieved row is read
    min_query_overlap: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def rows_sharing_runs(chunks: torch.Tensor, rows: torch.Tensor, pad: int, share: float) -> torch.Tensor:
    """Whether each row of ``rows`` (..., k, r) shares a run of more than ``share`` of the real tokens of its
    chunk in ``chunks`` (..., m), padding matching nothing. (..., k) bool"""
    # padding matches nothing: -1 in the chunks, -2 in the rows
    chunks = torch.where(chunks == pad, -1, chunks)[..., None, :]  # (..., 1, m)
    rows = torch.where(rows == pad, -2, rows)
    run = rows.new_zeros(*rows.shape[:-1], rows.shape[-1] + 1, dtype=torch.int32)  # runs ending at each row token
    longest = rows.new_zeros(rows.shape[:-1], dtype=torch.int32)
    for i in range(chunks.shape[-1]):  # dynamic programming over the chunk's tokens, every row at once
        run = F.pad((run[..., :-1] + 1) * (rows == chunks[..., i : i + 1]), (1, 0))
        longest = torch.maximum(longest, run.amax(-1))
    return longest > share * (chunks != -1).sum(-1)


def neighbours_sharing_text(idx: torch.Tensor, neighbours: torch.Tensor, config: RetroConfig) -> torch.Tensor:
    """``neighbours`` (b, l, k, r) with padding in every row whose longest run of tokens shared with the chunk
    that retrieved it (idx (b, l*m)) is ``config.min_query_overlap`` of that chunk's tokens or less: a
    neighbour that holds none of its chunk's text is read by no model (retrieval could find nothing
    there to copy, and a model that reads it anyway is worse than with no neighbour, docs/BENCHMARKS.md)."""
    if config.min_query_overlap <= 0:
        return neighbours
    b, l = neighbours.shape[:2]
    m, pad = config.chunk_size, config.pad_id
    chunks = F.pad(idx, (0, l * m - idx.shape[1]), value=pad).reshape(b, l, m)  # decoding: the last is partial
    keep = rows_sharing_runs(chunks, neighbours, pad, config.min_query_overlap)
    return torch.where(keep[..., None], neighbours, pad)


def tiny_config(**overrides) -> RetroConfig:
    """Trains on 2 CPU cores in minutes."""
    return RetroConfig(
        **{**dict(n_layer=6, n_head=4, n_embd=128, enc_n_layer=2, max_chunks=4, cca_layers=[3, 6]), **overrides}
    )


def paper_172m_config(**overrides) -> RetroConfig:
    """The paper's 172M RETRO (Table 2 of the paper): 12 layers, d=896, 16 heads, CCA at 6, 9, 12."""
    return RetroConfig(
        **{**dict(vocab_size=128_000, n_layer=12, n_head=16, n_embd=896, enc_n_layer=2, max_chunks=32), **overrides}
    )


def rotary(x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary position embedding over the time axis of (b, h, t, d_head), at ``positions`` (t,), default 0..t-1."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    pos = (
        torch.arange(t, device=x.device, dtype=torch.float32)
        if positions is None
        else positions.to(x.device, torch.float32)
    )
    angles = pos[:, None] * inv[None, :]  # (t, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(self, config: RetroConfig, *, causal: bool, use_rotary: bool):
        super().__init__()
        self.n_head, self.causal, self.use_rotary = config.n_head, causal, use_rotary
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def keys_values(self, context, positions=None):
        """Keys (rotated at ``positions``, default 0..s-1) and values of ``context`` (b, s, c): (b, h, s, dh) each."""
        b, s, _ = context.shape
        k, v = self.kv(context).view(b, s, 2, self.n_head, -1).permute(2, 0, 3, 1, 4)
        return (rotary(k, positions) if self.use_rotary else k), v

    def forward(self, x, context=None, mask=None, positions=None, kv=None):
        """``positions``: (query positions (t,), key positions (s,)) for rotary; default 0..t-1 and 0..s-1.
        ``kv``: the context's ``keys_values``, computed once by a caller that attends to it again."""
        b, t, c = x.shape
        q_pos, k_pos = positions or (None, None)
        k, v = kv if kv is not None else self.keys_values(x if context is None else context, k_pos)
        q = self.q(x).view(b, t, self.n_head, -1).transpose(1, 2)  # (b, h, t, dh)
        if self.use_rotary:
            q = rotary(q, q_pos)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: RetroConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class ChunkedCrossAttention(nn.Module):
    """CCA: tokens attend to the encoded neighbours of the preceding chunk boundary.

    Relative positions (rotary), as in the paper: a neighbour [N, F] of chunk u lies in the
    coordinates of chunk u (N at 0..m-1, its continuation F at m..2m-1), and the attending token at
    position u*m + m-1 + i sits at m-1+i there, so the token it predicts is one step ahead in F.
    """

    def __init__(self, config: RetroConfig):
        super().__init__()
        self.m = config.chunk_size
        self.attn = Attention(config, causal=False, use_rotary=True)

    def forward(self, h, encoded, token_mask, start: int = 0, memory: dict | None = None):
        """h (b, t, c) the states of positions start..start+t-1; encoded (b, l, k, r, c); token_mask (b, l, k, r)
        True at real neighbour tokens ((b, l, k) is taken as whole neighbours present or absent). ``memory``:
        where the projected neighbours are kept for the next call on the same sequence (decoding with a
        KV cache gives one position at a time)."""
        b, t, c = h.shape
        m = self.m
        l, k, r = encoded.shape[1:4]
        if token_mask.dim() == 3:
            token_mask = token_mask[..., None].expand(-1, -1, -1, r)
        # position p attends to chunk (p - m + 1) // m from slot (p - m + 1) % m: chunk u's neighbours
        # condition positions u*m + m-1 ... u*m + 2m-2; positions before m-1 attend to nothing
        first = max(start, m - 1)
        out = torch.zeros_like(h)
        if first >= start + t:
            return out
        u0, u1 = (first - m + 1) // m, (start + t - m) // m + 1  # the chunks attended to
        if u1 > l:
            raise ValueError(
                f"positions up to {start + t - 1} attend to chunk {u1 - 1}, but neighbours of {l} are given"
            )
        g0, n = first - m + 1 - u0 * m, start + t - first
        queries = F.pad(h[:, first - start :], (0, 0, g0, (u1 - u0) * m - g0 - n)).reshape(b * (u1 - u0), m, c)
        keep = token_mask[:, u0:u1].reshape(b * (u1 - u0), 1, 1, k * r)
        any_neighbour = keep.any(-1, keepdim=True)  # (b*chunks, 1, 1, 1)
        # a chunk without neighbours attends to a dummy position and its output is zeroed below
        mask = keep | ~any_neighbour
        present = any_neighbour.reshape(-1, 1, 1).to(h.dtype)
        positions = (torch.arange(m - 1, 2 * m - 1), torch.arange(r).repeat(k))  # (m,), (k*r,)
        if memory is None:  # softmax over neighbours and time together
            context = encoded[:, u0:u1].reshape(b * (u1 - u0), k * r, c)
            attended = self.attn(queries, context, mask=mask, positions=positions) * present
        else:
            if "kv" not in memory:  # every chunk's, once: (b*l, h, k*r, dh) each
                memory["kv"] = self.attn.keys_values(encoded.reshape(b * l, k * r, c), positions[1])
            kv = tuple(x.view(b, l, *x.shape[1:])[:, u0:u1].reshape(-1, *x.shape[1:]) for x in memory["kv"])
            attended = self.attn(queries, mask=mask, positions=(positions[0], None), kv=kv) * present
        out[:, first - start :] = attended.reshape(b, (u1 - u0) * m, c)[:, g0 : g0 + n]
        return out


class DecoderBlock(nn.Module):
    def __init__(self, config: RetroConfig, has_cca: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config, causal=True, use_rotary=True)
        self.ln_cca = nn.LayerNorm(config.n_embd) if has_cca else None
        self.cca = ChunkedCrossAttention(config) if has_cca else None
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, encode=None):
        """``encode(h) -> (encoded, mask)`` runs the encoder on this block's states when needed."""
        x = x + self.attn(self.ln_1(x))
        if self.cca is not None and encode is not None:
            encoded, mask = encode(x)
            x = x + self.cca(self.ln_cca(x), encoded, mask)
        return x + self.mlp(self.ln_2(x))


class EncoderBlock(nn.Module):
    def __init__(self, config: RetroConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config, causal=False, use_rotary=True)
        self.ln_x = nn.LayerNorm(config.n_embd)
        self.cross = Attention(config, causal=False, use_rotary=False)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, condition, mask=None):
        """x (b*l*k, r, c) neighbour tokens; condition (b*l*k, m, c) the retrieving chunk's states;
        mask (b*l*k, 1, 1, r) True at the keys a neighbour token may attend to (not padding)."""
        x = x + self.attn(self.ln_1(x), mask=mask)
        x = x + self.cross(self.ln_x(x), condition)
        return x + self.mlp(self.ln_2(x))


class Retro(nn.Module):
    def __init__(self, config: RetroConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        cca = set(config.cca_layers) if config.retrieval else set()
        if cca and (min(cca) < 1 or max(cca) > config.n_layer):
            raise ValueError(f"cca_layers {sorted(cca)} must lie in 1..{config.n_layer}")
        self.blocks = nn.ModuleList(DecoderBlock(config, i + 1 in cca) for i in range(config.n_layer))
        self.encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.enc_n_layer)) if cca else None
        self.ln_enc = nn.LayerNorm(config.n_embd) if cca else None
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def retrieval_parameters(self):
        """Encoder and CCA parameters: what RETRO-fitting trains on a frozen baseline."""
        for name, p in self.named_parameters():
            if name.startswith(("encoder.", "ln_enc.")) or ".cca." in name or ".ln_cca." in name:
                yield p

    def encode(self, h, neighbours):
        """h (b, t, c) decoder states; neighbours (b, l, k, r) token ids -> (b, l, k, r, c), token mask (b, l, k, r)."""
        b, l, k, r = neighbours.shape
        m, c = self.config.chunk_size, h.shape[-1]
        real = neighbours != self.config.pad_id  # (b, l, k, r): -1 ids arrive as all padding
        # padding is never a key; an all-padding neighbour attends freely (CCA ignores its outputs)
        keys = (real | ~real.any(-1, keepdim=True)).reshape(b * l * k, 1, 1, r)
        x = self.wte(neighbours.reshape(b * l * k, r))  # (b*l*k, r, c)
        condition = h.reshape(b, l, 1, m, c).expand(b, l, k, m, c).reshape(b * l * k, m, c)
        for block in self.encoder:
            x = block(x, condition, keys)
        return self.ln_enc(x).reshape(b, l, k, r, c), real

    def forward(self, idx, neighbours=None, targets=None, encoder_cache: dict | None = None):
        """idx (b, t) with t = l*m; neighbours (b, l, k, r) or None (retrieval off); targets (b, t), -100 ignored.

        Returns logits (b, t, vocab) and, with targets, the mean loss and per-token losses (b, t).
        ``encoder_cache``: a dict kept across calls that share the neighbours and the completed chunks
        (generation inside one chunk): the encoder then runs once. Its input, the states of completed
        chunks below the first CCA layer, cannot change as tokens are appended (causal attention), and
        the chunk being written has no neighbours yet, so its encoding is masked out by CCA.
        """
        b, t = idx.shape
        m = self.config.chunk_size
        if t % m:
            raise ValueError(f"sequence length {t} is not a multiple of the chunk size {m}")
        if neighbours is not None:
            neighbours = neighbours_sharing_text(idx, neighbours, self.config)
        x = self.drop(self.wte(idx))  # (b, t, c)
        cache = {} if encoder_cache is None else encoder_cache

        def encode(h):  # the encoder runs once, on the states of the first CCA layer
            if "out" not in cache:
                cache["out"] = self.encode(h, neighbours)
            return cache["out"]

        use = encode if (self.encoder is not None and neighbours is not None) else None
        for block in self.blocks:
            x = block(x, use)
        logits = self.lm_head(self.ln_f(x))  # (b, t, vocab)
        if targets is None:
            return logits, None, None
        token_loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).view(b, t)
        n = (targets != -100).sum().clamp(min=1)
        return logits, token_loss.sum() / n, token_loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
