"""Rootless proxies: a SOCKS5 server (--socks) and an HTTP proxy (--http-proxy) on the
client, whose connections travel the tunnel as captured ones do. The parsers are sans-IO
(socks5.py, http_connect.py); server.py is the asyncio driver."""
