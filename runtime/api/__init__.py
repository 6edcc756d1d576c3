"""The server's HTTP endpoints, one router per concern; `auth` is the permission check they
share. The model APIs' POSTs are answered before FastAPI (runtime/gateway/hotpath.py)."""
