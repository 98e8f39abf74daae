"""The conditional-attention decoder shared by Conditional-DETR and DAB-DETR (and DN-DETR), and its transformer.

specs/dn_dab_dino.md §1.2 (DAB-DETR decoder layer, anchors) and §2 (Conditional-DETR). Every decoder layer
runs self-attention over content + positional queries, then *conditional* cross-attention: per head, the
query is [content; spatial] and the key [content; image position], so the logit is a content term plus a
spatial term. The two models differ in the positional part only:

* Conditional-DETR (``query_dim=2``): a learned positional query per slot; a 2-d reference point
  σ(MLP(query_pos)) fixed for all layers; spatial query = sine(point) scaled by MLP(content) after layer 0.
* DAB-DETR (``query_dim=4``): a 4-d anchor per slot; positional query = MLP(sine(anchor)) in every layer;
  spatial query = sine(x, y) scaled by MLP(content), then width/height-modulated; anchors refined layer
  by layer (the next layer gets them detached, the predictions keep the gradient, spec §1.2 step 9).

Sequence-first tensors ([T, B, C]) as in the official code; parameter names are the official ones.
Written from the spec and the papers; no code of the official repositories is reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import host_tensor_to, inverse_sigmoid

from .layers import MLP, sine_embed_boxes
from .query_groups import EncoderOutput, QueryGroup, QueryProvider, build_group_attn_mask, collect_groups
from .transformer import TransformerEncoder, TransformerEncoderLayer, activation_fn, clones

ANCHOR_EPS = 1e-3  # DAB/DN-DETR's clamp of the inverse sigmoid (Conditional-DETR's is 1e-5)


class ConditionalAttention(nn.Module):
    """Multi-head attention over already projected queries, keys and values (no input projections).

    The head size is ``embed_dim // num_heads`` (Conditional cross-attention: 2 * d_model wide queries and
    keys, d_model wide values), logits scaled by head_size ** -0.5; ``out_proj`` maps the values' width to
    itself (bias initialised to 0). ``shift_by_max``: the logits' row maximum is subtracted before the softmax
    (DAB-DETR's copy does; the same forward, but the backward's float noise follows it).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, vdim: int | None = None,
                 shift_by_max: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.shift_by_max = shift_by_max
        self.vdim = vdim or embed_dim
        self.out_proj = nn.Linear(self.vdim, self.vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """query [T, B, E], key [S, B, E], value [S, B, V]; attn_mask [T, S] bool, key_padding_mask [B, S]
        bool (True = blocked). Returns [T, B, V]."""
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        heads = self.num_heads
        head_dim, v_head = self.embed_dim // heads, self.vdim // heads
        q = (query * float(head_dim) ** -0.5).contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = key.contiguous().view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = value.contiguous().view(src_len, bsz * heads, v_head).transpose(0, 1)
        logits = torch.bmm(q, k.transpose(1, 2))  # [B*H, T, S]
        if attn_mask is not None:
            logits = logits.masked_fill(attn_mask.unsqueeze(0), float("-inf"))
        if key_padding_mask is not None:
            logits = logits.view(bsz, heads, tgt_len, src_len)
            logits = logits.masked_fill(key_padding_mask[:, None, None], float("-inf"))
            logits = logits.view(bsz * heads, tgt_len, src_len)
        if self.shift_by_max:
            logits = logits - logits.max(dim=-1, keepdim=True)[0]
        weights = F.dropout(F.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len, bsz, self.vdim)
        return self.out_proj(out)


class ConditionalDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, conditional cross-attention, FFN (official names).

    Args:
        d_model, nhead, dim_feedforward, dropout: as DETR.
        activation: FFN activation (``prelu``: a learnable PReLU per layer, DAB-DETR's default).
        shift_by_max: see ConditionalAttention (DAB-DETR: True).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", shift_by_max: bool = False) -> None:
        super().__init__()
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ConditionalAttention(d_model, nhead, dropout, vdim=d_model, shift_by_max=shift_by_max)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj: nn.Linear | None = nn.Linear(d_model, d_model)  # layer 0 only (removed by the decoder)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ConditionalAttention(d_model * 2, nhead, dropout, vdim=d_model, shift_by_max=shift_by_max)
        self.nhead = nhead

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, query_sine_embed: Tensor,
                is_first: bool, tgt_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos, query_sine_embed: [T, B, C]; memory, pos: [S, B, C]; returns [T, B, C].

        ``query_sine_embed`` is the (scaled, modulated) sine embedding of the reference (the spatial query
        before ``ca_qpos_sine_proj``); ``is_first``: layer 0 also adds the positional query / key position
        to the content query / key.
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=tgt_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        num_queries, bs, d_model = tgt.shape
        hw, head_dim = memory.shape[0], d_model // self.nhead
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        v = self.ca_v_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if is_first:
            if self.ca_qpos_proj is None:
                raise RuntimeError("the first decoder layer needs ca_qpos_proj")
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        sine = self.ca_qpos_sine_proj(query_sine_embed).view(num_queries, bs, self.nhead, head_dim)
        q = torch.cat([q.view(num_queries, bs, self.nhead, head_dim), sine], 3).view(num_queries, bs, 2 * d_model)
        k = torch.cat([k.view(hw, bs, self.nhead, head_dim), k_pos.view(hw, bs, self.nhead, head_dim)], 3)
        tgt2 = self.cross_attn(q, k.view(hw, bs, 2 * d_model), v, key_padding_mask=memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


@dataclass
class DecoderOutput:
    """hs: [L, B, T, C] every layer's output through the decoder norm; references: [L, B, T, 2|4] the
    sigmoid-space reference each layer's box is predicted relative to (Conditional: the fixed points;
    DAB: the initial anchors, then each layer's undetached refinement)."""

    hs: Tensor
    references: Tensor


class ConditionalDecoder(nn.Module):
    """The decoder stack (Conditional-DETR with ``query_dim=2``, DAB-DETR with ``query_dim=4``).

    Args:
        decoder_layer: a ConditionalDecoderLayer, cloned ``num_layers`` times; layers >= 1 lose ``ca_qpos_proj``.
        num_layers: L.
        d_model: C.
        query_dim: 2 (reference points from the positional queries) or 4 (anchor boxes).
        modulate_hw_attn: DAB: the spatial query's x / y halves are scaled by the predicted reference
            width / height over the anchor's.

    ``bbox_embed`` (DAB: the detector's box head, one shared by every layer) refines the anchors; it is set
    by the detector (official name ``transformer.decoder.bbox_embed``).
    """

    def __init__(self, decoder_layer: ConditionalDecoderLayer, num_layers: int, d_model: int, query_dim: int = 2,
                 modulate_hw_attn: bool = False) -> None:
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        for layer in self.layers[1:]:
            layer.ca_qpos_proj = None
        self.num_layers, self.d_model, self.query_dim = num_layers, d_model, query_dim
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        if query_dim == 2:
            self.ref_point_head = MLP(d_model, d_model, 2, 2)
        else:
            self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None
        self.bbox_embed: nn.Module | None = None

    def reference_points(self, query_pos: Tensor) -> Tensor:
        """Conditional-DETR: the 2-d reference points σ(MLP(query_pos)) of positional queries [..., C]."""
        return self.ref_point_head(query_pos).sigmoid()

    def spatial_embed(self, reference: Tensor) -> Tensor:
        """Sine embedding [..., C] of the reference's (x, y), ordered (y, x) (spec §0.3)."""
        if reference.shape[-1] == 2:
            reference = torch.cat([reference, reference], -1)
        return sine_embed_boxes(reference, self.d_model)[..., : self.d_model]

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, reference: Tensor, query_pos: Tensor | None = None,
                tgt_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None) -> DecoderOutput:
        """tgt: [T, B, C] content; memory, pos: [S, B, C]; reference: [T, B, 2] points (with ``query_pos``
        [T, B, C]) or [T, B, 4] anchors in sigmoid space (query_pos None: derived per layer)."""
        if self.query_dim == 4:
            return self._forward_anchors(tgt, memory, pos, reference, tgt_mask, memory_key_padding_mask)
        if query_pos is None:
            raise ValueError("the point decoder needs the positional queries")
        output, hs = tgt, []
        sine = self.spatial_embed(reference)
        for lid, layer in enumerate(self.layers):
            scale = 1 if lid == 0 else self.query_scale(output)
            output = layer(output, memory, pos, query_pos, sine * scale, lid == 0, tgt_mask, memory_key_padding_mask)
            hs.append(self.norm(output))
        references = reference.transpose(0, 1).unsqueeze(0).expand(len(hs), -1, -1, -1)
        return DecoderOutput(torch.stack(hs).transpose(1, 2), references)

    def _forward_anchors(self, tgt: Tensor, memory: Tensor, pos: Tensor, reference: Tensor, tgt_mask: Tensor | None,
                         memory_key_padding_mask: Tensor | None) -> DecoderOutput:
        if self.bbox_embed is None:
            raise RuntimeError("the detector must attach bbox_embed to the anchor decoder")
        output, hs, refs = tgt, [], [reference]
        d = self.d_model
        for lid, layer in enumerate(self.layers):
            full_sine = sine_embed_boxes(reference, d)  # [T, B, 2C]: (y, x, w, h)
            query_pos = self.ref_point_head(full_sine)
            scale = 1 if lid == 0 else self.query_scale(output)
            sine = full_sine[..., :d] * scale
            if self.ref_anchor_head is not None:  # width/height-modulated attention
                ref_hw = self.ref_anchor_head(output).sigmoid()
                sine = torch.cat([sine[..., : d // 2] * (ref_hw[..., 1] / reference[..., 3]).unsqueeze(-1),
                                  sine[..., d // 2:] * (ref_hw[..., 0] / reference[..., 2]).unsqueeze(-1)], -1)
            output = layer(output, memory, pos, query_pos, sine, lid == 0, tgt_mask, memory_key_padding_mask)
            new_reference = (self.bbox_embed(output) + inverse_sigmoid(reference, ANCHOR_EPS)).sigmoid()
            if lid < self.num_layers - 1:
                refs.append(new_reference)  # undetached: the next layer's prediction back-propagates into it
            reference = new_reference.detach()
            hs.append(self.norm(output))
        return DecoderOutput(torch.stack(hs).transpose(1, 2), torch.stack(refs).transpose(1, 2))



@dataclass
class ConditionalTransformerOutput:
    """decoder: per-layer results over the main queries followed by the groups; groups: in decoder order;
    num_queries: the main queries; encoder: the memory as the add-ons see it (batch-first)."""

    decoder: DecoderOutput
    groups: list[QueryGroup]
    num_queries: int
    encoder: EncoderOutput


class ConditionalTransformer(nn.Module):
    """Single-scale encoder (models/transformer.py) + conditional decoder, with add-on query groups.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation: as DETR
            (the activation is used by the encoder and decoder FFNs, as in DAB-DETR).
        query_dim: 2 (Conditional-DETR) or 4 (DAB-DETR anchors; its attention shifts the logits by their maximum).
        modulate_hw_attn: DAB-DETR's width/height-modulated cross-attention.
        encoder_pos_scale: DAB-DETR: every encoder layer scales the image positions by MLP(its input).
        num_patterns: DAB-DETR's pattern embeddings ``patterns`` [P, C] (created after the Xavier reset, so
            N(0, 1) as in the original); 0: none.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu", query_dim: int = 2,
                 modulate_hw_attn: bool = False, encoder_pos_scale: bool = False, num_patterns: int = 0) -> None:
        super().__init__()
        enc_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
        self.encoder = TransformerEncoder(enc_layer, num_encoder_layers,
                                          query_scale=MLP(d_model, d_model, d_model, 2) if encoder_pos_scale else None)
        dec_layer = ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                            shift_by_max=query_dim == 4)
        self.decoder = ConditionalDecoder(dec_layer, num_decoder_layers, d_model, query_dim, modulate_hw_attn)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model, self.nhead, self.query_dim = d_model, nhead, query_dim
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None

    def check_group(self, group: QueryGroup) -> None:
        """A group must carry what the main queries carry (points + positional queries, or anchors only)."""
        if group.reference.shape[-1] != self.query_dim:
            raise ValueError(f"query group {group.name!r}: this host takes {self.query_dim}-d references, "
                             f"got {group.reference.shape[-1]}-d")
        if (group.query_pos is None) != (self.query_dim == 4):
            need = "no query_pos (derived from the anchors)" if self.query_dim == 4 else "its positional queries"
            raise ValueError(f"query group {group.name!r}: this host needs {need}")

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor, tgt: Tensor, reference: Tensor,
                query_pos: Tensor | None = None,
                providers: Sequence[QueryProvider] = ()) -> ConditionalTransformerOutput:
        """Encode one feature map and decode the main queries and the providers' groups.

        Args:
            src, pos: [B, C, H, W] projected features and image positions; mask: [B, H, W] (True = padding).
            tgt: [B, N, C] content of the main queries.
            reference: [B, N, 2] reference points or [B, N, 4] anchors, sigmoid space.
            query_pos: [B, N, C] positional queries (Conditional-DETR) or None (DAB-DETR).
            providers: callables returning extra QueryGroups (run behind the block mask).
        """
        bs, _, h, w = src.shape
        src, pos, mask = src.flatten(2).permute(2, 0, 1), pos.flatten(2).permute(2, 0, 1), mask.flatten(1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos)
        valid = ~mask.view(bs, h, w)
        ratios = torch.stack([valid[:, 0].sum(1) / w, valid[:, :, 0].sum(1) / h], -1).float()[:, None]
        shapes = host_tensor_to([[h, w]], torch.long, src.device)
        num_queries = tgt.shape[1]
        enc = EncoderOutput(memory.transpose(0, 1), mask, shapes, ratios, num_queries)
        groups = collect_groups(providers, enc) if providers else []
        for g in groups:
            self.check_group(g)
        attn_mask = build_group_attn_mask(num_queries, groups, memory.device)
        order = None
        if groups:
            tgt = torch.cat([tgt] + [g.tgt for g in groups], 1)
            reference = torch.cat([reference] + [g.reference for g in groups], 1)
            if query_pos is not None:
                query_pos = torch.cat([query_pos] + [g.query_pos for g in groups], 1)
            order = denoising_first(num_queries, groups, memory.device)
        if order is not None:  # the same attention, summed in the originals' order
            tgt, reference, attn_mask = tgt[:, order], reference[:, order], attn_mask[order][:, order]
            query_pos = None if query_pos is None else query_pos[:, order]
        dec = self.decoder(tgt.transpose(0, 1), memory, pos, reference.transpose(0, 1),
                           None if query_pos is None else query_pos.transpose(0, 1), attn_mask, mask)
        if order is not None:
            back = torch.argsort(order)
            dec = DecoderOutput(dec.hs[:, :, back], dec.references[:, :, back])
        return ConditionalTransformerOutput(dec, groups, num_queries, enc)


def denoising_first(num_queries: int, groups: Sequence[QueryGroup], device: torch.device) -> Tensor | None:
    """Decoder order of [main, groups...]: the groups that see the main queries (denoising) first, as DN-DETR
    lays them out; None when there are none (the order is kept)."""
    if not any(g.see_main for g in groups):
        return None
    spans, start = [], num_queries
    for g in groups:
        spans.append((g.see_main, torch.arange(start, start + g.size, device=device)))
        start += g.size
    lead = [idx for first, idx in spans if first]
    rest = [idx for first, idx in spans if not first]
    return torch.cat(lead + [torch.arange(num_queries, device=device)] + rest)
