"""WebRTC, WebSocket video and the web page: edgeroom-webrtc"""
