"""The vision service: per-stream pipelines (resize, transforms, detector, censor, watermark),
processed streams back on the bus, and AI vision providers asked what they see."""
