"""MS-DETR's decoder layer: cross-attention first, and an auxiliary FFN whose output is supervised one-to-many.

specs/deformable_family.md §4.1 ([MS] Atten4Vis/MS-DETR, architecture (c) of its Figure 4). Parameter
names are the official ones (the standard layer's plus ``linear3``, ``linear4``, ``norm4``), so the
released MS-DETR checkpoints load strictly. The add-on (models/criterion/ms_detr.py) asks the builder
for this layer; the decoder predicts from its second output but never feeds it forward. In evaluation the
one-to-many branch is skipped (second output None): only the one-to-one predictions are evaluated.
"""
from __future__ import annotations

from torch import Tensor, nn

from .deformable_transformer import DeformableTransformerDecoderLayer, _with_pos


class MSDETRDecoderLayer(DeformableTransformerDecoderLayer):
    """Post-norm decoder layer in MS-DETR's order: cross-attention -> self-attention -> FFN.

    Args:
        d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, msda_impl: as the standard layer.
        use_aux_ffn: the one-to-many features go through their own FFN block (linear3/linear4/norm4, width
            d_ffn); otherwise they are the cross-attention output itself.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, msda_impl: str = "auto",
                 use_aux_ffn: bool = True) -> None:
        super().__init__(d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, msda_impl)
        self.use_aux_ffn = use_aux_ffn
        if use_aux_ffn:
            self.linear3 = nn.Linear(d_model, d_ffn)
            self.dropout5 = nn.Dropout(dropout)
            self.linear4 = nn.Linear(d_ffn, d_model)
            self.dropout6 = nn.Dropout(dropout)
            self.norm4 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor, src_padding_mask: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Shapes as the standard layer.

        Returns:
            (output [B, T, C] fed to the next layer and supervised one-to-one,
             one-to-many features [B, T, C] only predicted from; None in evaluation mode).
        """
        tgt2 = self.cross_attn(_with_pos(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        o2m = tgt if self.training else None
        if self.use_aux_ffn and self.training:
            o2m = self.norm4(tgt + self.dropout6(self.linear4(self.dropout5(self.activation(self.linear3(tgt))))))
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=self.official_dropout_path)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2)), o2m
