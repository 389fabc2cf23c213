"""Decode: encoded access units (or single NAL units) -> raw pictures, with a keyframe gate."""
from services.decode.decoder import Decoded, Decoder, DecoderUnavailable, copy_into, probe_hw, publish_frame

__all__ = ["Decoded", "Decoder", "DecoderUnavailable", "copy_into", "probe_hw", "publish_frame"]
