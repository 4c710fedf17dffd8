"""The HTTP gateway: validates scan requests, publishes them, answers status reads."""
