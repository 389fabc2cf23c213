"""The service runtime every edgeroom service is built on."""
