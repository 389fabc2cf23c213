"""SIP signalling: edgeroom-sip"""
