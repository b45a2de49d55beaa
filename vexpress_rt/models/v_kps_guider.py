"""V-Kps guider: a small per-frame conv net from the drawn key-point image to a feature added after conv_in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VKpsGuider(nn.Module):
    def __init__(
        self,
        embedding_channels: int = 320,
        conditioning_channels: int = 3,
        block_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, 3, padding=1)

    @classmethod
    def from_state_dict_shapes(cls, state_dict: dict[str, torch.Tensor]) -> VKpsGuider:
        """Widths read from the checkpoint (the released model: 3 -> (16, 32, 96, 256) -> 320)."""
        widths = [state_dict["conv_in.weight"].shape[0]]
        i = 1
        while f"blocks.{i}.weight" in state_dict:
            widths.append(state_dict[f"blocks.{i}.weight"].shape[0])
            i += 2
        return cls(
            embedding_channels=state_dict["conv_out.weight"].shape[0],
            conditioning_channels=state_dict["conv_in.weight"].shape[1],
            block_out_channels=tuple(widths),
        )

    def forward(self, kps_images: torch.Tensor) -> torch.Tensor:
        """kps_images (B, 3, F, H, W) in [0, 1] -> (B, C, F, H/8, W/8); each frame independently."""
        b, c, f, h, w = kps_images.shape
        x = F.silu(self.conv_in(kps_images.transpose(1, 2).reshape(b * f, c, h, w)))
        for block in self.blocks:
            x = F.silu(block(x))
        out: torch.Tensor = self.conv_out(x)
        return out.reshape(b, f, *out.shape[1:]).transpose(1, 2)
