"""V-Express networks as plain torch modules whose attribute paths are the released checkpoint keys."""

from .audio_projection import AudioProjection
from .unet import Conditioning, DenoisingUNet, ReferenceNet, UNetConfig
from .v_kps_guider import VKpsGuider

__all__ = ["AudioProjection", "Conditioning", "DenoisingUNet", "ReferenceNet", "UNetConfig", "VKpsGuider"]
