"""The RTP endpoint: `rtp@NAME`, one call with a peer described by SDP, its media in and out of the frame bus
(docs/rtp.md)."""
